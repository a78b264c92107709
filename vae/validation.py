"""Checks of user-given options, each failing with one line that names the option and what it takes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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
