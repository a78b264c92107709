"""Every committed checkpoint is in the manifest, matches it byte for byte, and loads."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lab import manifest

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = manifest.read(ROOT)


def tracked_checkpoints() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "*.pt"], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.slow  # asks git (a process) which checkpoints it tracks
def test_the_manifest_lists_exactly_the_tracked_checkpoints():
    listed = {e.path for e in ENTRIES}
    tracked = tracked_checkpoints()
    assert tracked - listed == set(), "tracked .pt files missing from results/checkpoints.tsv"
    assert listed - tracked == set(), "manifest lines whose file git does not track"


@pytest.mark.slow
def test_every_listed_file_matches_its_checksum_and_size():
    assert ENTRIES, "the manifest is empty"
    assert manifest.problems(ROOT, ENTRIES) == []


def test_each_line_names_its_run_and_a_known_kind():
    for e in ENTRIES:
        assert e.kind in manifest.KINDS
        assert (ROOT / e.run).is_dir() and e.path.startswith(e.run + "/")


def test_problems_finds_a_changed_file(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(b"12345")
    entry = manifest.describe(f, tmp_path, "weights")
    assert manifest.problems(tmp_path, [entry]) == []
    f.write_bytes(b"12346")
    assert "SHA-256" in manifest.problems(tmp_path, [entry])[0]
    f.write_bytes(b"1")
    assert "bytes" in manifest.problems(tmp_path, [entry])[0]
    f.unlink()
    assert "missing" in manifest.problems(tmp_path, [entry])[0]


@pytest.fixture(scope="module")
def shared_mnist():
    """Load each MNIST variant once for all the checkpoints (as `vae.data.mnist` builds it)."""
    import vae.data

    original = vae.data.mnist
    cached = functools.cache(lambda **kwargs: original(**kwargs))
    vae.data.mnist = lambda **kwargs: cached(**kwargs)
    yield
    vae.data.mnist = original


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.path for e in ENTRIES])
def test_each_committed_checkpoint_loads(entry, shared_mnist):
    from lab.checkpoint import load_model
    from vae.data import DataError

    try:
        model, data, _ = load_model(ROOT / entry.path)
    except DataError as e:
        pytest.skip(f"MNIST is not available here: {e}")
    x = data.split("test")[:8]
    with torch.no_grad():
        terms = model.elbo_terms(x)
    assert torch.isfinite(terms.reconstruction - terms.kl).all()
