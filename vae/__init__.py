"""The VAE, its data and its trainer."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from priors.base import Prior
from vae.data import BinarizedData
from vae.model import VAE


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for, but torch sees no CUDA GPU; use device=cpu or device=auto")
    return device


def build_model(cfg: DictConfig, data: BinarizedData) -> VAE:
    """Instantiate the prior and the VAE from `cfg.prior` and `cfg.vae`, then run the prior's setup hook.

    The prior is built with `latent_dim=cfg.vae.latent_dim`; any class honouring the
    `priors.base.Prior` contract plugs in through `prior._target_`.
    """
    prior = hydra.utils.instantiate(cfg.prior, latent_dim=cfg.vae.latent_dim)
    if not isinstance(prior, Prior):
        raise TypeError(f"prior._target_ built a {type(prior).__name__}, which does not subclass priors.base.Prior")
    model = hydra.utils.instantiate(cfg.vae, data_dim=data.data_dim, prior=prior)
    prior.setup(model.encoder, data.grey["train"])
    return model
