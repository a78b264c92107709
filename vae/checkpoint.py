"""Checkpoint files: the format the trainer writes, atomic saves and weights-only loads.

A training run writes `checkpoints/last.pt` (every epoch), `checkpoints/best.pt` (the best
validation ELBO) and `metrics.jsonl` into its run directory; `run_files` names what in a
directory makes it hold a run. Rebuilding a model from a checkpoint, with its stored config
checked, is `lab.checkpoint.load_model`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch

from vae.files import write_atomically

CHECKPOINT_FORMAT = 1
METRICS_FILE = "metrics.jsonl"


class RunDirError(RuntimeError):
    """The run directory cannot be used by this run (in use, already holding a run, or a disagreeing resume)."""


def run_files(run_dir: str | Path) -> list[str]:
    """What in `run_dir` makes it hold a run, relative to it: `checkpoints/*.pt` and `metrics.jsonl`.

    Nothing else counts: `.hydra/`, `train.log` and `.lock` are what a run leaves before its
    first epoch ends (a job pre-empted then may start over).
    """
    run_dir = Path(run_dir)
    found = sorted(f"checkpoints/{p.name}" for p in (run_dir / "checkpoints").glob("*.pt"))
    if (run_dir / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    return found


def holds_a_run(run_dir: str | Path) -> bool:
    return bool(run_files(run_dir))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then `os.replace`.

    A failure (a full disk, say) removes the temporary file, leaves `path` as it was and
    raises `vae.files.WriteError` naming the file and the reason.
    """
    write_atomically(path, lambda f: torch.save(payload, f))


def check_checkpoint_file(path: Path, label: str, example: str) -> None:
    """Refuse a checkpoint path that is missing, a directory (suggesting `example`), or not a regular
    file (a device or FIFO, which torch would read forever); every message starts with `label`."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        raise FileNotFoundError(f"{label} does not exist") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{label} is a directory; give a checkpoint file, e.g. {example}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{label} is not a regular file (a device, FIFO or socket)")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a priorlab checkpoint with `weights_only=True`, with a clear error for a bad file."""
    path = Path(path)
    check_checkpoint_file(path, f"checkpoint {path}", f"{path / 'checkpoints' / 'best.pt'}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        hint = ""
        if path.name == "last.pt" and (path.parent / "best.pt").is_file():
            hint = f"; to continue from the best checkpoint instead, pass trainer.resume={path.parent / 'best.pt'}"
        raise ValueError(
            f"{path} is not a readable priorlab checkpoint (truncated or foreign file?): "
            f"{' '.join(str(e).split())}{hint}"
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a priorlab checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload
