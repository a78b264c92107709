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


def test_the_cli_adds_refreshes_drops_and_checks_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "results" / "training" / "r" / "checkpoints"
    run.mkdir(parents=True)
    (run / "last.pt").write_bytes(b"first")
    (run / "best.pt").write_bytes(b"best")
    files = ["results/training/r/checkpoints/last.pt", "results/training/r/checkpoints/best.pt"]
    assert manifest.main(["add", "--kind", "training", *files], root=tmp_path) == 0
    entries = manifest.read(tmp_path)
    assert [(e.path, e.run, e.kind) for e in entries] == [
        (files[1], "results/training/r", "training"),
        (files[0], "results/training/r", "training"),
    ]
    (run / "last.pt").write_bytes(b"second, longer")  # the run went on: add again refreshes its line
    assert manifest.main(["check"], root=tmp_path) == 1 and "bytes, the manifest says 5" in capsys.readouterr().out
    assert manifest.main(["add", "--kind", "training", files[0]], root=tmp_path) == 0
    assert manifest.main(["check"], root=tmp_path) == 0 and len(manifest.read(tmp_path)) == 2
    (run / "last.pt").unlink()  # retired: its line goes too, the other stays
    assert manifest.main(["drop", files[0]], root=tmp_path) == 0
    assert [e.path for e in manifest.read(tmp_path)] == [files[1]]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["add", "--kind", "training", "none.pt"], "not a file: "),
        (["add", "--kind", "training", "/elsewhere/a.pt"], "not inside the repository"),
        (["drop", "never_listed.pt"], "not in results/checkpoints.tsv: never_listed.pt"),
    ],
)
def test_the_cli_refuses_in_one_line_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert manifest.main(argv, root=tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith("lab.manifest: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / manifest.MANIFEST).exists()


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
