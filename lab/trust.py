"""Which `_target_`s a stored config may name before priorlab turns it back into objects.

A checkpoint carries the config that built its model, and `hydra.utils.instantiate`
calls whatever `_target_` that config names. A shared checkpoint is a file from
someone else, so its whole stored config is checked first (`check_trusted`): every
`_target_` anywhere in it must be trusted, and it may hold no interpolation (`${...}`).

Trusted without asking:

* the dataset factories priorlab ships (`TRUSTED_FACTORIES`), as the `data` node only;
* classes *defined* in priorlab's own packages (`priors`, `vae`, `surgery`), in nflows'
  transforms and distributions and in `torch.optim` that are `torch.nn.Module`s or torch
  optimizers: building one allocates tensors and touches no file;
* the trainer, its default callback and the logger classes priorlab's trainer records under
  `trainer`, `trainer.callbacks[0]` and `logger` (`RECORDED_TARGETS`); a checkpoint's loader
  never builds those nodes.

Anything else, a user's prior or encoder, is trusted only when the user names it in
`allow` (`parse_allow`): a list of module or class names, `allow=[mypkg]`,
`allow=[mypkg.*]` (the same: `mypkg` and its submodules) or `allow=[mypkg.priors.MyPrior]`.
A name admits a target only when the target is a class whose defining place
(`cls.__module__` + `cls.__qualname__`) lies in it, and the class is a `torch.nn.Module`
or a torch optimizer. So the path is never followed through an import:
`mypkg.torch.load` (a function) and `mypkg.torch.nn.Module` (a class defined in torch)
are refused under `allow=[mypkg.*]`. Functions are never trusted, not even priorlab's
own (`lab.surgery.write_json` writes a file).

A target is looked up the way Hydra looks it up (import the first name, then attributes,
importing a submodule where an attribute is missing), so the object checked is the
object Hydra would build; only the ancestors of a trusted package or `allow` name and
the modules inside it are imported, and a walk that reaches a module imported from
elsewhere stops there. A target outside every trusted package and `allow` name is
refused by its name alone, before any import.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
from omegaconf import ListConfig

from vae.validation import ConfigError

TRUSTED_FACTORIES = frozenset({"vae.data.mnist", "vae.data.digits", "vae.data.npz"})
#: Packages whose `nn.Module` and optimizer classes are trusted (a class must be defined inside one).
TRUSTED_CLASS_PACKAGES = ("priors", "vae", "surgery", "nflows.transforms", "nflows.distributions", "torch.optim")
#: priorlab's own top-level packages: never an `allow` name (their classes are trusted already).
PRIORLAB_PACKAGES = frozenset({"priors", "vae", "surgery", "lab", "train", "bench", "scripts", "tests"})
#: Targets the trainer writes into nodes that are recorded, never built, from a checkpoint.
#: `trainer.callbacks[0]` is the one entry of the default `trainer.callbacks` (conf/trainer/default.yaml);
#: a checkpoint whose config lists any other callback, or this one elsewhere, is refused.
RECORDED_TARGETS = {
    "trainer": frozenset({"vae.trainer.Trainer"}),
    "trainer.callbacks[0]": frozenset({"vae.callbacks.TrainingSetEncodings"}),
    "logger": frozenset({"vae.loggers.NullLogger", "vae.loggers.WandbLogger"}),
}
#: Top-level modules an `allow` name may never start with: the standard library (which holds
#: `os`, `builtins`, `pickle`, `subprocess`, `importlib`, ...) and libraries that can run code,
#: write files or unpickle, or whose classes the allowlist has no business widening.
CODE_RUNNING_MODULES = frozenset(sys.stdlib_module_names) | {
    "__main__",
    "torch",
    "torchvision",
    "torchaudio",
    "functorch",
    "triton",
    "numpy",
    "scipy",
    "sklearn",
    "pandas",
    "matplotlib",
    "PIL",
    "hydra",
    "hydra_plugins",
    "omegaconf",
    "antlr4",
    "yaml",
    "nflows",
    "wandb",
    "tqdm",
    "dill",
    "cloudpickle",
    "joblib",
    "submitit",
    "pip",
    "setuptools",
    "pkg_resources",
    "_pytest",
    "pytest",
    "IPython",
    "jinja2",
    "requests",
    "urllib3",
    "fsspec",
    "filelock",
    "psutil",
    "sympy",
    "networkx",
    "packaging",
    "git",
    "sh",
    "pexpect",
    "paramiko",
    "fabric",
    "invoke",
    "docker",
}
#: How deep a stored config may nest, and how many values it may hold. priorlab writes
#: configs four levels deep with about a hundred values; the bounds keep a crafted one
#: from exhausting the walk (or, later, OmegaConf's recursion).
MAX_DEPTH = 32
MAX_VALUES = 10_000


class UntrustedTargetError(ValueError):
    """A stored config names a `_target_` that is not trusted, or holds what priorlab does not load."""


# ---- allow -------------------------------------------------------------------------


def _dotted(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be an `allow` name, or None."""
    name = pattern.removesuffix(".*")
    if not _dotted(name):
        return "a name is a dotted module or class name, optionally ending in .* (mypkg, mypkg.*, mypkg.priors.MyPrior)"
    top = name.split(".", 1)[0]
    if top in PRIORLAB_PACKAGES:
        return f"{top} is priorlab's own package: its nn.Module and optimizer classes are trusted already"
    if top in CODE_RUNNING_MODULES or top.startswith("_"):
        return f"{top} is the standard library or a library that can run code, which allow may never admit"
    return None


