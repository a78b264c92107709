"""The training loop shared by every prior, and by the post-hoc fit of a prior (`lab.fit`).

`Trainer.fit` reads top to bottom: per epoch it draws the epoch's binarization and
order, loops over batches (loss, backward, step), lets the callbacks do the epoch's work
(`vae.callbacks`: by default re-encoding the training set for the priors built on it),
evaluates on the validation split, appends a line to `metrics.jsonl`, and writes
`checkpoints/last.pt` (and `best.pt` when the validation ELBO improved), each atomically.
Parts of the model named in `freeze` keep their parameters; the optimizer sees only the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from vae.callbacks import HOOKS
from vae.checkpoint import (
    CHECKPOINT_FORMAT,
    METRICS_FILE,
    RunDirError,
    check_checkpoint_file,
    load_checkpoint,
    run_files,
    save_checkpoint,
)
from vae.data import EVAL_NOISE_SALT, TRAIN_ORDER_SALT, BinarizedData, derive_seed
from vae.files import WriteError, describe_write_failure, write_atomically
from vae.loggers import NullLogger
from vae.model import VAE
from vae.optim import load_optimizer_state
from vae.validation import ConfigError, check_bool, check_int, check_number

log = logging.getLogger(__name__)

#: Where a resume keeps the metrics lines of the epochs it trains again (they leave metrics.jsonl).
SUPERSEDED_METRICS = "metrics_superseded.jsonl"
DEFAULT_OPTIMIZER = partial(torch.optim.Adam, lr=1e-3)
#: The callbacks of a trainer built without `callbacks`: the `_target_` nodes of
#: conf/trainer/default.yaml's `trainer.callbacks`, equal to its resolved value, so a run
#: started before the option existed resumes with it (`lab.run_dir.resume_changes`). Read only.
DEFAULT_CALLBACKS: list[dict[str, Any]] = [{"_target_": "vae.callbacks.TrainingSetEncodings"}]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite, or diverged; the last good checkpoint is kept."""


class CheckpointWriteError(WriteError):
    """A checkpoint or metrics line could not be written; the message says why and how to continue.

    Training stops, and the run directory is left so that the advice in the message works:
    metrics.jsonl holds no line past the checkpoint a resume starts from.
    """


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps taken in all
    best_val_elbo: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0  # validations since the last improvement


@dataclass
class EvalResult:
    """Mean per-point terms over a split, in nats."""

    elbo: float
    reconstruction: float
    kl: float


