"""`python -m lab.export`: a weights-only file that loads like the checkpoint it came from, and its manifest line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lab import export as export_module
from lab import manifest
from vae.checkpoint import load_checkpoint


@pytest.fixture
def run_dir(short_run) -> Path:
    """The session's two-step run (conftest.py): the export only reads it."""
    return short_run[0]


def test_the_export_holds_the_same_weights_and_no_optimizer(run_dir, tmp_path):
    dest = tmp_path / "repo" / "results" / "run"
    target = export_module.export(run_dir, dest=dest, root=tmp_path / "repo")
    full, light = load_checkpoint(run_dir / "checkpoints" / "best.pt"), load_checkpoint(target)
    assert light["optimizer"] is None and light["rng_cpu"] is None
    assert light["config"] == full["config"]
    assert all(torch.equal(light["model"][k], v) for k, v in full["model"].items())
    assert target.stat().st_size < (run_dir / "checkpoints" / "best.pt").stat().st_size
    # the results came along, the training checkpoints did not
    assert (dest / "metrics.jsonl").is_file() and (dest / ".hydra" / "config.yaml").is_file()
    assert not (dest / "checkpoints" / "best.pt").exists() and not (dest / ".lock").exists()
    (entry,) = manifest.read(tmp_path / "repo")
    assert entry.path == "results/run/checkpoints/model.pt" and entry.run == "results/run" and entry.kind == "weights"
    assert manifest.problems(tmp_path / "repo", [entry]) == []


def test_the_export_loads_and_scores_like_the_checkpoint(run_dir, tmp_path):
    from lab.checkpoint import load_model

    target = export_module.export(run_dir, dest=tmp_path / "copy", root=tmp_path)
    full, data, _ = load_model(run_dir / "checkpoints" / "best.pt")
    light, _, _ = load_model(target)
    x = data.split("test")[:16]
    torch.manual_seed(0)
    a = full.elbo_terms(x)
    torch.manual_seed(0)
    b = light.elbo_terms(x)
    assert torch.equal(a.reconstruction, b.reconstruction) and torch.equal(a.kl, b.kl)


def test_the_copy_keeps_hydras_choices_but_not_the_machines_paths(run_dir, tmp_path):
    # a run made before train.py left them out: its hydra.yaml names the machine's directories
    run = tmp_path / "run"
    export_module.copy_results(run_dir, run)
    runtime = {"cwd": str(tmp_path), "output_dir": str(run), "config_sources": [{"path": str(tmp_path / "conf")}]}
    record = {"hydra": {"run": {"dir": "../runs/x"}, "runtime": {**runtime, "choices": {"prior": "flow_spline"}}}}
    OmegaConf.save(OmegaConf.create(record), run / ".hydra" / "hydra.yaml")
    export_module.copy_results(run, tmp_path / "copy")
    copied = OmegaConf.to_container(OmegaConf.load(tmp_path / "copy" / ".hydra" / "hydra.yaml"))
    assert copied == {"hydra": {"run": {"dir": "../runs/x"}, "runtime": {"choices": {"prior": "flow_spline"}}}}
    assert (tmp_path / "copy" / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()


def test_prune_removes_the_training_checkpoints_and_their_manifest_lines(run_dir, tmp_path):
    copy = tmp_path / "results" / "run"
    export_module.copy_results(run_dir, copy)
    (copy / "checkpoints").mkdir()
    for name in ("best.pt", "last.pt"):
        (copy / "checkpoints" / name).write_bytes((run_dir / "checkpoints" / name).read_bytes())
    manifest.write(tmp_path, [manifest.describe(copy / "checkpoints" / "best.pt", tmp_path, "training")])
    export_module.export(copy, prune=True, root=tmp_path)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["model.pt"]
    assert [e.path for e in manifest.read(tmp_path)] == ["results/run/checkpoints/model.pt"]


def test_a_run_without_best_pt_is_refused_in_one_line(tmp_path, capsys):
    assert export_module.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "best.pt does not exist" in err


def test_non_finite_weights_are_not_exported(run_dir):
    payload = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name].clone().fill_(float("nan"))
    with pytest.raises(export_module.ExportError, match=name):
        export_module.weights_only(payload)