def parse_allow(allow: Any) -> tuple[str, ...]:
    """The `allow` option as module or class names (`mypkg.*` -> `mypkg`); `ConfigError` if it is malformed.

    `allow` must be a list of strings (None or an empty list: nothing beyond priorlab's own).
    A bare string is refused: on the command line `allow=mypkg.*` is one, and read as a list
    it would be its characters.
    """
    if allow is None:
        return ()
    if isinstance(allow, str):
        hint = f"write allow=[{allow}], with the brackets" if allow else "leave it out, or write allow=[]"
        raise ConfigError(f"allow must be a list of module or class names, got the string {allow!r}; {hint}")
    if not isinstance(allow, (list, tuple, ListConfig)):
        raise ConfigError(f"allow must be a list of module or class names, got {type(allow).__name__} {allow!r}")
    names = []
    for pattern in allow:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ConfigError(f"allow must hold non-empty module or class names, got {pattern!r}")
        problem = _pattern_problem(pattern)
        if problem:
            raise ConfigError(f"allow holds {pattern!r}, which is refused: {problem}")
        names.append(pattern.removesuffix(".*"))
    return tuple(names)


# ---- looking a target up -------------------------------------------------------------


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


class _NotTrusted(Exception):
    """Why a located target is refused; `suggestion` is a safe `allow` name, if there is one."""

    def __init__(self, reason: str, suggestion: str | None = None) -> None:
        super().__init__(reason)
        self.suggestion = suggestion


def _locate(target: str, scope: str) -> Any:
    """The object `target` names, found as Hydra's `_locate` finds it, inside `scope`.

    Imports only prefixes of `target`, which (since `target` lies in `scope`) are ancestors
    of `scope` or modules inside it; a step onto a module imported from elsewhere
    (`mypkg.torch`) or onto anything but a module or class raises `_NotTrusted`.
    """
    parts = target.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except Exception as e:  # noqa: BLE001 (missing, or the package's own code failed; say so in one line)
        raise _NotTrusted(f"importing {parts[0]} failed: {type(e).__name__}: {e}") from None
    for m in range(1, len(parts)):
        parent, name = ".".join(parts[:m]), ".".join(parts[: m + 1])
        if isinstance(obj, ModuleType):
            child = getattr(obj, parts[m], _MISSING)
            if child is _MISSING:
                try:
                    child = importlib.import_module(name)
                except ModuleNotFoundError as e:
                    if e.name and _within(name, e.name):
                        raise _NotTrusted(f"{parent} has no attribute or submodule {parts[m]!r}") from None
                    raise _NotTrusted(f"importing {name} failed: {e}") from None
                except Exception as e:  # noqa: BLE001 (the module's own code failed; say so in one line)
                    raise _NotTrusted(f"importing {name} failed: {type(e).__name__}: {e}") from None
            if isinstance(child, ModuleType) and child.__name__ != name:
                raise _NotTrusted(
                    f"{name} is the module {child.__name__} imported into {parent}, not part of it; a name is "
                    "never followed through an import"
                )
        elif inspect.isclass(obj):
            child = getattr(obj, parts[m], _MISSING)
            if child is _MISSING:
                raise _NotTrusted(f"{parent} has no attribute {parts[m]!r}")
            if isinstance(child, ModuleType):
                raise _NotTrusted(f"{name} is the module {child.__name__} held by the class {parent}")
        else:
            raise _NotTrusted(f"{parent} is a {type(obj).__name__}, not a module or class")
        obj = child
    return obj


