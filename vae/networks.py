"""Encoders and decoders, each a `_target_` node of its own under `vae:` in the config.

The contract a user's network follows to plug in with `vae.encoder._target_=mypkg.MyEncoder`
(or `vae.decoder._target_=...`), no edit to priorlab needed:

* Both are `torch.nn.Module`s built as `cls(data_dim=P, latent_dim=D, **node)`: the model
  builder passes the data's pixel count `P` and the latent size `D`; every other key of the
  config node (for the built-in ones, `hidden_dims`) is passed as it stands.
* Encoder: `forward(x)` with `x` `[B, P]` (binary pixels as float, flat; reshape inside for a
  convolutional network, e.g. to `[B, 1, 28, 28]`) returns `(mu, logvar)`, each `[B, D]`, the
  mean and log-variance of the diagonal Gaussian q(z|x).
* Decoder: `forward(z)` with `z` `[..., D]` returns Bernoulli logits `[..., P]` (not
  probabilities). Leading dimensions are arbitrary: importance sampling passes `[B, K, D]`;
  a network that needs one batch dimension flattens and restores them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from vae.validation import ConfigError, check_arguments, check_int, check_number, check_sizes

#: The option every built-in network takes its layer widths from; errors name it, as the user sets it.
HIDDEN_DIMS = "vae.hidden_dims"


def _check_sizes(data_dim: Any, latent_dim: Any, hidden_dims: Any, name: str = HIDDEN_DIMS) -> tuple[int, ...]:
    """The built-in networks' sizes, checked: a zero-width layer would train a model that computes nothing."""
    check_int("the data's pixel count (data_dim)", data_dim, 1)
    check_int("vae.latent_dim", latent_dim, 1)
    return check_sizes(name, hidden_dims)


def _check_logvar_bounds(logvar_min: Any, logvar_max: Any, prefix: str = "vae.encoder") -> None:
    low = check_number(f"{prefix}.logvar_min", logvar_min, float("-inf"))
    high = check_number(f"{prefix}.logvar_max", logvar_max, float("-inf"))
    if not low < high:
        raise ConfigError(f"{prefix}.logvar_min ({low}) must be below {prefix}.logvar_max ({high})")


def check_options(key: str, node: DictConfig | Mapping[str, Any]) -> None:
    """Check the options of a built-in encoder or decoder node (`vae.encoder`, `vae.decoder`) before
    anything is built, naming the option at fault; a user's own network checks its own when built.

    Every built-in network is built as `cls(data_dim=P, latent_dim=D, **node)`: an unknown key,
    a zero, negative or empty `hidden_dims`, or Hardtanh bounds in the wrong order are refused.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    cls = BUILT_IN.get(node.get("_target_"))
    if cls is None:
        return
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    arguments = check_arguments(key, cls, options, given=("data_dim", "latent_dim"))
    check_sizes(f"{key}.hidden_dims", arguments["hidden_dims"])
    if "logvar_min" in arguments:
        _check_logvar_bounds(arguments["logvar_min"], arguments["logvar_max"], key)


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """ReLU MLP from x `[B, data_dim]` to (mu, logvar), each `[B, latent_dim]`; logvar unbounded."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        hidden_dims = _check_sizes(data_dim, latent_dim, hidden_dims)
        self.net = mlp([data_dim, *hidden_dims, 2 * latent_dim])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """ReLU MLP from z `[..., latent_dim]` to Bernoulli logits `[..., data_dim]`; `hidden_dims` mirrored."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        hidden_dims = _check_sizes(data_dim, latent_dim, hidden_dims)
        self.net = mlp([latent_dim, *reversed(list(hidden_dims)), data_dim])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class GatedDense(nn.Module):
    """A gated linear unit: h = (W1 x + b1) * sigmoid(W2 x + b2).

    References:
        Dauphin et al., "Language Modeling with Gated Convolutional Networks", 2017; used in
        the VampPrior and Exemplar VAE MNIST models.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def gated_stack(sizes: Sequence[int]) -> nn.Sequential:
    return nn.Sequential(*(GatedDense(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False)))


def he_init_(module: nn.Module) -> None:
    """Every linear weight ~ N(0, 2 / fan_in) (He et al. 2015); biases keep torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


class GatedMLPEncoder(nn.Module):
    """The published single-layer MNIST encoder: gated 784-300-300, mu linear, logvar linear then Hardtanh(-6, 2).

    References:
        Tomczak & Welling, "VAE with a VampPrior", 2018; Norouzi et al., "Exemplar VAE", 2020.
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden_dims: Sequence[int] = (300, 300),
        logvar_min: float = -6.0,
        logvar_max: float = 2.0,
    ) -> None:
        super().__init__()
        hidden_dims = _check_sizes(data_dim, latent_dim, hidden_dims)
        _check_logvar_bounds(logvar_min, logvar_max)
        self.body = gated_stack([data_dim, *hidden_dims])
        self.mu = nn.Linear(hidden_dims[-1], latent_dim)
        self.logvar = nn.Sequential(nn.Linear(hidden_dims[-1], latent_dim), nn.Hardtanh(logvar_min, logvar_max))
        he_init_(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class GatedMLPDecoder(nn.Module):
    """The encoder mirrored: gated latent_dim-300-300, then a linear layer to Bernoulli logits."""

    def __init__(self, data_dim: int, latent_dim: int, hidden_dims: Sequence[int] = (300, 300)) -> None:
        super().__init__()
        hidden_dims = _check_sizes(data_dim, latent_dim, hidden_dims)
        sizes = [latent_dim, *reversed(list(hidden_dims))]
        self.body = gated_stack(sizes)
        self.logits = nn.Linear(sizes[-1], data_dim)
        he_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.logits(self.body(z))


#: The networks `check_options` knows, by `_target_`.
BUILT_IN: dict[str, type[nn.Module]] = {
    f"{__name__}.{cls.__name__}": cls for cls in (MLPEncoder, MLPDecoder, GatedMLPEncoder, GatedMLPDecoder)
}
