"""Rebuild a trained model from a checkpoint, building only what the checkpoint may build.

A checkpoint may come from someone else, so nothing stored in it is taken on trust
(docs/checkpoints.md):

* the file is read with `torch.load(weights_only=True)`: its bytes never run code;
* its whole stored config is checked (`lab.trust.check_trusted`): trusted `_target_`s only,
  no interpolation, bounded depth;
* its weights must be finite;
* no stored value chooses a file: the stored `data.path` and `data.cache_dir` are never
  read (the data come from the default cache, or from `data_path=` on the command line);
* its stored sizes are bounded by the weights in the file: every tensor the stored config
  asks for while the model is built is sized on torch's `meta` device first, and the build
  stops before allocating more than the file's weights can account for
  (`AllocationBudget`);
* outputs go next to the checkpoint only when it sits in a priorlab run directory
  (`run_dir_of`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import vae.data
from lab.run_dir import CONFIG_FILE
from lab.trust import TRUSTED_FACTORIES, check_trusted, parse_allow
from vae import build_model, instantiate
from vae.checkpoint import METRICS_FILE, load_checkpoint
from vae.data import DataError
from vae.validation import ConfigError

log = logging.getLogger(__name__)

# The stored config's nodes that rebuild a model; nothing else in it is instantiated.
MODEL_NODES = ("data", "vae", "prior")
#: Data options that name a file or a directory: never taken from a stored config.
PATH_OPTIONS = ("path", "cache_dir")
#: What building a model may allocate, beyond its weights: priorlab's priors allocate at most
#: 2.6 times their weights' bytes while they are built (the VampPrior's pseudo-inputs pass
#: through the encoder), a prior built from the data may use the training split twice over,
#: and a fixed allowance covers small models.
BUDGET_PER_WEIGHT_BYTE = 8
BUDGET_PER_DATA_BYTE = 2
BUDGET_SLACK_BYTES = 16 * 2**20


class CheckpointError(ValueError):
    """The checkpoint cannot rebuild a model, or holds what priorlab does not load."""


def run_dir_of(checkpoint: str | Path, option: str | None = None) -> Path:
    """The run directory a checkpoint belongs to: `<run dir>/checkpoints/<name>.pt` -> `<run dir>`.

    Only priorlab's own layout has one: the file sits in a `checkpoints/` folder whose
    parent holds `.hydra/config.yaml` or `metrics.jsonl`. Anywhere else there is no
    directory that is the checkpoint's to write into (two levels up from a file in a
    download folder is someone's home), so `CheckpointError` asks for the output option.

    Args:
        checkpoint: the checkpoint file.
        option: the command's output option, named in the error (`output_dir`, `out_dir`);
            None names both.
    """
    given = Path(checkpoint).expanduser()
    path = given.resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {given} does not exist")
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {given} is a directory; give a checkpoint file, e.g. {given}/checkpoints/best.pt"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {given} is not a regular file")
    run_dir = path.parent.parent
    if path.parent.name == "checkpoints" and ((run_dir / CONFIG_FILE).is_file() or (run_dir / METRICS_FILE).is_file()):
        return run_dir
    say = f"{option}=DIR" if option else "output_dir=DIR (out_dir=DIR for python -m priors.fit)"
    raise CheckpointError(
        f"{given} is not in a priorlab run directory (<run dir>/checkpoints/<name>.pt beside <run dir>/{CONFIG_FILE} "
        f"or {METRICS_FILE}), so nothing is written next to it; say where the outputs go with {say}"
    )


def checkpoint_option(cfg: DictConfig) -> Path:
    """The command line's `checkpoint=` as a path; `ConfigError` when it is missing or not a path."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: checkpoint=<run dir>/checkpoints/best.pt")
    value = cfg.checkpoint
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"checkpoint must be the path of a checkpoint file, got {value!r}")
    return Path(value).expanduser()


def output_dir_option(checkpoint: Path, value: Any, option: str = "output_dir") -> Path:
    """Where a command's outputs go: `value` (the command line's `option`), else the checkpoint's run dir.

    `value` must be null or a directory path (existing or not); without it, `run_dir_of`
    decides, and refuses a checkpoint outside a priorlab run directory.
    """
    if value is None:
        return run_dir_of(checkpoint, option)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{option} must be a directory path, or null for the checkpoint's run directory; got {value!r}"
        )
    out = Path(value).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option}={value} is a file, not a directory")
    return out


