"""The VAE, its data and its trainer."""

from __future__ import annotations

import functools
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from priors.base import Prior
from vae.data import BinarizedData, DataError
from vae.model import VAE
from vae.validation import ConfigError


def instantiate(node: DictConfig, **kwargs):
    """`hydra.utils.instantiate`, except that a `ConfigError` or `DataError` from the target comes
    out as itself (it already names the option; Hydra's wrapper would bury it under its own context)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ConfigError, DataError)):
            raise e.__cause__ from None
        raise


class DeviceError(ConfigError):
    """The asked-for device does not exist or is not available."""


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N (or another torch device), got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={name} was asked for, but torch sees no CUDA GPU; use device=cpu or device=auto")
    return device


def build_prior(node: DictConfig, latent_dim: int, encoder: Any, train_x: torch.Tensor) -> Prior:
    """Build a prior from its config node with `latent_dim`; complete a `_partial_` node with
    `encoder=` and `train_x=` (the VampPrior and exemplar priors need the model)."""
    try:
        prior = instantiate(node, latent_dim=latent_dim)
        if isinstance(prior, functools.partial):
            prior = prior(encoder=encoder, train_x=train_x)
    except (InstantiationException, AttributeError) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if "Module.__init__() call" in str(cause):  # torch's words for a missing super().__init__()
            raise TypeError(
                f"{node._target_} assigns a parameter or module before calling super().__init__(latent_dim): "
                "call it first in __init__"
            ) from e
        raise
    if not isinstance(prior, Prior):
        raise ConfigError(f"prior._target_ built a {type(prior).__name__}, which does not subclass priors.base.Prior")
    return prior


def training_inputs(data: BinarizedData) -> torch.Tensor:
    """What a prior that needs the model is built with as `train_x`: the training split's grey
    levels in [0, 1], `[N, P]` (the Exemplar VAE's exemplars, the VampPrior's `init: data`)."""
    return data.grey["train"]


def build_model(cfg: DictConfig, data: BinarizedData) -> VAE:
    """Build the encoder, the decoder, then the prior, then the VAE.

    The encoder and decoder are built with `data_dim` (the data's pixel count) and
    `latent_dim=cfg.vae.latent_dim`, the prior with `latent_dim`. A prior node marked
    `_partial_: true` (a prior that needs the model: VampPrior, exemplar) is completed with
    `encoder=` the encoder and `train_x=` the training inputs' grey levels (`training_inputs`). Any
    classes honouring the contracts in `vae.networks` and `priors.base` plug in through
    their `_target_`.
    """
    latent_dim = cfg.vae.latent_dim
    encoder = instantiate(cfg.vae.encoder, data_dim=data.data_dim, latent_dim=latent_dim)
    decoder = instantiate(cfg.vae.decoder, data_dim=data.data_dim, latent_dim=latent_dim)
    prior = build_prior(cfg.prior, latent_dim, encoder, training_inputs(data))
    return VAE(encoder, decoder, prior, latent_dim)
