"""vae/checkpoint.py: the checkpoint file round trip, the files that make a directory hold a run, and the
refusals of a file that is missing, not a file, truncated, foreign or code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from vae.checkpoint import (
    CHECKPOINT_FORMAT,
    METRICS_FILE,
    check_checkpoint_file,
    holds_a_run,
    load_checkpoint,
    run_files,
    save_checkpoint,
)
from vae.files import WriteError


def payload() -> dict:
    torch.manual_seed(0)
    return {
        "format": CHECKPOINT_FORMAT,
        "model": {"encoder.weight": torch.randn(3, 4), "prior.logvar": torch.zeros(2, dtype=torch.float64)},
        "state": {"epoch": 2, "step": 28, "best_val_elbo": -41.5},
        "rng_cpu": torch.get_rng_state(),
        "config": {"seed": 0, "prior": {"_target_": "priors.gaussian.GaussianPrior"}},
        "is_best": True,
    }


def test_a_saved_checkpoint_loads_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    saved = payload()
    save_checkpoint(path, saved)
    loaded = load_checkpoint(path)
    assert loaded.keys() == saved.keys()
    for key, tensor in saved["model"].items():
        assert torch.equal(loaded["model"][key], tensor) and loaded["model"][key].dtype == tensor.dtype
    assert torch.equal(loaded["rng_cpu"], saved["rng_cpu"])
    assert (loaded["state"], loaded["config"], loaded["is_best"]) == (saved["state"], saved["config"], True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, payload())
    before = path.read_bytes()
    with pytest.raises(WriteError, match=rf"^could not write {path}: "):
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "model": lambda: None})  # cannot be pickled
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_what_makes_a_directory_hold_a_run(tmp_path: Path) -> None:
    # What a run leaves before its first epoch ends does not count: a pre-empted job may start over.
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "train.log").write_text("")
    (tmp_path / ".lock").write_text("123\n")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".last.pt.123.tmp").write_bytes(b"half")
    assert run_files(tmp_path) == [] and not holds_a_run(tmp_path)
    (tmp_path / METRICS_FILE).write_text("{}\n")
    assert run_files(str(tmp_path)) == [METRICS_FILE] and holds_a_run(tmp_path)
    for name in ("last.pt", "best.pt"):
        (tmp_path / "checkpoints" / name).write_bytes(b"")
    assert run_files(tmp_path) == ["checkpoints/best.pt", "checkpoints/last.pt", METRICS_FILE]
    assert run_files(tmp_path / "missing") == []


def test_a_missing_file_a_directory_and_a_fifo_are_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"^checkpoint {tmp_path / 'nope.pt'} does not exist$"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(
        IsADirectoryError, match=rf"is a directory; give a checkpoint file, e.g. {tmp_path / 'checkpoints' / 'best.pt'}"
    ):
        load_checkpoint(tmp_path)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # torch.load would wait on it forever
    with pytest.raises(ValueError, match=r"^trainer.resume=.* is not a regular file \(a device, FIFO or socket\)$"):
        check_checkpoint_file(fifo, f"trainer.resume={fifo}", "best.pt")


def test_a_truncated_last_checkpoint_suggests_the_best_one(tmp_path: Path) -> None:
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint(last, payload())
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"is not a readable priorlab checkpoint \(truncated or foreign file\?\)") as e:
        load_checkpoint(last)
    assert "trainer.resume" not in str(e.value) and "\n" not in str(e.value)
    save_checkpoint(best, payload())
    with pytest.raises(
        ValueError, match=rf"; to continue from the best checkpoint instead, pass trainer.resume={best}$"
    ):
        load_checkpoint(last)


@pytest.mark.parametrize("content", [{"model": {}}, {"format": 99}, [1, 2]], ids=["no format", "format 99", "a list"])
def test_a_file_of_another_format_is_refused(tmp_path: Path, content) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(
        ValueError, match=rf"^{path} is not a priorlab checkpoint \(format {CHECKPOINT_FORMAT} expected\)$"
    ):
        load_checkpoint(path)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "model": RunsCode(marker)}, f)
    with pytest.raises(ValueError, match="is not a readable priorlab checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
