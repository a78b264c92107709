"""The trainer's callbacks: work done as training goes, outside the loss and the model's distributions.

The contract (`Callback`): a callback is any object with one or more of the hook methods
`HOOKS` names; `vae.trainer.Trainer` calls, for each callback in the order given, the hooks
it has, and skips the others. Every hook gets the trainer, the model, the data and the
`TrainState`, by keyword or position; `on_validation_end` also gets the epoch's metrics record,
to which it may add numbers (they go to `metrics.jsonl` and the logger with the trainer's own).

`TrainingSetEncodings`, the default callback (`trainer.callbacks` in conf/trainer/default.yaml),
encodes the training set and hands the posteriors to every module of the model that consumes
them (`EncodingConsumer`: a `needs_encodings` property and `update_encodings(mu, logvar)`,
as the aggregate and exemplar priors have). One pass serves every consumer of the same inputs:
the training set binarized once (`data.split("train")`), unless a consumer names its own
(`encoding_inputs`: the exemplar prior's grey-level exemplars).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vae.data import BinarizedData
    from vae.model import VAE
    from vae.trainer import Trainer, TrainState

#: The hooks the trainer calls, in the order it calls them in one epoch (`on_fit_start` once
#: before the first epoch, `on_fit_end` once after the last).
HOOKS = ("on_fit_start", "on_train_epoch_end", "on_validation_end", "on_fit_end")


class Callback(Protocol):
    """What `Trainer.fit` calls. A callback defines any subset of these methods (at least one).

    Every hook gets `trainer` (its options: `device`, `eval_batch_size`, `run_dir`, ...), the
    `model` being trained, the `data` and the live `state` (read it, never change it). No hook
    runs in the autograd graph of a step; a hook that evaluates the model should do so under
    `torch.no_grad()` and leave `model.training` as it found it.
    """

    def on_fit_start(self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState) -> None:
        """Once, before the first epoch: after a resumed run's state is restored, before any step."""

    def on_train_epoch_end(self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState) -> None:
        """After every complete epoch's last step, before validation and the checkpoint.

        `state.epoch` is still the 0-based index of the epoch just trained. A run stopped
        mid-epoch (`max_steps`, `max_seconds`) does not call it for that epoch.
        """

    def on_validation_end(
        self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState, record: dict[str, Any]
    ) -> None:
        """After each validation (once an epoch, and at a mid-epoch stop), before the metrics line
        and the checkpoint are written. `record` is that metrics line (`record["epoch"]` is
        1-based; `state.best_epoch` already counts this validation); numbers added to it are
        written and logged with it."""

    def on_fit_end(self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState) -> None:
        """Once, when training stops normally (epochs, steps, time or patience spent); not after an error."""


@runtime_checkable
class EncodingConsumer(Protocol):
    """A module fed the training set's posteriors by `TrainingSetEncodings` (docs/priors.md)."""

    @property
    def needs_encodings(self) -> bool:
        """True while the module holds no encodings of the current training set (nothing to evaluate with)."""

    def update_encodings(self, mu: Tensor, logvar: Tensor) -> None:
        """Take the posteriors `[N, D]` of the N training inputs, in training-set order (detached).

        A consumer may also have an `encoding_inputs` attribute, `[N, P]`: the inputs whose
        posteriors it takes instead of the training set binarized once (optional, so not a
        member of this protocol).
        """


def consumers(model: nn.Module) -> list[EncodingConsumer]:
    """Every module of `model` (the model itself included) that consumes encodings."""
    return [m for m in model.modules() if isinstance(m, EncodingConsumer)]


@torch.no_grad()
def encode(encoder: Any, x: Tensor, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Posterior parameters of every row of `x`: (mu, logvar), each `[N, D]`, on `device`."""
    mus, logvars = [], []
    for batch in x.split(batch_size):
        mu, logvar = encoder(batch.to(device))
        mus.append(mu)
        logvars.append(logvar)
    return torch.cat(mus), torch.cat(logvars)


class TrainingSetEncodings:
    """Encode `data.split("train")` (the training set as the surgery sees it) with the current
    encoder and give the result to the model's consumers: at the start of training when one
    has none yet, and after every complete epoch, before validation and the checkpoint.

    After an epoch it does nothing when the model has no consumer, or when the encoder is
    frozen (no parameter of it requires a gradient: a prior fitted after training) and every
    consumer has encodings: they are the frozen encoder's already.

    Args:
        batch_size: inputs per encoder call; None: the trainer's `eval_batch_size`.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)):
            raise TypeError(f"TrainingSetEncodings: batch_size must be a positive integer or None, got {batch_size!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"TrainingSetEncodings: batch_size must be a positive integer or None, got {batch_size}")
        self.batch_size = batch_size

    def refresh(self, model: nn.Module, x: Tensor, device: torch.device, batch_size: int = 1000) -> None:
        """Encode the training inputs `x` with `model.encoder` (in eval mode) and give the posteriors to
        every consumer of `model` (a consumer's own `encoding_inputs` instead of `x` where it
        has them; each distinct input tensor is encoded once); `batch_size` unless this
        callback has its own."""
        targets = consumers(model)
        if not targets:
            return
        encoded: dict[int, tuple[Tensor, Tensor]] = {}
        was_training = model.training
        model.eval()
        try:
            for target in targets:
                inputs = getattr(target, "encoding_inputs", None)
                inputs = x if inputs is None else inputs
                if id(inputs) not in encoded:
                    encoded[id(inputs)] = encode(model.encoder, inputs, self.batch_size or batch_size, device)
                target.update_encodings(*encoded[id(inputs)])
        finally:
            model.train(was_training)

    def on_fit_start(self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState) -> None:
        if any(c.needs_encodings for c in consumers(model)):
            self.refresh(model, data.split("train"), trainer.device, trainer.eval_batch_size)

    def on_train_epoch_end(self, trainer: Trainer, model: VAE, data: BinarizedData, state: TrainState) -> None:
        targets = consumers(model)
        frozen = not any(p.requires_grad for p in model.encoder.parameters())
        if not targets or (frozen and not any(c.needs_encodings for c in targets)):
            return
        self.refresh(model, data.split("train"), trainer.device, trainer.eval_batch_size)
