"""A run directory belongs to one run: a lock for the run's lifetime, no silent reuse, resumes that agree.

`train.py` calls these before it writes anything into the directory:

* `RunDirLock`: an exclusive `flock` on `<run dir>/.lock` (the holder's PID written inside,
  for the error message). The kernel drops the lock when its process dies, so a lock left
  by a killed run is never stale.
* `check_fresh`: a directory that already holds checkpoints or metrics is refused unless
  the run resumes.
* `record_code`: which code trains in the directory, one line of `code.jsonl` per process.
* `resume_changes`: a resume must agree with the checkpoint's stored config on every
  setting that changes the model, the data or the optimizer; settings that only say how
  long or how verbosely to train (`RESUMABLE_CHANGES`) may change, and are recorded. So may
  an option added to a class after the checkpoint was written, when it keeps the value the
  class gives it by default (the checkpoint trained with that behaviour).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from vae.checkpoint import RunDirError, holds_a_run
from vae.optim import IMPLEMENTATION_OPTIONS

#: Config keys (or key prefixes ending in ".") a resumed run may change.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_seconds",
    "trainer.patience",
    "trainer.progress",
    "trainer.log_every_n_steps",
    "trainer.eval_batch_size",
    "trainer.max_loss_per_dim",
    "data.path",
    "data.cache_dir",
    "device",
    "trainer.compile",  # the same step, compiled or not: equal to floating-point rounding
    # the same update in one kernel, batched kernels or a loop: equal to rounding
    *(f"trainer.optimizer.{option}" for option in IMPLEMENTATION_OPTIONS),
    "trainer.flush_denormal",  # like the device: how the arithmetic is done, not what is trained
    "debug",
    "logger.",
    "surgery.",
)


def missing_dirs(path: str | Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would create, deepest first."""
    path = Path(os.path.abspath(path))
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove each of `dirs` (deepest first) that is empty; stop at the first that is not."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:  # not empty (someone else writes there now), or already gone
            if d.exists():
                return


