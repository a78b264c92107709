"""A normalizing-flow prior (nflows): masked autoregressive by default, or rational-quadratic splines."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from nflows.distributions import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms import (
    CompositeTransform,
    MaskedAffineAutoregressiveTransform,
    ReversePermutation,
    Transform,
)
from torch import Tensor

from priors.base import Prior

LayerFactory = Callable[..., Transform]


class FlowPrior(Prior):
    """p(z) = p_0(f(z)) |det df/dz| for an invertible autoregressive f, with exact sampling.

    The base p_0 is N(0, I) by default, or any prior (`base`): a flow over a mixture or a
    VampPrior, whose parameters train with the flow's.

    f is `num_layers` autoregressive layers with a `ReversePermutation` between
    consecutive ones (so every dimension gets conditioned on every other). Each layer is
    built by `layer(features=D, hidden_features=hidden_features)`; any nflows
    autoregressive transform with that signature plugs in as a Hydra `_partial_` node:

    * default (`layer=None`): `MaskedAffineAutoregressiveTransform` (MAF), an affine
      autoregressive layer per step;
    * `IdentityAffineTransform`: the MAF layer started near the identity, which a deep flow
      needs (prior=flow_deep);
    * `priors.splines.MaskedSplineAutoregressiveTransform` (or nflows' own
      `MaskedPiecewiseRationalQuadraticAutoregressiveTransform`, the same density, slower
      on a CPU) with `tails: linear`, `tail_bound` and `num_bins`: the neural spline flow
      (identity outside [-tail_bound, tail_bound], so the density's tails are the base's).

    `log_prob` is exact (one pass of f). `sample` is exact: base noise drawn in the
    module's own dtype and device, then f^{-1}, which for an autoregressive layer takes D
    sequential passes of its MADE. With D = 1 a MADE has nothing to condition on and each
    layer reduces to a learned elementwise transform (affine or spline), still exact.

    Args:
        latent_dim: size D of the latent space.
        num_layers: number of autoregressive layers (> 0).
        hidden_features: hidden units of each layer's MADE.
        layer: a callable `layer(features=..., hidden_features=...) -> Transform`; None: MAF
            with `num_blocks` residual blocks.
        num_blocks: residual blocks per MADE of the default MAF layer.
        base: None (N(0, I)), a `Prior` over the same D, or a callable building one (a Hydra
            `_partial_` node, conf/prior/flow_vampprior.yaml), called with `latent_dim=D` and,
            where its signature takes them, `encoder=` and `train_x=`.
        encoder, train_x: passed on to a `base` that needs the model (a VampPrior); the flow
            node is then `_partial_` itself, so that `vae.build_model` completes it with them.

    References:
        Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
        Estimation", 2017; Durkan et al., "Neural Spline Flows", 2019; Chen et al.,
        "Variational Lossy Autoencoder", 2017 (an autoregressive-flow prior for a VAE).
    """

    def __init__(
        self,
        latent_dim: int,
        num_layers: int = 5,
        hidden_features: int = 128,
        layer: LayerFactory | None = None,
        num_blocks: int = 2,
        base: Prior | Callable[..., Prior] | None = None,
        encoder: Any = None,
        train_x: Tensor | None = None,
    ) -> None:
        super().__init__(latent_dim)
        if int(num_layers) != num_layers or num_layers <= 0:
            raise ValueError(f"FlowPrior: num_layers must be a positive integer, got {num_layers!r}")
        if int(hidden_features) != hidden_features or hidden_features <= 0:
            raise ValueError(f"FlowPrior: hidden_features must be a positive integer, got {hidden_features!r}")
        if layer is None:
            layer = partial(MaskedAffineAutoregressiveTransform, num_blocks=num_blocks)
        if not callable(layer):
            raise TypeError(
                f"FlowPrior: layer must be a callable building an nflows Transform, got {type(layer).__name__}"
            )
        self.num_layers = int(num_layers)
        transforms: list[Transform] = []
        for i in range(self.num_layers):
            if i > 0:
                transforms.append(ReversePermutation(features=self.latent_dim))
            t = layer(features=self.latent_dim, hidden_features=int(hidden_features))
            if not isinstance(t, Transform):
                raise TypeError(f"FlowPrior: layer built a {type(t).__name__}, not an nflows Transform")
            transforms.append(t)
        self.flow = Flow(CompositeTransform(transforms), StandardNormal([self.latent_dim]))
        self.base = _build_base(base, self.latent_dim, encoder=encoder, train_x=train_x)

    def _log_prob(self, z: Tensor) -> Tensor:
        flat = z.reshape(-1, self.latent_dim)
        if self.base is None:
            return self.flow.log_prob(flat).reshape(z.shape[:-1])
        noise, log_det = self.flow._transform(flat)
        return (self.base.log_prob(noise) + log_det).reshape(z.shape[:-1])

    def _sample(self, n: int) -> Tensor:
        if self.base is None:
            # nflows' StandardNormal draws float32 noise whatever the module's dtype; draw our own.
            ref = next(self.flow.parameters())
            noise = torch.randn(n, self.latent_dim, device=ref.device, dtype=ref.dtype)
        else:
            noise = self.base.sample(n)
        z, _ = self.flow._transform.inverse(noise)
        return z

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_layers={self.num_layers}"


class IdentityAffineTransform(MaskedAffineAutoregressiveTransform):
    """nflows' MAF layer, started near the identity: its MADE's output weights are nflows' random
    ones times `init_scale`, and its output biases make each scale 1 (softplus(u) + 1e-3 = 1)
    and each shift 0, so scales and shifts start at 1 and 0 up to `init_scale` times nflows'
    random outputs.

    nflows starts the layer with a scale near softplus(0) = 0.69 and a shift of order one that
    grows with the input. Over 10 layers of 256 hidden units those compound: in the recipe the
    KL term of such a flow prior went from 90 nats to 5.7e30 between steps 12 and 14
    (results/record/flow_big_steps.txt). Started near the identity, the flow starts near
    N(0, I) and moves from there (as Glow's zero-initialized last layers do). `init_scale=0`
    is the identity exactly; the hidden layers then get no gradient at the first step, only
    from the second on.

    Args:
        features, hidden_features, **kwargs: those of `MaskedAffineAutoregressiveTransform`.
        init_scale: the output weights' factor (>= 0).
    """

    def __init__(self, features: int, hidden_features: int, init_scale: float = 1e-3, **kwargs: Any) -> None:
        if not init_scale >= 0:
            raise ValueError(f"IdentityAffineTransform: init_scale must be >= 0, got {init_scale!r}")
        super().__init__(features=features, hidden_features=hidden_features, **kwargs)
        final = self.autoregressive_net.final_layer
        with torch.no_grad():
            final.weight.mul_(float(init_scale))
            final.bias.zero_()
            # The MADE's outputs per feature are (unconstrained scale, shift), interleaved.
            final.bias.view(features, self._output_dim_multiplier())[:, 0] = math.log(math.expm1(1.0 - self._epsilon))


def _build_base(base: Prior | Callable[..., Prior] | None, latent_dim: int, **model: Any) -> Prior | None:
    """The flow's base prior: `base` itself, or built by it with `latent_dim` (and the model's
    `encoder` / `train_x` where it takes them and they were given)."""
    if base is None or isinstance(base, Prior):
        built = base
    elif callable(base):
        accepted = inspect.signature(base).parameters
        missing = [
            k for k in model if k in accepted and model[k] is None and accepted[k].default is inspect.Parameter.empty
        ]
        if missing:
            raise ValueError(
                f"FlowPrior: the base needs the model ({', '.join(missing)}): mark the flow's config node "
                "`_partial_: true`, so that vae.build_model completes it (conf/prior/flow_vampprior.yaml)"
            )
        built = base(latent_dim=latent_dim, **{k: v for k, v in model.items() if k in accepted and v is not None})
    else:
        raise TypeError(f"FlowPrior: base must be a Prior or a callable building one, got {type(base).__name__}")
    if built is not None and not isinstance(built, Prior):
        raise TypeError(f"FlowPrior: base built a {type(built).__name__}, not a priors.base.Prior")
    if built is not None and built.latent_dim != latent_dim:
        raise ValueError(f"FlowPrior: the base is over {built.latent_dim} dimensions, the flow over {latent_dim}")
    return built
