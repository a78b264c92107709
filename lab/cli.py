"""One line, not a traceback, for errors a user can fix: shared by train.py and the CLIs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import InstantiationException

from lab.trust import UntrustedTargetError
from priors.base import PriorShapeError
from vae.checkpoint import RunDirError
from vae.data import DataError
from vae.validation import ConfigError

#: Errors whose message says what to fix: exit code 2. Anything else is reported on one line
#: too, with its type, and exit code 1; `debug=true` shows the traceback of either.
#: The Hydra config directory of every command, as an absolute path: a command started as
#: `python -m surgery` (an alias) is not its own module, so a relative path would be resolved
#: against the wrong package.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    RunDirError,
    UntrustedTargetError,
    PriorShapeError,
    OSError,
    ValueError,
    FloatingPointError,
)


def root_cause(error: BaseException) -> BaseException:
    """The error behind Hydra's instantiation wrapper (which prefixes a multi-line context)."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error


@contextmanager
def one_line_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn an exception raised inside the block into `prog: error: ...` on stderr and an exit code."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 (every error ends here, as one line)
        if debug:
            raise
        cause = root_cause(e)
        message = " ".join(str(cause).split()) or type(cause).__name__
        if isinstance(cause, USER_ERRORS):
            print(f"{prog}: error: {message}", file=sys.stderr)
            sys.exit(2)
        print(f"{prog}: error: {type(cause).__name__}: {message} (debug=true shows the traceback)", file=sys.stderr)
        sys.exit(1)