class RunDirLock:
    """Hold an exclusive lock on `run_dir` while the `with` block runs.

    A run that never calls `claim` (one refused by a check after the lock was taken) leaves
    the directory as it was: the `.lock` file it created and the directories it, or Hydra
    before it (`created`), made are removed when the block ends.

    Args:
        run_dir: the run directory; created if missing.
        created: directories made for this run before the lock was taken (by Hydra, see
            `RecordRunDir`), deepest first; removed with the lock's own when the run is refused.
    """

    def __init__(self, run_dir: str | Path, created: list[Path] | tuple[Path, ...] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.created = list(created)
        self.claimed = False
        self._made_lock = False
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        made = missing_dirs(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            remove_empty_dirs(made + self.created)
            raise self._unusable(e) from None
        self.created = made + self.created
        while True:
            existed = self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only directory or filesystem
                remove_empty_dirs(self.created)
                raise self._unusable(e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunDirError(
                    f"{self.path.parent} is in use by another run (PID {holder}); wait for it to finish, "
                    "or give this run its own directory (hydra.run.dir=...)"
                ) from None
            # A refused run removes the .lock it made: whoever opened that file before it went
            # holds a lock on a name that no longer exists. Lock again, by the name.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._made_lock = not existed
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _unusable(self, error: OSError) -> RunDirError:
        return RunDirError(
            f"cannot use {self.run_dir} as the run directory: {error.strerror or error} "
            f"({error.filename or self.run_dir}); give the run a directory it can write (hydra.run.dir=...)"
        )

    def claim(self) -> None:
        """The run passed every check and now writes into the directory: it stays, whatever happens next."""
        self.claimed = True

    def __exit__(self, *exc: Any) -> None:
        if self._fd is None:
            return
        if not self.claimed:
            if self._made_lock:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            remove_empty_dirs(self.created)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


# ---- the run directory Hydra makes before train.py runs ---------------------------------

#: Per run directory (absolute, as Hydra names it), the directories that did not exist before
#: Hydra made them for this process's run (deepest first); filled by `RecordRunDir`.
_MADE_BY_HYDRA: dict[str, list[Path]] = {}


class RecordRunDir(Callback):
    """A Hydra callback (conf/train.yaml) that notes which directories Hydra is about to create
    for the run, so that a refused run can remove them again (`made_by_hydra`).

    Hydra creates `hydra.run.dir` before the task starts, whether or not the run will be
    refused, and a directory it cannot create ends in Hydra's traceback: that case is refused
    here, on one line (exit code 2), before Hydra tries. Only single runs are noted: a
    sweep's job directories sit under the sweep's own.

    Args:
        prog: the command named in the error line.
    """

    def __init__(self, prog: str = "train.py") -> None:
        self.prog = prog

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            run_dir = str(OmegaConf.select(config, "hydra.run.dir"))
        except Exception:  # noqa: BLE001 (an unresolvable dir is Hydra's to report; nothing is noted)
            return
        if not run_dir.strip():
            return  # train.py refuses it, on one line
        missing = missing_dirs(run_dir)
        _MADE_BY_HYDRA[os.path.abspath(run_dir)] = missing
        if missing and not os.access(missing[-1].parent, os.W_OK | os.X_OK):
            # A Hydra callback is the only code that runs before Hydra's mkdir: the error is printed here.
            sys.stderr.write(
                f"{self.prog}: error: cannot create the run directory {run_dir}: {missing[-1].parent} is not "
                "writable; give the run a directory it can write (hydra.run.dir=...)\n"
            )
            raise SystemExit(2)


def made_by_hydra(run_dir: str | Path) -> list[Path]:
    """The directories Hydra created for this run at `run_dir` (deepest first; [] when none or unknown)."""
    return list(_MADE_BY_HYDRA.pop(os.path.abspath(run_dir), []))


# ---- the run's log file ------------------------------------------------------------------

#: The run's log, written once the run has claimed its directory (Hydra's own job logging would
#: create it, and the directory, before any check could refuse the run).
LOG_FILE = "train.log"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
#: How the log's last line begins when an error ended the run (`log_to_file`, `stop_reason`).
STOPPED = "the run stopped: "


@contextlib.contextmanager
def log_to_file(path: str | Path) -> Iterator[None]:
    """Copy what the root logger handles to `path` (appended) while the block runs.

    An exception that ends the block is written to the file too, as one ERROR line (only
    there: the console gets the command's own one-line error), so the run's log says why it
    stopped."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    except BaseException as e:
        if isinstance(e, SystemExit) and e.code in (0, None):  # a clean exit is no error
            raise
        message = " ".join(str(e).split())
        said = f"{type(e).__name__}: {message}" if message else type(e).__name__
        handler.handle(
            logging.makeLogRecord(
                {
                    "name": __name__,
                    "levelno": logging.ERROR,
                    "levelname": "ERROR",
                    "msg": STOPPED + "%s",
                    "args": (said,),
                }
            )
        )
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def stop_reason(path: str | Path) -> str | None:
    """The error that ended the run whose log is `path` (its last line, `log_to_file`), or None:
    no log, or the run went on (or finished) after it."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    marker = f"[ERROR] - {STOPPED}"
    return lines[-1].split(marker, 1)[1] if lines and marker in lines[-1] else None


#: Where a run directory keeps its resolved config: `python -m lab.report` reads a run's
#: prior, latent size, seed and settings from it.
CONFIG_FILE = Path(".hydra") / "config.yaml"


def write_config(run_dir: str | Path, config: DictConfig | dict[str, Any]) -> None:
    """Write `config`, resolved, to `<run_dir>/.hydra/config.yaml` (train.py, the fit and the surgery CLIs)."""
    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config if isinstance(config, DictConfig) else OmegaConf.create(config), path, resolve=True)


#: Where a run directory keeps Hydra's own config: `python -m lab.report` names the prior by its
#: `runtime.choices` (two options may share a class).
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
#: What Hydra's `runtime` record says of the machine, not of the run: the working directory,
#: the output directory as an absolute path and where the config folders lay. Not kept: a
#: committed run names no machine's paths (the run's own `hydra.run.dir` stays as given).
MACHINE_KEYS: tuple[str, ...] = ("cwd", "output_dir", "config_sources")


def write_hydra_record(run_dir: str | Path, record: DictConfig | dict[str, Any]) -> None:
    """Write Hydra's config (`{"hydra": ...}`) to `<run_dir>/.hydra/hydra.yaml`, without `MACHINE_KEYS`.

    train.py writes it so; `python -m lab.export --to` rewrites a copied one so, for runs made before."""
    record = OmegaConf.to_container(record) if isinstance(record, DictConfig) else dict(record)
    hydra = dict(record.get("hydra") or {})
    runtime = hydra.get("runtime")
    if isinstance(runtime, dict):
        hydra["runtime"] = {k: v for k, v in runtime.items() if k not in MACHINE_KEYS}
    path = Path(run_dir) / HYDRA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({**record, "hydra": hydra}), path)


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


#: What `config_changes` gives for a key that one of the two configs lacks.
ABSENT = object()


def config_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """The flat keys (`flatten`) whose values differ between two configs, `{key: [a's, b's]}`,
    sorted; `ABSENT` where one of them lacks the key."""
    fa, fb = flatten(a), flatten(b)
    return {
        k: [fa.get(k, ABSENT), fb.get(k, ABSENT)]
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k, ABSENT) != fb.get(k, ABSENT)
    }