def load_model(
    checkpoint: str | Path, device: Any = "cpu", allow: Iterable[str] | None = (), data_path: str | Path | None = None
) -> tuple[Any, Any, DictConfig]:
    """Rebuild (model, data, run config) from a priorlab checkpoint.

    The data are rebuilt as stored, except that no stored path is read: `data_path`
    (the user's copy of the data file) replaces the stored `data.path`, and without it the
    data come from the default cache (MNIST) or the load is refused (a `.npz` data set).

    The file is read with `torch.load(weights_only=True)` (via `vae.trainer.load_checkpoint`),
    so it is never unpickled; its whole stored config is checked by `lab.trust.check_trusted`
    before anything is instantiated (priorlab's own classes and dataset factories, nflows
    transforms and torch optimizers, plus the classes `allow` names); its weights must be
    finite; and the model is built under `AllocationBudget`, so stored sizes the weights do
    not account for are refused before they are allocated.

    Args:
        checkpoint: the checkpoint file.
        device: where the model goes.
        allow: the `allow` option: a list of module or class names (`["mypkg.*"]`); a bare
            string or a name that could admit code is refused (`lab.trust.parse_allow`).
        data_path: the user's copy of the data file.

    Raises:
        ConfigError: `allow` is malformed.
        UntrustedTargetError: the stored config holds what priorlab does not build.
        CheckpointError: the file's weights or sizes cannot rebuild a model.
        DataError: the data cannot be read.
    """
    names = parse_allow(allow)
    path = Path(checkpoint).expanduser()
    payload = load_checkpoint(path, map_location="cpu")
    config = payload.get("config")
    if not isinstance(config, dict) or not set(MODEL_NODES) <= set(config):
        raise CheckpointError(
            f"{path} holds no run config with data, vae and prior (was it written by priorlab's trainer?)"
        )
    check_trusted(config, names, source=str(path))
    state = model_state(payload, path)
    config = {**config, "data": data_options(config["data"], data_path, path)}
    run_cfg = OmegaConf.create(config)
    try:
        data = instantiate(run_cfg.data)
    except DataError as e:
        if data_path is not None:
            raise
        raise DataError(f"{e} (the data {path} was trained on); pass data_path=<your copy of that file>") from e
    model = build_bounded(run_cfg, data, state, path)
    try:
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the stored weights do not fit the model its config builds: {e}") from e
    return model.to(device), data, run_cfg


def model_state(payload: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights, each a dense tensor, all finite; else `CheckpointError`."""
    state = payload.get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source} holds no model weights")
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise CheckpointError(f"{source}: its model weights hold {key!r}, which is not a named dense tensor")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: its weight {key} holds {bad:,} NaN or infinite value(s) of {tensor.numel():,}; "
                "a model with non-finite weights gives no meaningful result, so it is not loaded"
            )
    return state


def data_options(node: Any, data_path: str | Path | None, source: Path) -> dict[str, Any]:
    """The stored data node with every path option dropped, and `data_path` as the path if given.

    The node must name one of priorlab's dataset factories with options it takes (no
    `_args_`, no nested nodes); `path` and `cache_dir` are set to the default (None), so
    MNIST comes from the default cache, or to `data_path`. A data set with no default
    file (`vae.data.npz`) needs `data_path`: `DataError` says so.
    """
    target = node.get("_target_") if isinstance(node, dict) else None
    if target not in TRUSTED_FACTORIES:
        raise CheckpointError(
            f"{source}: its data node names {target!r}; a checkpoint's data must be one of priorlab's "
            f"dataset factories ({', '.join(sorted(TRUSTED_FACTORIES))})"
        )
    params = inspect.signature(getattr(vae.data, target.rpartition(".")[2])).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # a wrapped factory

    def takes(key: str) -> bool:
        return key in params or (any_keyword and not key.startswith("_"))

    for key, value in node.items():
        if key != "_target_" and not takes(key):
            raise CheckpointError(f"{source}: its data node holds {key!r}, which {target} does not take")
        if isinstance(value, dict):
            raise CheckpointError(f"{source}: its data option {key} is a node, not a value")
    options = dict(node)
    stored = {key: options[key] for key in PATH_OPTIONS if options.get(key) is not None}
    for key in PATH_OPTIONS:
        if key in params or key in options:
            options[key] = None
    if data_path is not None:
        if not takes("path"):
            raise CheckpointError(f"{source}: its data ({target}) take no path, so data_path cannot apply")
        options["path"] = str(data_path)
    elif "path" in params and params["path"].default is inspect.Parameter.empty:
        said = (
            f"were read from data.path={stored['path']}, and priorlab never reads a file a checkpoint names"
            if "path" in stored
            else "need a file, and the checkpoint names none"
        )
        raise DataError(f"{source}: its data ({target}) {said}; pass data_path=<your copy of that file>")
    if stored and data_path is None:
        log.info(
            "%s: not reading the stored %s; the data come from the default cache (data_path= reads your copy)",
            source,
            ", ".join(f"data.{key}={value}" for key, value in stored.items()),
        )
    return options


# ---- stored sizes bounded by the file ---------------------------------------------------


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    storages = [t.untyped_storage() for t in tensors]  # held, so that no id below is reused
    seen = {s.data_ptr() if s.data_ptr() else id(s): s.nbytes() for s in storages}
    return sum(seen.values())


class BudgetExceeded(CheckpointError):
    """Building the model would allocate more than the checkpoint's weights account for."""


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _fresh_bytes(func: Any, out: Any) -> int:
    """Bytes of the tensors `func` returned that are new (not views of, or writes into, its inputs)."""
    returns = func._schema.returns
    if len(returns) == 1:  # one tensor, or one list of them (`Tensor[]`)
        fresh = _tensors(out) if returns[0].alias_info is None else []
    else:
        fresh = [t for v, r in zip(out, returns, strict=False) if r.alias_info is None for t in _tensors(v)]
    return storage_bytes(fresh)