_MISSING = object()


def _check_class(target: str, scope: str) -> None:
    """Raise `_NotTrusted` unless `target` is an nn.Module or optimizer class defined inside `scope`."""
    obj = _locate(target, scope)
    if not inspect.isclass(obj):
        kind = "function" if inspect.isroutine(obj) else type(obj).__name__
        where = getattr(obj, "__module__", None)
        source = f" from {where}" if isinstance(where, str) and where != target.rpartition(".")[0] else ""
        raise _NotTrusted(f"it is a {kind}{source}, and only classes are ever built from a stored config")
    defined = f"{obj.__module__}.{obj.__qualname__}"
    if "<locals>" in obj.__qualname__ or not _within(defined, scope):
        common = _common_package(target, defined)
        suggestion = common if common and not _within(common, scope) and _pattern_problem(common) is None else None
        raise _NotTrusted(f"it is the class {defined}, defined outside {scope}", suggestion)
    if not issubclass(obj, (torch.nn.Module, torch.optim.Optimizer)):
        raise _NotTrusted(
            f"{defined} is a class but neither a torch.nn.Module nor a torch optimizer; only those are built "
            "from a stored config (building one allocates tensors and nothing else)"
        )


def _common_package(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _looks_like_a_users_class(target: str) -> bool:
    """Whether `target`, read by its name alone, may be a class of the user's own package.

    Not when its package is refused as an `allow` name, when a later part is a library's
    name (`mypkg.torch.load`, `mypkg.pathlib.Path`: reached through an import), or when its
    last part is not capitalized (a function, by Python's naming): proposing those would
    point the user at a name the check refuses anyway.
    """
    parts = target.split(".")
    return (
        len(parts) > 1
        and _pattern_problem(target) is None
        and not any(part in CODE_RUNNING_MODULES for part in parts[1:])
        and parts[-1][:1].isupper()
    )


def trust_problem(target: Any, allow: Iterable[str] = (), where: str | None = None) -> str | None:
    """Why a config may not name `target` at key path `where`, with the safe `allow` to propose; None if it may.

    Args:
        target: the `_target_` value.
        allow: names as `parse_allow` returns them (`mypkg`, `mypkg.priors.MyPrior`).
        where: the node's key path (`data`, `prior.layer`); None skips the placement rules
            (a factory is then trusted anywhere, a recorded target nowhere).
    """
    if not isinstance(target, str):
        return f"it is a {type(target).__name__}, not a dotted name"
    if not _dotted(target):
        return "it is not a dotted Python name"
    if target in TRUSTED_FACTORIES and where in (None, "data"):
        return None
    if where is not None and target in RECORDED_TARGETS.get(where, ()):
        return None
    reasons = []
    scopes = [p for p in TRUSTED_CLASS_PACKAGES if _within(target, p)]
    scopes += [name for name in allow if _within(target, name)]  # a module, or a class and its nested classes
    suggestion = None
    for scope in scopes:
        try:
            _check_class(target, scope)
            return None
        except _NotTrusted as e:
            reasons.append(str(e))
            suggestion = suggestion or e.suggestion
    top = target.split(".", 1)[0]
    if reasons:
        reason = reasons[-1]
    elif top in PRIORLAB_PACKAGES:
        reason = "priorlab trusts only the nn.Module and optimizer classes defined in its packages"
    elif top in CODE_RUNNING_MODULES or top.startswith("_"):
        reason = f"{top} is the standard library or a library that can run code, which is never trusted"
    else:
        reason = "it is not one of priorlab's classes"
    if not scopes and _looks_like_a_users_class(target):
        suggestion = target  # never looked at (nothing is imported for it): the narrowest name that admits it
    if suggestion:
        return f"{reason}; if it is your own class and you trust this file, pass allow=[{suggestion}]"
    return reason


def is_trusted(target: str, allow: Any = ()) -> bool:
    """Whether a config may name `target` (a dotted path) as a `_target_`; `allow` as the CLI option."""
    return trust_problem(target, parse_allow(allow)) is None


# ---- the stored config ---------------------------------------------------------------


def _node_of(path: str) -> str:
    """The key path of the node that holds the key at `path` (`prior.layer._target_` -> `prior.layer`)."""
    return path.removesuffix("_target_").removesuffix(".") or "<root>"


def walk_config(config: Any, source: str = "the stored config") -> Iterator[tuple[str, Any, Any]]:
    """Every `(key path, key, value)` of a nested dict/list config, walked with a stack, not recursion.

    Raises `UntrustedTargetError` for a config deeper than `MAX_DEPTH`, with more than
    `MAX_VALUES` values, with a key that is not a string, or holding a value OmegaConf
    would not store as written (anything but dicts, lists, strings, numbers, booleans, None).
    """
    queue: list[tuple[str, int, Any]] = [("", 0, config)]
    count = 0
    while queue:
        where, depth, node = queue.pop()
        count += 1
        if count > MAX_VALUES:
            raise UntrustedTargetError(f"{source} holds more than {MAX_VALUES:,} values; priorlab's hold a hundred")
        if isinstance(node, dict):
            items: Iterable[tuple[Any, Any]] = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            if node is not None and not isinstance(node, (str, int, float, bool)):
                raise UntrustedTargetError(f"{source} holds a {type(node).__name__} at {where or '<root>'}")
            continue
        if depth >= MAX_DEPTH and node:
            raise UntrustedTargetError(
                f"{source} nests deeper than {MAX_DEPTH} levels (at {where}); priorlab's configs are a few levels deep"
            )
        children = []
        for key, value in items:
            if isinstance(node, dict):
                if not isinstance(key, str):
                    raise UntrustedTargetError(f"{source} holds the non-string key {key!r} at {where or '<root>'}")
                path = f"{where}.{key}" if where else key
            else:
                path = f"{where}[{key}]"
            yield path, key, value
            children.append((path, depth + 1, value))
        queue.extend(reversed(children))  # the stack then pops them in the order they are written


def iter_targets(config: Any, source: str = "the stored config") -> Iterator[tuple[str, Any]]:
    """Every `(node's key path, _target_ value)` in a nested dict/list config."""
    for path, key, value in walk_config(config, source):
        if key == "_target_":
            yield _node_of(path), value


def check_trusted(config: dict[str, Any], allow: Any = (), source: str = "the stored config") -> None:
    """Raise `UntrustedTargetError` naming the first thing in the whole of `config` priorlab will not load.

    Every `_target_` anywhere must be trusted (`trust_problem`), and no key or string may
    hold an interpolation: priorlab stores configs resolved, and a resolver (`oc.env`,
    `oc.decode`) could read the environment or build a `_target_` this check never saw.
    The check walks the plain nested dict before OmegaConf sees it.

    Args:
        config: a plain nested dict (the checkpoint's `config`).
        allow: the `allow` option (a list of module or class names, `["mypkg.*"]`); checked
            by `parse_allow`.
        source: names the config in the error.
    """
    names = parse_allow(allow)
    targets = []
    for path, key, value in walk_config(config, source):
        if isinstance(key, str) and "${" in key:
            raise UntrustedTargetError(f"{source} holds an interpolation in the key at {path}; {_RESOLVED}")
        if isinstance(value, str) and "${" in value:
            raise UntrustedTargetError(f"{source} holds an interpolation at {path}; {_RESOLVED}")
        if key == "_target_":
            targets.append((_node_of(path), value))
    for where, target in targets:
        problem = trust_problem(target, names, where)
        if problem:
            raise UntrustedTargetError(f"{source} names _target_ {target!r} at {where}, which is refused: {problem}")


_RESOLVED = "priorlab writes resolved configs, so this file was edited by hand or by another tool and is not loaded"
