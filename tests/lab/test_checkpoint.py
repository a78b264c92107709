"""lab/checkpoint.py: a checkpoint rebuilds the model it was written from, and the command-line options that
name a checkpoint and an output directory are checked before any work.

The trust checks of what a stored config may build, the stored data paths, the allocation budget
and the run directory's layout are tested in tests/lab/test_trust.py."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lab.checkpoint import (
    CheckpointError,
    _size,
    checkpoint_option,
    load_model,
    model_state,
    output_dir_option,
    storage_bytes,
)
from vae.validation import ConfigError


def test_a_checkpoint_rebuilds_the_model_and_data_it_was_written_from(short_run) -> None:
    run_dir, _ = short_run
    best = run_dir / "checkpoints" / "best.pt"
    model, data, run_cfg = load_model(best)
    stored = torch.load(best, weights_only=True)
    assert model.state_dict().keys() == stored["model"].keys()
    assert all(torch.equal(v, stored["model"][k]) for k, v in model.state_dict().items())
    assert type(model.prior).__name__ == "GaussianPrior" and model.latent_dim == 2
    assert run_cfg.vae.latent_dim == 2 and OmegaConf.to_container(run_cfg.trainer) == stored["config"]["trainer"]
    assert data.split("train").shape == (1397, 64) and next(model.parameters()).device.type == "cpu"


def test_missing_truncated_and_foreign_checkpoints_give_clear_errors(short_run, tmp_path):
    run_dir, _ = short_run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    good = (run_dir / "checkpoints" / "best.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable priorlab checkpoint"):
        load_model(truncated)

    # A pickle that would run code if unpickled: refused, and the code never runs.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": 1, "model": Evil()}, f, protocol=2)  # torch.save's protocol: no warning
    with pytest.raises(ValueError, match="not a readable priorlab checkpoint"):
        load_model(evil)
    assert not marker.exists()

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match="not a priorlab checkpoint"):
        load_model(foreign)
    no_config = tmp_path / "no_config.pt"
    torch.save({"format": 1, "model": {}, "config": {}}, no_config)
    with pytest.raises(CheckpointError, match="no run config"):
        load_model(no_config)


def test_weights_that_do_not_fit_the_stored_config_are_refused(short_run, tmp_path) -> None:
    run_dir, _ = short_run
    payload = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("decoder.")}
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(run_dir / ".hydra", tmp_path / ".hydra")
    path = tmp_path / "checkpoints" / "best.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"^{path}: the stored weights do not fit the model its config builds"):
        load_model(path)


def test_model_state_takes_named_dense_finite_tensors_only() -> None:
    source = Path("run/checkpoints/best.pt")
    good = {"w": torch.ones(2), "steps": torch.tensor(3)}
    assert model_state({"model": good}, source) is good
    for payload, message in [
        ({}, "holds no model weights"),
        ({"model": {}}, "holds no model weights"),
        ({"model": {"w": [1.0]}}, "hold 'w', which is not a named dense tensor"),
        ({"model": {"w": torch.eye(2).to_sparse()}}, "hold 'w', which is not a named dense tensor"),
        ({"model": {"w": torch.tensor([1.0, float("inf"), float("nan")])}}, "weight w holds 2 NaN or infinite value"),
    ]:
        with pytest.raises(CheckpointError, match=rf"^run/checkpoints/best.pt.*{message}"):
            model_state(payload, source)


def test_storage_bytes_counts_a_shared_storage_once() -> None:
    w = torch.zeros(10, 4)  # 160 bytes
    assert storage_bytes([w, w[0], w.T, w[2:5]]) == 160
    assert storage_bytes([w, torch.zeros(3, dtype=torch.float64)]) == 160 + 24
    assert storage_bytes([]) == 0
    assert [_size(n) for n in (12, 2_500, 3_400_000, 7_100_000_000)] == ["12 bytes", "2.5 kB", "3.4 MB", "7.1 GB"]


def test_the_checkpoint_option_is_required_and_a_path(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"^checkpoint is required: checkpoint=<run dir>/checkpoints/best.pt$"):
        checkpoint_option(OmegaConf.create({"checkpoint": "???"}))
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigError, match="checkpoint must be the path of a checkpoint file, got"):
            checkpoint_option(OmegaConf.create({"checkpoint": bad}))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint_option(OmegaConf.create({"checkpoint": "~/best.pt"})) == tmp_path / "best.pt"


def test_the_output_directory_option(short_run, tmp_path: Path) -> None:
    run_dir, _ = short_run
    best = run_dir / "checkpoints" / "best.pt"
    assert output_dir_option(best, None) == run_dir  # beside the checkpoint, in its run directory
    assert output_dir_option(best, str(tmp_path / "new")) == tmp_path / "new"  # need not exist yet
    loose = tmp_path / "best.pt"
    shutil.copy(best, loose)
    with pytest.raises(
        CheckpointError, match=r"not in a priorlab run directory.*say where the outputs go with out_dir"
    ):
        output_dir_option(loose, None, option="out_dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=rf"^output_dir={tmp_path / 'file'} is a file, not a directory$"):
        output_dir_option(best, str(tmp_path / "file"))
    with pytest.raises(ConfigError, match=r"^output_dir must be a directory path, or null .*got 5$"):
        output_dir_option(best, 5)
