"""A run directory belongs to one run: a lock for the run's lifetime, no silent reuse, resumes that agree.

`train.py` calls these before it writes anything into the directory:

* `RunDirLock`: an exclusive `flock` on `<run dir>/.lock` (the holder's PID written inside,
  for the error message). The kernel drops the lock when its process dies, so a lock left
  by a killed run is never stale.
* `check_fresh`: a directory that already holds checkpoints or metrics is refused unless
  the run resumes.
* `resume_changes`: a resume must agree with the checkpoint's stored config on every
  setting that changes the model, the data or the optimizer; settings that only say how
  long or how verbosely to train (`RESUMABLE_CHANGES`) may change, and are recorded. So may
  an option added to a class after the checkpoint was written, when it keeps the value the
  class gives it by default (the checkpoint trained with that behaviour).
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

#: Config keys (or key prefixes ending in ".") a resumed run may change.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.patience",
    "trainer.progress",
    "trainer.log_every_n_steps",
    "trainer.eval_batch_size",
    "trainer.max_loss_per_dim",
    "data.path",
    "data.cache_dir",
    "device",
    "trainer.flush_denormal",  # like the device: how the arithmetic is done, not what is trained
    "debug",
    "logger.",
    "surgery.",
)


class RunDirError(RuntimeError):
    """The run directory cannot be used by this run (in use, already holding a run, or a disagreeing resume)."""


class RunDirLock:
    """Hold an exclusive lock on `run_dir` while the `with` block runs."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use by another run (PID {holder}); wait for it to finish, "
                "or give this run its own directory (hydra.run.dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


#: Where a run directory keeps its resolved config: `python -m surgery.report` reads a run's
#: prior, latent size, seed and settings from it.
CONFIG_FILE = Path(".hydra") / "config.yaml"


def write_config(run_dir: str | Path, config: DictConfig | dict[str, Any]) -> None:
    """Write `config`, resolved, to `<run_dir>/.hydra/config.yaml` (train.py, the fit and the surgery CLIs)."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config if isinstance(config, DictConfig) else OmegaConf.create(config), path, resolve=True)


def holds_a_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("*.pt"))


def check_fresh(run_dir: str | Path) -> None:
    """Refuse to start a fresh run where one already is."""
    run_dir = Path(run_dir)
    if holds_a_run(run_dir):
        raise RunDirError(
            f"{run_dir} already holds a run (checkpoints or metrics.jsonl); continue it with trainer.resume=true, "
            "or start a new run in another directory (hydra.run.dir=...)"
        )


def target_default(config: dict[str, Any], key: str) -> Any:
    """The default of flat `key` as an argument of its node's `_target_` (the value a run made
    before the argument existed ran with), or `inspect.Parameter.empty` if it has none."""
    *path, name = key.split(".")
    node: Any = config
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    target = node.get("_target_") if isinstance(node, dict) else None
    if not isinstance(target, str):
        return inspect.Parameter.empty
    parameter = _parameters(target).get(name)
    return inspect.Parameter.empty if parameter is None else parameter.default


def is_target_default(config: dict[str, Any], key: str, value: Any) -> bool:
    """Whether flat `key` is an argument of its node's `_target_` and `value` is its default."""
    default = target_default(config, key)
    return default is not inspect.Parameter.empty and default == value


@functools.cache
def _parameters(target: str) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return {}


def format_setting(key: str, value: Any) -> str:
    """A flat setting as `key=value`, the way it is written on the command line (a string bare,
    anything else as JSON with sorted keys)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value, sort_keys=True)}"


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat `{"a.b": value}` (lists kept whole)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    """Whether a flat key is one of `patterns`, or lies under one ending in "."."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def resume_changes(stored: dict[str, Any], new: dict[str, Any], checkpoint: str | Path) -> dict[str, list[Any]]:
    """The settings a resume changes, `{key: [stored, new]}`; raise `RunDirError` if any of
    them changes the model, the data or the optimizer.

    Args:
        stored: the resolved config in the checkpoint.
        new: the resolved config of this run.
        checkpoint: named in the error.
    """
    a, b = flatten(stored), flatten(new)
    for flat in (a, b):
        flat.pop("trainer.resume", None)  # how this run started, not what it trains
    missing = object()
    changed = {
        k: [a.get(k, missing), b.get(k, missing)]
        for k in sorted(a.keys() | b.keys())
        if a.get(k, missing) != b.get(k, missing)
    }
    refused = {
        k: v
        for k, v in changed.items()
        if not matches_any(k, RESUMABLE_CHANGES) and not (v[0] is missing and is_target_default(new, k, v[1]))
    }
    if refused:

        def show(value: Any) -> str:
            return "(absent)" if value is missing else repr(value)

        shown = ", ".join(f"{k}: {show(old)} -> {show(new_)}" for k, (old, new_) in refused.items())
        # an option added since the checkpoint was written: the run trained at its default
        defaults = {k: target_default(new, k) for k, (old, _) in refused.items() if old is missing}
        hint = " ".join(format_setting(k, v) for k, v in defaults.items() if v is not inspect.Parameter.empty)
        raise RunDirError(
            f"cannot resume from {checkpoint}: the config differs in what it trained with ({shown}); "
            "resume with the same settings"
            + (f" ({hint} on the command line: the defaults the run was made with)" if hint else "")
            + ", or start a new run in another directory"
        )
    return {k: [None if v is missing else v for v in pair] for k, pair in changed.items()}


def record_resume(run_dir: str | Path, step: int, changes: dict[str, list[Any]]) -> None:
    """Append the resume, and what it changed, to `<run dir>/resumes.jsonl`."""
    with open(Path(run_dir) / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "changed": changes}) + "\n")