class AllocationBudget(TorchDispatchMode):
    """Refuse, before it happens, any tensor allocation past a budget of bytes.

    Each torch operation that returns a new tensor is first run on the `meta` device,
    which computes shapes and allocates nothing; if its outputs would take the budget past
    its end, `BudgetExceeded` is raised and the real operation never runs. An operation
    meta cannot run (one that reads values, such as `.item()`) runs for real and is
    counted afterwards.

    Args:
        budget: bytes the block may allocate in all.
        describe: a prefix for the error (the checkpoint and what it holds).
    """

    def __init__(self, budget: int, describe: str) -> None:
        super().__init__()
        self.budget = budget
        self.used = 0
        self.describe = describe
        self.refused: BudgetExceeded | None = None

    def _spend(self, func: Any, out: Any, predicted: bool) -> None:
        need = _fresh_bytes(func, out)
        if self.used + need > self.budget:
            shapes = [list(t.shape) for t in _tensors(out)]
            self.refused = BudgetExceeded(
                f"{self.describe}; building it {'would allocate' if predicted else 'allocated'} a tensor of shape "
                f"{shapes[0] if len(shapes) == 1 else shapes} ({_size(need)}), past the {_size(self.budget)} its "
                "weights account for: its stored sizes do not match its weights, so it is not built"
            )
            raise self.refused
        self.used += need

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if any(r.alias_info is None for r in func._schema.returns):
            meta_kwargs = _to_meta(kwargs)
            if any(a.name == "device" for a in func._schema.arguments):
                meta_kwargs["device"] = torch.device("meta")
            try:
                shapes = func(*_to_meta(args), **meta_kwargs)
            except Exception:  # noqa: BLE001 (no meta kernel, or a value is read: run it, then count)
                shapes = None
            if shapes is not None and all(t.is_meta for t in _tensors(shapes)):
                self._spend(func, shapes, predicted=True)
                return func(*args, **kwargs)
            out = func(*args, **kwargs)
            self._spend(func, out, predicted=False)
            return out
        return func(*args, **kwargs)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def build_bounded(run_cfg: DictConfig, data: Any, state: dict[str, torch.Tensor], source: Path) -> Any:
    """`vae.build_model(run_cfg, data)` under an `AllocationBudget` set by the file's weights and the data."""
    weights = storage_bytes(state.values())
    train = data.split("train")
    budget = BUDGET_PER_WEIGHT_BYTE * weights + BUDGET_PER_DATA_BYTE * train.numel() * train.element_size()
    guard = AllocationBudget(budget + BUDGET_SLACK_BYTES, f"{source} holds {_size(weights)} of weights")
    try:
        with guard:
            return build_model(run_cfg, data)
    except Exception:
        if guard.refused is not None:  # however the model's code wrapped it (Hydra does)
            raise guard.refused from None
        raise
