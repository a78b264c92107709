"""Checks of user-given options, each failing with one line that names the option and what it takes."""

from __future__ import annotations

import inspect
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.utils import get_object


class ConfigError(ValueError):
    """An option has a value priorlab cannot use."""


def check_int(name: str, value: Any, minimum: int, *, allow_none: bool = False) -> int | None:
    """`value` if it is an integer >= `minimum` (or None when allowed); else `ConfigError`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {bound}{' or null' if allow_none else ''}, got {value!r}")
    return value


def check_number(name: str, value: Any, minimum: float, *, strict: bool = False) -> float:
    """`value` as a float if it is a real number >= `minimum` (> with `strict`); else `ConfigError`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if not ok or value < minimum or (strict and value == minimum):
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_sizes(name: str, value: Any) -> tuple[int, ...]:
    """`value` as a tuple if it is a non-empty list of positive integers (layer widths); else `ConfigError`."""
    ok = isinstance(value, (list, tuple)) or (
        hasattr(value, "__iter__") and not isinstance(value, (str, bytes, Mapping))
    )
    items = list(value) if ok else []
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        shown = items if ok else value
        raise ConfigError(f"{name} must be a non-empty list of positive integers (layer widths), got {shown!r}")
    return tuple(items)


def check_text(name: str, value: Any, *, allow_none: bool = False) -> str | None:
    """`value` if it is a non-empty string (None when allowed); else `ConfigError`."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string{' or null' if allow_none else ''}, got {value!r}")
    return value


def check_regular_file(name: str, value: Any, what: str = "a file", error: type[Exception] = ConfigError) -> Path:
    """`value` as a `Path` (`~` expanded) if it names an existing regular file; else `error`.

    A device, FIFO or socket is refused without being opened: reading `/dev/zero` or a FIFO
    never ends, so nothing downstream (a checksum, a loader) may see one.
    """
    if not isinstance(value, Path):
        check_text(name, value)
    path = Path(value).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{name}={value} does not exist; pass {what}") from None
    except OSError as e:  # a permission error on a parent, a name too long, ...
        raise error(f"{name}={value} cannot be read ({e.strerror or e}); pass {what}") from None
    if stat.S_ISDIR(mode):
        raise error(f"{name}={value} is a directory; pass {what}")
    if not stat.S_ISREG(mode):
        raise error(f"{name}={value} is not a regular file (a device, FIFO or socket); pass {what}")
    return path


def check_arguments(
    name: str, function: Callable[..., Any], options: Mapping[str, Any], given: Iterable[str] = ()
) -> dict[str, Any]:
    """Bind `options` (a config node's keys) to `function`'s signature; return every argument, defaults filled.

    Refuses, naming the node, a key the function does not take and an argument it needs that
    the node does not give. `given` are the arguments the caller passes itself (`data_dim`,
    `latent_dim`), which the node must not set.
    """
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(options)
    given = set(given)
    accepted = [k for k in parameters if k not in given]
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ConfigError(
            f"{name}: unknown option(s) {', '.join(unknown)}; {getattr(function, '__qualname__', function)} takes "
            f"{', '.join(accepted) or 'none'}"
        )
    missing = [
        k
        for k in accepted
        if k not in options
        and parameters[k].default is inspect.Parameter.empty
        and parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if missing:
        raise ConfigError(f"{name}: {', '.join(f'{name}.{k}' for k in missing)} must be given")
    return {
        k: options.get(k, p.default)
        for k, p in parameters.items()
        if k not in given and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def check_targets(node: Any, key: str = "") -> None:
    """Every `_target_` in the config must import: a typo is one line naming its key, before any work."""
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None:
            name = f"{key}._target_" if key else "_target_"
            check_text(name, target)
            try:
                get_object(target)
            except Exception as e:  # noqa: BLE001 (Hydra raises ImportError, ValueError, ... for a bad path)
                cause = " ".join(str(e.__cause__ or e).split())
                raise ConfigError(f"{name}={target} cannot be imported: {cause}") from None
        for k, v in node.items():
            check_targets(v, f"{key}.{k}" if key else str(k))