@torch.no_grad()
def evaluate(model: VAE, x: Tensor, batch_size: int = 1000, seed: int = 0) -> EvalResult:
    """One-sample ELBO over all of `x`, with its own seeded noise.

    The noise comes from a forked RNG, so evaluating does not disturb the training
    stream (a resumed run stays bit-identical) and the same model always scores the same.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # A stream of its own: seeding with `seed` itself would replay the draws that
        # initialized the model after `torch.manual_seed(seed)` (a mixture prior's means,
        # say) as evaluation noise.
        torch.manual_seed(derive_seed(seed, EVAL_NOISE_SALT))
        for start in range(0, len(x), batch_size):
            terms = model.elbo_terms(x[start : start + batch_size].to(device))
            totals += torch.stack([terms.reconstruction.sum(), terms.kl.sum()]).double().cpu()
    model.train(was_training)
    recon, kl = (totals / len(x)).tolist()
    return EvalResult(elbo=recon - kl, reconstruction=recon, kl=kl)


class LossWatch:
    """Watches the training loss on its device; `check` reads it (one synchronization) and stops a bad run.

    It keeps the first step whose loss is not finite, and counts the steps since the last
    check whose loss exceeded `bound`: when all of them did, the run has diverged.
    """

    def __init__(self, device: torch.device, bound: float, steps_per_epoch: int, last_path: Path) -> None:
        self.bound = bound
        self.steps_per_epoch = steps_per_epoch
        self.last_path = last_path
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), dtype=torch.float64, device=device)
        self.absurd = torch.zeros((), dtype=torch.long, device=device)
        self.steps: list[int] = []  # steps since the last check

    def update(self, loss: Tensor, step: int) -> None:
        loss = loss.detach().double()
        new_bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad_value = torch.where(new_bad, loss, self.bad_value)
        self.absurd += loss > self.bound
        self.steps.append(step)

    def _where(self, step: int) -> str:
        epoch, batch = divmod(step - 1, self.steps_per_epoch)
        return f"step {step} (epoch {epoch + 1}, batch {batch + 1})"

    def check(self, bar: Any = None) -> None:
        if not self.steps:
            return
        first_bad, bad_value, absurd = int(self.first_bad), float(self.bad_value), int(self.absurd)
        steps, self.steps = self.steps, []
        self.absurd.zero_()
        kept = f"The last good checkpoint is kept at {self.last_path}" + (
            "" if self.last_path.exists() else " (none was written yet)"
        )
        if first_bad >= 0:
            message = f"loss is {bad_value} at {self._where(first_bad)}; training stopped. {kept}"
        elif absurd == len(steps):
            message = (
                f"the loss exceeded {self.bound:.3g} nats (trainer.max_loss_per_dim per pixel) at every step from "
                f"{self._where(steps[0])} to step {steps[-1]}: training diverged and was stopped. {kept}"
            )
        else:
            return
        if bar is not None:
            bar.close()
        raise NonFiniteLossError(message)


def batch_loss(model: VAE, x: Tensor, index: Tensor, kl_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The training loss of one batch (the negative KL-weighted ELBO, averaged), and the sums of its
    reconstruction and KL terms. `kl_weight` is a 0-d tensor, so a compiled copy of this function
    serves every step of the warm-up without recompiling."""
    terms = model.elbo_terms(x, index)
    loss = -(terms.reconstruction - kl_weight * terms.kl).mean()
    return loss, terms.reconstruction.sum(), terms.kl.sum()


def _compile_option(value: Any) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ConfigError(f"trainer.compile must be auto, true or false, got {value!r}")


def _freeze_names(freeze: Any) -> tuple[str, ...]:
    """`trainer.freeze` as a tuple of submodule names; `ConfigError` unless it is a list of dotted names."""
    if freeze is None:
        return ()
    if isinstance(freeze, str):
        raise ConfigError(
            f"trainer.freeze must be a list of the model's parts, got the string {freeze!r}; "
            f"write trainer.freeze=[{freeze}]"
        )
    if not isinstance(freeze, (Sequence, ListConfig)):
        raise ConfigError(
            f"trainer.freeze must be a list of the model's parts (encoder, decoder, prior), got {freeze!r}"
        )
    names = []
    for name in freeze:
        if not isinstance(name, str) or not name or not all(part.isidentifier() for part in name.split(".")):
            raise ConfigError(
                f"trainer.freeze must hold names of the model's parts (encoder, decoder, prior), got {name!r}"
            )
        names.append(name)
    return tuple(names)


