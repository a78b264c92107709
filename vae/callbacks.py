"""Work the trainer does as training goes, outside the model's distributions.

`TrainingSetEncodings` encodes the training set once per epoch and hands the posteriors to
every module of the model that consumes them: any module with an `update_encodings(mu,
logvar)` method and a `needs_encodings` property (the aggregate and exemplar priors). One
pass serves every consumer.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class EncodingConsumer(Protocol):
    @property
    def needs_encodings(self) -> bool: ...

    def update_encodings(self, mu: Tensor, logvar: Tensor) -> None: ...


def consumers(model: nn.Module) -> list[EncodingConsumer]:
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

    Args:
        batch_size: inputs per encoder call.
    """

    def __init__(self, batch_size: int = 1000) -> None:
        self.batch_size = batch_size

    def _refresh(self, model: Any, data: Any, device: torch.device) -> None:
        targets = consumers(model)
        if not targets:
            return
        was_training = model.training
        model.eval()
        mu, logvar = encode(model.encoder, data.split("train"), self.batch_size, device)
        model.train(was_training)
        for target in targets:
            target.update_encodings(mu, logvar)

    def on_fit_start(self, model: Any, data: Any, device: torch.device) -> None:
        if any(c.needs_encodings for c in consumers(model)):
            self._refresh(model, data, device)

    def on_train_epoch_end(self, model: Any, data: Any, device: torch.device) -> None:
        self._refresh(model, data, device)
