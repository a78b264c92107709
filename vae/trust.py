"""Which `_target_`s a stored config may name before priorlab turns it back into objects.

A checkpoint carries the config that built its model, and `hydra.utils.instantiate`
calls whatever `_target_` that config names. A shared checkpoint is a file from
someone else, so its config is checked first: every `_target_` in it must be trusted.

Trusted without asking:

* the dataset factories priorlab ships (`TRUSTED_FACTORIES`);
* classes in priorlab's own packages (`priors`, `vae`, `surgery`) and in nflows'
  transforms and distributions that are `torch.nn.Module`s or torch optimizers:
  building one allocates tensors and touches no file;
* torch's own optimizers.

Functions are never trusted by package: `surgery.run.write_json` is priorlab's own and
writes a file. Anything else, a user's prior or encoder, is trusted only when the user
says so with glob patterns, `allow=[mypkg.*]` on the command line of `python -m surgery`
or `python -m priors.fit`.

Only modules under the trusted prefixes are ever imported to look a target up; a
target outside them is refused by its name alone, before any import.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

import torch

TRUSTED_FACTORIES = frozenset({"vae.data.mnist", "vae.data.digits", "vae.data.npz"})
TRUSTED_CLASS_PACKAGES = ("priors.", "vae.", "surgery.", "nflows.transforms.", "nflows.distributions.", "torch.optim.")


class UntrustedTargetError(ValueError):
    """A stored config names a `_target_` that is not trusted."""


def iter_targets(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every `(key path, _target_ value)` in a nested dict/list config."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where or "<root>", node["_target_"]
        for key, value in node.items():
            yield from iter_targets(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from iter_targets(value, f"{where}[{i}]")


def _locate_class(target: str) -> type | None:
    """The class `target` names, importing only its module; None if it is not a class."""
    module_name, _, attr = target.rpartition(".")
    while module_name:
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            attr = f"{head}.{attr}"
            continue
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        return obj if inspect.isclass(obj) else None
    return None


def is_trusted(target: str, allow: Iterable[str] = ()) -> bool:
    """Whether a config may name `target` (a dotted path) as a `_target_`."""
    if any(fnmatch.fnmatchcase(target, pattern) for pattern in allow):
        return True
    if target in TRUSTED_FACTORIES:
        return True
    if not target.startswith(TRUSTED_CLASS_PACKAGES):
        return False
    cls = _locate_class(target)
    return cls is not None and issubclass(cls, (torch.nn.Module, torch.optim.Optimizer))


def _interpolations(node: Any, where: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _interpolations(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _interpolations(value, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield where


def check_trusted(config: dict[str, Any], allow: Iterable[str] = (), source: str = "the stored config") -> None:
    """Raise `UntrustedTargetError` naming the first untrusted `_target_` in `config`.

    Interpolations are refused as well: priorlab stores configs resolved, and a resolver
    such as `oc.decode` could build a `_target_` this check never saw.

    Args:
        config: a plain nested dict (the checkpoint's `config`).
        allow: glob patterns of extra trusted targets, e.g. `["mypkg.*"]`.
        source: names the config in the error.
    """
    allow = list(allow)
    for where in _interpolations(config):
        raise UntrustedTargetError(
            f"{source} holds an interpolation at {where}; priorlab writes resolved configs, so this file "
            "was edited by hand or by another tool and is not loaded"
        )
    for where, target in iter_targets(config):
        if not isinstance(target, str) or not is_trusted(target, allow):
            raise UntrustedTargetError(
                f"{source} names _target_ {target!r} at {where}, which priorlab does not trust to run; "
                f"if it is your own class and you trust this file, pass allow=[{_suggest(target)}]"
            )


def _suggest(target: Any) -> str:
    return f"{str(target).split('.', 1)[0]}.*" if isinstance(target, str) and "." in target else str(target)