def _build_callbacks(callbacks: Any) -> list[Any]:
    """`trainer.callbacks` as callback objects: `_target_` mappings built, each checked to have a hook.

    A public method named `on_...` that is not a hook is refused: a misspelled hook would
    otherwise never run, silently.
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, Mapping, DictConfig)) or not isinstance(callbacks, (Sequence, ListConfig)):
        raise ConfigError(f"trainer.callbacks must be a list of callbacks (_target_ nodes), got {callbacks!r}")
    built = []
    for i, entry in enumerate(callbacks):
        where = f"trainer.callbacks[{i}]"
        if isinstance(entry, (Mapping, DictConfig)):
            if "_target_" not in entry:
                raise ConfigError(f"{where} must be a _target_ node or a callback, got {entry!r}")
            node = entry if isinstance(entry, DictConfig) else OmegaConf.create(dict(entry))
            entry = hydra.utils.instantiate(node)
        kind = type(entry).__qualname__
        unknown = sorted(n for n in dir(entry) if n.startswith("on_") and n not in HOOKS)
        if unknown:
            raise ConfigError(
                f"{where} ({kind}) has {', '.join(unknown)}, which the trainer never calls; "
                f"its hooks are {', '.join(HOOKS)}"
            )
        if not any(callable(getattr(entry, hook, None)) for hook in HOOKS):
            raise ConfigError(f"{where} ({kind}) has none of the trainer's hooks ({', '.join(HOOKS)})")
        built.append(entry)
    return built


def flushes_denormals() -> bool:
    """Whether the CPU flushes denormal floats to zero in this thread now (a float32 probe)."""
    return bool(torch.tensor([1e-39], dtype=torch.float32).mul_(1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True):
    """Flush denormal floats to zero (`torch.set_flush_denormal`) inside the block; restore the setting after."""
    before = flushes_denormals()
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


class Trainer:
    """Adam (or any `_partial_` optimizer) on the negative ELBO, with KL warm-up and early stopping.

    Every argument is checked when the trainer is built, before any data is loaded.

    Args:
        optimizer: a callable taking the parameters (a Hydra `_partial_` node).
        batch_size: training batch size.
        max_epochs: epochs to train at most.
        max_steps: optimizer steps at most (None: no limit).
        max_seconds: a wall-clock budget for one call of `fit`, checked after every optimizer
            step (so at least one step is taken): past it, training stops and validates and
            checkpoints as at `max_steps` (None: no limit).
        warmup_epochs: the KL weight rises linearly from 0 to 1 over this many epochs.
        patience: stop after this many validations without a better validation ELBO, counted
            only once the KL warm-up has ended (during it the counter is held at 0).
        eval_batch_size: batch size of the validation pass.
        log_every_n_steps: how often the loss goes to the logger and progress bar, and is
            checked: training stops at the first non-finite loss, or when every loss of one
            interval exceeds `max_loss_per_dim` nats per pixel (a divergence).
        max_loss_per_dim: that bound, per data dimension.
        resume: False; True to continue from `run_dir/checkpoints/last.pt` (if it
            exists; in a directory that holds no run yet, training starts fresh, as a
            pre-empted job's first try does; in one that holds a run without `last.pt`, it is
            an error that names the files and the choices); or a checkpoint path.
        progress: show a progress bar.
        run_dir: where `metrics.jsonl` and `checkpoints/` go.
        device: the torch device to train on.
        seed: seeds the per-epoch order of the training set.
        flush_denormal: while `fit` runs, flush denormal floats (below ~1e-38 in float32) to
            zero on the CPU (`flush_denormals`). Vanishing softmax weights, such as a far
            neighbour's in the exemplar prior, otherwise reach the encoder's backward pass as
            denormals, which the CPU computes tens of times slower: measured, a 20% longer
            exemplar epoch and twice as long with fused Adam. Nothing a loss can see changes.
        callbacks: the callbacks, called in this order (`vae.callbacks.Callback`): objects
            with one or more of the hooks `vae.callbacks.HOOKS`, or `_target_` mappings that
            build one. The default is the training-set encodings the aggregate and exemplar
            priors need (`DEFAULT_CALLBACKS`); `[]` or None: none.
        freeze: names of the model's submodules (`encoder`, `decoder`, `prior`, or a dotted
            path such as `prior.flow`) whose parameters stay fixed: while `fit` runs they
            do not require gradients and are run in eval mode, and the optimizer gets only
            the other parameters (afterwards their `requires_grad` is as before). None: none.
        compile: run each batch's loss, and its backward pass, through `torch.compile`
            (`batch_loss`): true, false, or auto, which compiles on a CUDA device (where a step
            of small kernels is launch-bound) and not on a CPU (bench/train_speed.py
            measures both). The compiled step matches the eager one to floating-point
            rounding; the first steps pay the compilation.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] = DEFAULT_OPTIMIZER,
        batch_size: int = 100,
        max_epochs: int = 10,
        max_steps: int | None = None,
        warmup_epochs: float = 0,
        patience: int = 10,
        eval_batch_size: int = 1000,
        log_every_n_steps: int = 50,
        max_loss_per_dim: float = 1000.0,
        resume: bool | str = False,
        progress: bool = True,
        run_dir: str | Path = ".",
        device: torch.device | str = "cpu",
        seed: int = 0,
        flush_denormal: bool = True,
        callbacks: Sequence[Any] | None = DEFAULT_CALLBACKS,
        max_seconds: float | None = None,
        freeze: Sequence[str] | None = None,
        compile: bool | str = "auto",
    ) -> None:
        if not callable(optimizer):
            raise ConfigError(f"trainer.optimizer must be a _partial_ optimizer node, got {optimizer!r}")
        try:  # the optimizer checks its own options (a negative lr, say) when built: build one now
            optimizer([torch.zeros(1, requires_grad=True)])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"trainer.optimizer: {e}") from e
        self.optimizer = optimizer
        self.batch_size = check_int("trainer.batch_size", batch_size, 1)
        self.max_epochs = check_int("trainer.max_epochs", max_epochs, 1)
        self.max_steps = check_int("trainer.max_steps", max_steps, 1, allow_none=True)
        self.warmup_epochs = check_number("trainer.warmup_epochs", warmup_epochs, 0)
        self.patience = check_int("trainer.patience", patience, 1)
        self.eval_batch_size = check_int("trainer.eval_batch_size", eval_batch_size, 1)
        self.log_every_n_steps = check_int("trainer.log_every_n_steps", log_every_n_steps, 1)
        self.max_loss_per_dim = check_number("trainer.max_loss_per_dim", max_loss_per_dim, 0, strict=True)
        if (not isinstance(resume, (bool, str, Path)) and resume is not None) or (
            isinstance(resume, str) and not resume.strip()
        ):
            raise ConfigError(f"trainer.resume must be true, false or a checkpoint path, got {resume!r}")
        self.resume = resume
        self.progress = check_bool("trainer.progress", progress)
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.seed = check_int("seed", seed, 0)
        self.flush_denormal = check_bool("trainer.flush_denormal", flush_denormal)
        self.max_seconds = (
            None if max_seconds is None else check_number("trainer.max_seconds", max_seconds, 0, strict=True)
        )
        self.freeze = _freeze_names(freeze)
        self.compile = _compile_option(compile)
        self.callbacks = _build_callbacks(callbacks)
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.metrics_path = self.run_dir / METRICS_FILE

    @property
    def compiles(self) -> bool:
        """Whether `fit` compiles the training step (`compile`, with auto settled by the device)."""
        return self.device.type == "cuda" if self.compile == "auto" else bool(self.compile)

    def load_best(self, model: VAE, state: TrainState) -> None:
        """Load best.pt into `model`, after checking that it holds the best validation epoch.

        A run continued elsewhere (another machine, a copy of last.pt alone) can leave an
        older best.pt behind; evaluating it silently would report the wrong model.
        """
        stored = load_checkpoint(self.best_path, map_location=self.device)
        saved = stored.get("state") or {}
        epoch = saved.get("best_epoch")  # at its save, the checkpoint was the best so far
        if (epoch, saved.get("best_val_elbo")) != (state.best_epoch, state.best_val_elbo):
            raise ValueError(
                f"{self.best_path} holds epoch {epoch}, but the best validation ELBO was at epoch "
                f"{state.best_epoch} (was the run continued from a copy of last.pt without its best.pt?); "
                "evaluate the checkpoint you want with `python -m surgery checkpoint=PATH`"
            )
        model.load_state_dict(stored["model"])

    @property
    def resume_path(self) -> Path | None:
        """The checkpoint `fit` will continue from, or None for a fresh start.

        `resume=True` never starts over in a directory that holds a run: without `last.pt`
        there (a run committed with best.pt and metrics.jsonl only, or one whose first
        checkpoint write failed after a resume from another file), it raises `RunDirError`
        naming what is there and the choices.
        """
        if self.resume is False or self.resume is None:
            return None
        if self.resume is True:
            if self.last_path.exists():
                return self.last_path
            found = run_files(self.run_dir)
            if found:
                raise RunDirError(self._no_last_message(found))
            return None
        path = Path(self.resume).expanduser()
        label = f"trainer.resume={self.resume}"
        check_checkpoint_file(path, label, f"trainer.resume={path / 'checkpoints' / 'last.pt'}")
        return path

    def _no_last_message(self, found: list[str]) -> str:
        checkpoints = [f for f in found if f.endswith(".pt")]
        if "checkpoints/best.pt" in checkpoints:
            choices = f"continue from the best state with trainer.resume={self.best_path}"
        elif checkpoints:
            choices = "continue from one of them with trainer.resume=" + " or trainer.resume=".join(
                str(self.run_dir / f) for f in checkpoints
            )
        else:
            choices = "it has no checkpoint to continue from"
        return (
            f"trainer.resume=true: {self.run_dir} holds a run ({', '.join(found)}) but no checkpoints/last.pt, "
            f"so it cannot continue where it stopped and will not start over on top of it; {choices}, "
            "or start a new run in another directory (hydra.run.dir=...)"
        )

    def fit(
        self, model: VAE, data: BinarizedData, run_config: dict[str, Any] | None = None, logger: Any = None
    ) -> TrainState:
        """Train `model` on `data`; return the final `TrainState`.

        Args:
            model: the VAE.
            data: the data set.
            run_config: the resolved config, stored in every checkpoint so that a checkpoint
                alone rebuilds its model.
            logger: a `vae.loggers` logger (None: log nothing).
        """
        frozen = self._frozen_modules(model)
        grads = [(p, p.requires_grad) for m in frozen for p in m.parameters()]
        try:
            for p, _ in grads:
                p.requires_grad_(False)
            with flush_denormals(self.flush_denormal):
                return self._fit(model, data, run_config, logger, frozen)
        finally:
            for p, requires_grad in grads:
                p.requires_grad_(requires_grad)

    def _frozen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The submodules `freeze` names; `ConfigError` for a name the model lacks."""
        frozen = []
        for name in self.freeze:
            try:
                frozen.append(model.get_submodule(name))
            except AttributeError:
                children = ", ".join(n for n, _ in model.named_children())
                raise ConfigError(
                    f"trainer.freeze names {name!r}, which the model does not have (its parts: {children})"
                ) from None
        return frozen

    def _trained_parameters(self, model: nn.Module, frozen: list[nn.Module]) -> Any:
        """What the optimizer gets: every parameter, or without `freeze`'s, in the model's order."""
        if not frozen:
            return model.parameters()  # as before `freeze` existed: resumed optimizer states match
        fixed = {id(p) for m in frozen for p in m.parameters()}
        params = [p for p in model.parameters() if id(p) not in fixed]
        if not any(p.requires_grad for p in params):
            raise ConfigError(f"trainer.freeze={list(self.freeze)} leaves no parameter to train")
        return params

    def _call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            if method is not None:
                method(self, *args)

    def _fit(
        self,
        model: VAE,
        data: BinarizedData,
        run_config: dict[str, Any] | None,
        logger: Any,
        frozen: list[nn.Module],
    ) -> TrainState:
        logger = logger or NullLogger()
        model.to(self.device)
        optimizer = self.optimizer(self._trained_parameters(model, frozen))
        self._remove_stale_temporaries()
        state = self._maybe_resume(model, optimizer)
        n_train = len(data.grey["train"])
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        warmup_steps = self.warmup_epochs * steps_per_epoch
        loss_bound = self.max_loss_per_dim * data.data_dim
        val_x = data.split("val")
        deadline = None if self.max_seconds is None else time.perf_counter() + self.max_seconds
        out_of_time = False
        self._call("on_fit_start", model, data, state)
        # Static shapes (an epoch's smaller last batch compiles once more), and the random draws
        # of eager torch: a compiled run draws the same noise as an eager one, so both resume alike.
        step_loss = (
            torch.compile(batch_loss, dynamic=False, options={"fallback_random": True}) if self.compiles else batch_loss
        )
        kl_weight_t = torch.zeros((), device=self.device)
        if self._stopped_early(state):  # a resumed run that had stopped: nothing to train
            log.info(
                "early stopping: the run had stopped at epoch %d (best %d); a larger trainer.patience continues it",
                state.epoch,
                state.best_epoch,
            )

        while (
            state.epoch < self.max_epochs
            and not self._out_of_steps(state)
            and not out_of_time
            and not self._stopped_early(state)
        ):
            started = time.perf_counter()
            # The epoch's binarization and order are drawn on the CPU (the same on every device)
            # and moved once: the batches are then sliced on the device, with no copy per step.
            x_epoch = data.train_epoch(state.epoch).to(self.device)
            order = torch.randperm(
                n_train, generator=torch.Generator().manual_seed(derive_seed(self.seed, TRAIN_ORDER_SALT, state.epoch))
            ).to(self.device)

            model.train()
            for module in frozen:
                module.eval()
            # Kept on the device and read at the logging interval: no synchronization per step.
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, reconstruction, kl
            watch = LossWatch(self.device, loss_bound, steps_per_epoch, self.last_path)
            n_seen = 0
            bar = tqdm(
                range(state.batch_in_epoch, steps_per_epoch),
                desc=f"epoch {state.epoch + 1}/{self.max_epochs}",
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            )
            for batch in bar:
                if self._out_of_steps(state) or out_of_time:
                    break
                index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
                x = x_epoch[index]
                kl_weight = self._kl_weight(state.step + 1, warmup_steps)

                loss, recon_sum, kl_sum = step_loss(model, x, index, kl_weight_t.fill_(kl_weight))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                state.step += 1
                state.batch_in_epoch = batch + 1
                n_seen += len(x)
                out_of_time = deadline is not None and time.perf_counter() >= deadline
                with torch.no_grad():
                    sums += torch.stack([loss * len(x), recon_sum, kl_sum]).double()
                    watch.update(loss, state.step)
                if state.step % self.log_every_n_steps == 0:
                    watch.check(bar)
                    mean = (sums / n_seen).tolist()
                    bar.set_postfix(loss=f"{mean[0]:.2f}", elbo=f"{mean[1] - mean[2]:.2f}")
                    logger.log({"train/loss": loss.item(), "train/kl_weight": kl_weight}, step=state.step)
            watch.check(bar)
            bar.close()

            epoch_done = state.batch_in_epoch == steps_per_epoch
            if epoch_done:  # a mid-epoch stop keeps the epoch's state, so a resumed run continues it exactly
                self._call("on_train_epoch_end", model, data, state)
            val = evaluate(model, val_x, self.eval_batch_size, seed=self.seed)
            improved = val.elbo > state.best_val_elbo
            if improved:
                state.best_val_elbo, state.best_epoch, state.bad_evals = val.elbo, state.epoch + 1, 0
            elif self._kl_weight(state.step, warmup_steps) < 1.0:  # the objective still moves: patience waits
                state.bad_evals = 0
            else:
                state.bad_evals += 1
            loss_sum, recon_sum, kl_sum = sums.tolist()
            per_point = 1 / max(n_seen, 1)
            record = {
                "epoch": state.epoch + 1,
                "step": state.step,
                "complete_epoch": epoch_done,
                "train_loss": loss_sum * per_point,
                "train_elbo": (recon_sum - kl_sum) * per_point,
                "train_reconstruction": recon_sum * per_point,
                "train_kl": kl_sum * per_point,
                "val_elbo": val.elbo,
                "val_reconstruction": val.reconstruction,
                "val_kl": val.kl,
                "kl_weight": kl_weight if n_seen else None,
                "seconds": time.perf_counter() - started,
            }
            if val.elbo > 0:
                log.warning(
                    "validation ELBO %.3f > 0 on binary data, which no normalized prior can give: does %s keep "
                    "every normalizing constant? Check it with "
                    "`pytest tests/priors/test_prior_contract.py --prior %s.%s`",
                    val.elbo,
                    type(model.prior).__name__,
                    type(model.prior).__module__,
                    type(model.prior).__name__,
                )
            self._call("on_validation_end", model, data, state, record)
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            metrics_start = self._append_metrics(record)
            logger.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
            log.info(
                "epoch %d: train ELBO %.2f, val ELBO %.2f%s (%.1fs)",
                record["epoch"],
                record["train_elbo"],
                val.elbo,
                " (best)" if improved else "",
                record["seconds"],
            )

            payload = self._checkpoint(model, optimizer, state, run_config or {}, improved)
            self._save_checkpoints(payload, improved, record["epoch"], metrics_start)
            if self._stopped_early(state):
                log.info("early stopping: no better validation ELBO for %d epochs", self.patience)
        if out_of_time:
            log.info("stopped at step %d: trainer.max_seconds=%g spent", state.step, self.max_seconds)
        self._call("on_fit_end", model, data, state)
        return state

    # ---- pieces of the loop --------------------------------------------------------

    @staticmethod
    def _kl_weight(step: int, warmup_steps: float) -> float:
        """The KL weight of optimizer step `step` (1-based): linear from 0 to 1 over the warm-up."""
        return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0

    def _stopped_early(self, state: TrainState) -> bool:
        """Whether `patience` validations in a row brought no better ELBO (saved in the state, so
        a resumed run that had stopped stays stopped)."""
        return state.bad_evals >= self.patience

    def _out_of_steps(self, state: TrainState) -> bool:
        return self.max_steps is not None and state.step >= self.max_steps

    def _checkpoint(
        self,
        model: VAE,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        run_config: dict[str, Any],
        is_best: bool = False,
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),  # encoder, decoder and the prior's state under "prior."
            "optimizer": optimizer.state_dict(),
            "state": asdict(state),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": run_config,
            # best.pt is written from this payload after last.pt: if that write fails, a resume
            # from last.pt knows it holds the best state and writes best.pt from it.
            "is_best": is_best,
        }

    def _save_checkpoints(self, payload: dict[str, Any], improved: bool, epoch: int, metrics_start: int) -> None:
        """Write last.pt, then best.pt when the epoch improved; on failure, stop with advice that works.

        last.pt goes first: if it cannot be written, best.pt and last.pt still hold earlier
        epochs, and the metrics line of this epoch (appended before) is cut off again, so a
        resume trains the epoch again without a duplicate line. If best.pt then fails,
        last.pt holds this (best) epoch, marked `is_best`, and the resume writes best.pt from it.
        """
        try:
            save_checkpoint(self.last_path, payload)
        except WriteError as e:
            self._truncate_metrics(metrics_start)
            raise self._write_failure(e, epoch, last_written=False) from e
        if improved:
            try:
                save_checkpoint(self.best_path, payload)
            except WriteError as e:
                raise self._write_failure(e, epoch, last_written=True) from e

    def _write_failure(self, error: WriteError, epoch: int, last_written: bool) -> CheckpointWriteError:
        failure = CheckpointWriteError(self._write_failure_message(error, epoch, last_written))
        failure.errno = error.errno
        return failure

    def _write_failure_message(self, error: BaseException, epoch: int, last_written: bool) -> str:
        """What failed, what the directory holds now, and the command that continues the run."""
        fix = "free some space" if "disk full" in str(error) else "fix that"
        where = f"hydra.run.dir={self.run_dir}"
        if last_written:
            return (
                f"{error}; training stopped after epoch {epoch}, which {self.last_path} holds as the best so far. "
                f"{fix.capitalize()}, then continue with trainer.resume=true {where} (best.pt is written from last.pt)"
            )
        kept = f"epoch {epoch}'s metrics line was dropped"
        if self.last_path.exists():
            resume = f"trainer.resume=true {where} (it continues from {self.last_path} and trains epoch {epoch} again)"
        elif self.resume not in (False, True, None):
            resume = f"trainer.resume={self.resume} {where} (it trains epoch {epoch} again)"
        else:
            resume = f"trainer.resume=true {where} (no checkpoint was written yet: it starts the run over)"
        return f"{error}; training stopped in epoch {epoch} ({kept}). {fix.capitalize()}, then continue with {resume}"

    def _maybe_resume(self, model: VAE, optimizer: torch.optim.Optimizer) -> TrainState:
        path = self.resume_path
        if path is None:
            if self.resume:
                log.info("resume: %s does not exist yet, starting fresh", self._in_run(self.last_path))
            return TrainState()
        payload = load_checkpoint(path, map_location=self.device)
        if path == self.last_path and payload.get("is_best"):
            self._restore_best(payload)
        model.load_state_dict(payload["model"])
        load_optimizer_state(optimizer, payload["optimizer"])  # the config's fused or foreach, not the checkpoint's
        torch.set_rng_state(payload["rng_cpu"].cpu())
        if payload["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(payload["rng_cuda"].cpu(), self.device)
        state = TrainState(**payload["state"])
        self._drop_metrics_after(state.step)
        log.info("resumed from %s at epoch %d, step %d", self._in_run(path), state.epoch + 1, state.step)
        return state

    def _in_run(self, path: Path) -> Path:
        """`path` as the run's own log names it: relative to the run directory when inside it.

        The log lives in the run directory, so the relative name is the portable one: a committed
        run's log then holds no machine's paths."""
        try:
            return path.resolve().relative_to(self.run_dir.resolve())
        except ValueError:
            return path

    def _restore_best(self, payload: dict[str, Any]) -> None:
        """Write best.pt from last.pt when last.pt holds the best state and best.pt an older one, or none.

        That is what a failed best.pt write leaves (last.pt is written first), and what a run
        continued from a copy of last.pt alone leaves beside an older best.pt. A best.pt that is
        not older is left alone (evaluating it is refused at the end if it is not the best).
        """
        saved = payload.get("state") or {}
        try:
            best = load_checkpoint(self.best_path).get("state") or {}
        except (OSError, ValueError):  # missing or unreadable: the write that failed left nothing usable
            best = {}
        older = best.get("best_epoch") is None or best["best_epoch"] < saved.get("best_epoch", -1)
        if older:
            log.info(
                "resume: %s holds the best state (epoch %s); writing it to %s",
                self.last_path,
                saved.get("best_epoch"),
                self.best_path,
            )
            save_checkpoint(self.best_path, payload)

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporary files of checkpoint and metrics writes a killed run left behind.

        Only this run writes here (it holds the directory's lock), so any such file is stale.
        """
        for pattern, folder in ((".*.pt.*.tmp", self.last_path.parent), (".metrics.jsonl.*.tmp", self.run_dir)):
            for tmp in folder.glob(pattern):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    def _drop_metrics_after(self, step: int) -> None:
        """Keep only the metrics lines the checkpoint has seen.

        Lines are appended before `last.pt` is written, so a kill between the two leaves a
        line for an epoch the resumed run trains again; it is dropped here (atomically), so
        metrics.jsonl never holds an epoch twice. A torn last line is dropped as well. A
        resume from an earlier checkpoint (`trainer.resume=.../best.pt`) drops the epochs
        after it, which it trains again: their lines are kept, appended to
        `metrics_superseded.jsonl`, so no history is lost.
        """
        if not self.metrics_path.exists():
            return
        kept, superseded = [], []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            (kept if record.get("step", 0) <= step else superseded).append(line)
        if superseded:
            log.info(
                "resume: %d line(s) of %s past step %d moved to %s (those epochs are trained again)",
                len(superseded),
                self.metrics_path.name,
                step,
                SUPERSEDED_METRICS,
            )
            with open(self.run_dir / SUPERSEDED_METRICS, "a") as f:
                f.write("".join(f"{line}\n" for line in superseded))
        write_atomically(self.metrics_path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))

    def _append_metrics(self, record: dict[str, Any]) -> int:
        """Append `record` as a line of metrics.jsonl; return the file's size before it.

        A failed append (a full disk) cuts the file back to its size before, so no torn line
        is left, and stops training with advice that works (last.pt is as it was).
        """
        line = (json.dumps(record) + "\n").encode()
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        start = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        try:
            with open(self.metrics_path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._truncate_metrics(start)
            message, code = describe_write_failure(self.metrics_path, e)
            failure = WriteError(message)
            failure.errno = code
            raise self._write_failure(failure, record["epoch"], last_written=False) from e
        return start

    def _truncate_metrics(self, size: int) -> None:
        """Cut metrics.jsonl back to `size` bytes (no new disk space needed); remove it if that leaves it empty."""
        with contextlib.suppress(OSError):
            if size > 0:
                os.truncate(self.metrics_path, size)
            else:
                self.metrics_path.unlink()