def show_setting(value: Any) -> str:
    """A value of `config_changes` as an error message names it."""
    return "(absent)" if value is ABSENT else repr(value)


def resume_changes(stored: dict[str, Any], new: dict[str, Any], checkpoint: str | Path) -> dict[str, list[Any]]:
    """The settings a resume changes, `{key: [stored, new]}`; raise `RunDirError` if any of
    them changes the model, the data or the optimizer.

    Args:
        stored: the resolved config in the checkpoint.
        new: the resolved config of this run.
        checkpoint: named in the error.
    """
    changed = config_changes(stored, new)
    changed.pop("trainer.resume", None)  # how this run started, not what it trains
    refused = {
        k: v
        for k, v in changed.items()
        if not matches_any(k, RESUMABLE_CHANGES) and not (v[0] is ABSENT and is_target_default(new, k, v[1]))
    }
    if refused:
        shown = ", ".join(f"{k}: {show_setting(old)} -> {show_setting(new_)}" for k, (old, new_) in refused.items())
        # an option added since the checkpoint was written: the run trained at its default
        defaults = {k: target_default(new, k) for k, (old, _) in refused.items() if old is ABSENT}
        hint = " ".join(format_setting(k, v) for k, v in defaults.items() if v is not inspect.Parameter.empty)
        raise RunDirError(
            f"cannot resume from {checkpoint}: the config differs in what it trained with ({shown}); "
            "resume with the same settings"
            + (f" ({hint} on the command line: the defaults the run was made with)" if hint else "")
            + ", or start a new run in another directory"
        )
    return {k: [None if v is ABSENT else v for v in pair] for k, pair in changed.items()}


#: One line per process that trains in a run dir: when, from which step, and with which code.
CODE_FILE = "code.jsonl"
#: priorlab's own folder: its commit and its sources are what `code_version` reads.
CODE_ROOT = Path(__file__).resolve().parents[1]
#: What the code of a run is: the sources and configs `code_version` digests, relative to CODE_ROOT.
CODE_FILES: tuple[str, ...] = (
    "train.py",
    "priors/**/*.py",
    "vae/**/*.py",
    "surgery/**/*.py",
    "lab/**/*.py",
    "conf/**/*.yaml",
)


def git_commit(root: Path) -> str | None:
    """The commit checked out at `root`, read from git's own files (no process: a run's start
    stays cheap and the fast test tier starts none). None outside a git checkout."""
    dot_git = root / ".git"
    try:
        if dot_git.is_file():  # a worktree: `gitdir: <its folder in the main repo>`
            dot_git = (root / dot_git.read_text().removeprefix("gitdir:").strip()).resolve()
        common = dot_git
        if (dot_git / "commondir").is_file():
            common = (dot_git / (dot_git / "commondir").read_text().strip()).resolve()
        head = (dot_git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head  # detached
        ref = head.removeprefix("ref:").strip()
        for folder in (dot_git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except (OSError, UnicodeDecodeError):
        pass
    return None


def code_version(root: str | Path = CODE_ROOT) -> dict[str, Any]:
    """The code a process runs: the git commit checked out at `root` (None outside a checkout),
    a SHA-256 over the sources and configs (`CODE_FILES`: differs whenever they differ from the
    commit's, or from another run's), and the versions of torch and Python. Two runs of one
    config made by different code (a fix between them) can only be told apart by this."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted({p for pattern in CODE_FILES for p in root.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "commit": git_commit(root),
        "sources_sha256": digest.hexdigest(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def record_code(run_dir: str | Path, step: int | None, root: str | Path = CODE_ROOT) -> None:
    """Append the code that works in `run_dir` from `step` on (0: a fresh run; None: not known
    yet, as for a resumed fit) to `code.jsonl`."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, **code_version(root)}
    with open(Path(run_dir) / CODE_FILE, "a") as f:
        f.write(json.dumps(line) + "\n")


def read_code(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The lines `record_code` wrote in `run_dir`, oldest first; None without a `code.jsonl` (a run
    made before priorlab kept one). Raises ValueError naming the line that is not a record."""
    path = Path(run_dir) / CODE_FILE
    if not path.is_file():
        return None
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            line = None
        if not isinstance(line, dict) or not isinstance(line.get("sources_sha256"), str):
            raise ValueError(f"{path}, line {number}: not a record of the code (no sources_sha256)")
        lines.append(line)
    return lines


def record_resume(run_dir: str | Path, step: int, changes: dict[str, list[Any]]) -> None:
    """Append the resume, and what it changed, to `<run dir>/resumes.jsonl`."""
    with open(Path(run_dir) / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "changed": changes}) + "\n")
