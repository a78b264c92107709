"""Writing a file so that a crash never leaves it half written, and a failed write says why."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

#: The errors a full disk (or a full quota) raises.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class WriteError(OSError):
    """A file could not be written; the message says which and why ("disk full: ..." when it is).

    An `OSError` (with the underlying errno), so the command-line tools report it on one line.
    """


def disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from or during, is a full disk or quota.

    torch's zip writer turns a failed `write` into `RuntimeError: ... unexpected pos ...`; the
    `OSError(ENOSPC)` behind it is kept only as its context, so the whole chain is searched.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (None if that cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def describe_write_failure(path: Path, error: BaseException) -> tuple[str, int | None]:
    """A one-line reason that writing `path` failed, and its errno ("disk full: ..." for a full disk)."""
    if disk_full(error):
        free = free_bytes(path.parent)
        shown = "" if free is None else f", {free / 2**20:.1f} MiB free there"
        return f"disk full: could not write {path}{shown}", errno.ENOSPC
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"could not write {path}: {reason}", getattr(error, "errno", None)


def temporary_path(path: str | Path) -> Path:
    """The temporary file `write_atomically` writes before renaming it onto `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then rename it onto `path` (`os.replace`).

    The data are flushed to the disk (`fsync`) before the rename: a full disk on a filesystem
    that allocates late surfaces then, not after `path` was replaced. If anything fails, the
    temporary file is removed, `path` is as it was, and a `WriteError` names the file and
    the reason ("disk full: ..." for a full disk or quota).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        message, code = describe_write_failure(path, e)
        failure = WriteError(message)
        failure.errno = code  # kept for callers; not passed to OSError(), whose str() would prefix "[Errno N]"
        raise failure from e
    except BaseException:  # KeyboardInterrupt, SystemExit: still no temporary file left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path
