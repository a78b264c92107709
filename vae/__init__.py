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
    """Instantiate the encoder, decoder and prior from `cfg.vae` and `cfg.prior`, then run the prior's setup hook.

    The encoder and decoder are built with `data_dim` (the data's pixel count) and
    `latent_dim=cfg.vae.latent_dim`, the prior with `latent_dim`; any classes honouring the
    contracts in `vae.networks` and `priors.base` plug in through their `_target_`.
    """
    latent_dim = cfg.vae.latent_dim
    encoder = hydra.utils.instantiate(cfg.vae.encoder, data_dim=data.data_dim, latent_dim=latent_dim)
    decoder = hydra.utils.instantiate(cfg.vae.decoder, data_dim=data.data_dim, latent_dim=latent_dim)
    prior = hydra.utils.instantiate(cfg.prior, latent_dim=latent_dim)
    if not isinstance(prior, Prior):
        raise TypeError(f"prior._target_ built a {type(prior).__name__}, which does not subclass priors.base.Prior")
    model = VAE(encoder, decoder, prior, latent_dim)
    prior.setup(model.encoder, data.grey["train"])
    return model
