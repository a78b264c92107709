"""The VampPrior: a mixture of the encoder's posteriors at K learned pseudo-inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from priors.base import Encoder, Prior
from priors.densities import diagonal_normal_log_prob

INITS = ("random", "data")


class VampPrior(Prior):
    """p(z) = 1/K sum_k q(z | u_k) with K learned pseudo-inputs u_k in data space.

    The pseudo-inputs go through the VAE's own encoder, so the prior moves with it. They
    are kept in [0, 1] as in the paper, which maps an identity input through a linear layer
    and a hardtanh(0, 1): here the K x data_dim weight of that layer is the parameter
    `pseudo_inputs_raw`, and `pseudo_inputs = hardtanh(pseudo_inputs_raw, 0, 1)` (the same
    function, without the K x K identity matmul). As in the paper, a raw value pushed
    outside [0, 1] gets no gradient until the encoder's gradient pushes it back.

    The encoder is given by the `setup` hook (called by `vae.build_model`) and is held
    without being registered as a submodule: its parameters belong to the VAE.

    Evaluation cache: when the prior is in eval mode and no gradient is being recorded
    (`evaluate` runs under `torch.no_grad`), the pseudo-inputs' encodings are computed
    once and reused. The cache is keyed on the identity, version counter, storage, dtype
    and device of every pseudo-input and encoder parameter, so an optimizer step, a
    `load_state_dict` or a `.to()` makes it stale and it is recomputed. In training mode,
    or when gradients are being recorded, the encodings are recomputed on every call so
    gradients reach the pseudo-inputs and the encoder.

    Args:
        latent_dim: size D of the latent space.
        num_components: K, the number of pseudo-inputs (> 0); the paper uses 500 on MNIST.
        data_dim: size of one input; None takes it from the training data at `setup`.
            When given, it must match the data.
        init: `"random"` (the paper's default: N(init_mean, init_std^2), clipped to
            [0, 1]) or `"data"` (K training images drawn at random, at `setup`).
        init_mean: mean of the random initialization (the paper's MNIST value is 0.05).
        init_std: standard deviation of the random initialization (paper: 0.01).
        chunk_size: points per chunk of the `[chunk, K, D]` broadcast in `log_prob`.

    References:
        Tomczak & Welling, "VAE with a VampPrior", AISTATS 2018.
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int = 500,
        data_dim: int | None = None,
        init: str = "random",
        init_mean: float = 0.05,
        init_std: float = 0.01,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__(latent_dim)
        if int(num_components) != num_components or num_components <= 0:
            raise ValueError(f"VampPrior: num_components (K) must be a positive integer, got {num_components!r}")
        if init not in INITS:
            raise ValueError(f"VampPrior: init must be one of {INITS}, got {init!r}")
        if data_dim is not None and (int(data_dim) != data_dim or data_dim <= 0):
            raise ValueError(f"VampPrior: data_dim must be a positive integer or None, got {data_dim!r}")
        self.num_components = int(num_components)
        self.init = init
        self.init_mean = init_mean
        self.init_std = init_std
        self.chunk_size = chunk_size
        # Without data_dim the pseudo-inputs get their size at setup; until then they are empty.
        self.pseudo_inputs_raw = nn.Parameter(torch.empty(self.num_components, 0))
        if data_dim is not None:
            self._allocate(int(data_dim))
        object.__setattr__(self, "_encoder", None)
        object.__setattr__(self, "_cache", None)

    @property
    def data_dim(self) -> int | None:
        d = self.pseudo_inputs_raw.shape[1]
        return d if d > 0 else None

    @property
    def pseudo_inputs(self) -> Tensor:
        """The pseudo-inputs u_k in [0, 1], `[K, data_dim]`."""
        return F.hardtanh(self.pseudo_inputs_raw, 0.0, 1.0)

    def _allocate(self, data_dim: int) -> None:
        raw = self.init_mean + self.init_std * torch.randn(self.num_components, data_dim)
        self.pseudo_inputs_raw = nn.Parameter(raw.to(self.pseudo_inputs_raw))

    def setup(self, encoder: Encoder, train_x: Tensor) -> None:
        """Keep the encoder; size (and, with `init="data"`, initialize) the pseudo-inputs from `train_x`."""
        if train_x.dim() != 2:
            raise ValueError(f"VampPrior.setup expects train_x of shape [N, data_dim], got {tuple(train_x.shape)}")
        n, data_dim = train_x.shape
        if self.data_dim is None:
            self._allocate(data_dim)
        elif self.data_dim != data_dim:
            raise ValueError(
                f"VampPrior: pseudo-inputs have size {self.data_dim} (data_dim) but the data has size {data_dim}"
            )
        if self.init == "data":
            if n < self.num_components:
                raise ValueError(f"VampPrior: init='data' needs at least K={self.num_components} training points, got {n}")
            pick = torch.randperm(n)[: self.num_components]
            with torch.no_grad():
                self.pseudo_inputs_raw.copy_(train_x[pick].to(self.pseudo_inputs_raw))
        object.__setattr__(self, "_encoder", encoder)
        object.__setattr__(self, "_cache", None)
        mu, logvar = self._encode()
        if mu.shape != (self.num_components, self.latent_dim) or logvar.shape != mu.shape:
            raise ValueError(
                f"VampPrior: the encoder maps pseudo-inputs to mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}, "
                f"expected ({self.num_components}, {self.latent_dim}) each (latent_dim={self.latent_dim})"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A prior built without data_dim and not yet set up takes the pseudo-inputs' size
        # from the checkpoint, so a bare `load_state_dict` restores it exactly.
        raw = state_dict.get(prefix + "pseudo_inputs_raw")
        if raw is not None and self.data_dim is None and raw.dim() == 2 and raw.shape[0] == self.num_components:
            self._allocate(raw.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- the pseudo-inputs' posteriors ----------------------------------------------

    def _encode(self) -> tuple[Tensor, Tensor]:
        if self._encoder is None:
            raise RuntimeError(
                "VampPrior has no encoder: call setup(encoder, train_x) first (vae.build_model does)"
            )
        return self._encoder(self.pseudo_inputs)

    def _cache_key(self) -> tuple:
        params = [self.pseudo_inputs_raw]
        if isinstance(self._encoder, nn.Module):
            params += list(self._encoder.parameters()) + list(self._encoder.buffers())
        return tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)

    def components(self) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z|u_k), each `[K, D]`; cached in eval mode without grad (see the class docstring)."""
        cacheable = not self.training and not torch.is_grad_enabled() and isinstance(self._encoder, nn.Module)
        if not cacheable:
            return self._encode()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            object.__setattr__(self, "_cache", (key, self._encode()))
        return self._cache[1]

    def train(self, mode: bool = True) -> "VampPrior":
        object.__setattr__(self, "_cache", None)
        return super().train(mode)

    # ---- the contract ---------------------------------------------------------------

    def _log_prob(self, z: Tensor) -> Tensor:
        mu, logvar = self.components()
        flat = z.reshape(-1, self.latent_dim)
        # Chunked so the [chunk, K, D] broadcast stays bounded on large evaluations.
        out = [
            torch.logsumexp(diagonal_normal_log_prob(c.unsqueeze(-2), mu, logvar), dim=-1)
            for c in flat.split(self.chunk_size)
        ]
        lp = torch.cat(out) if out else flat.new_zeros(0)
        return (lp - math.log(self.num_components)).reshape(z.shape[:-1])

    def _sample(self, n: int) -> Tensor:
        mu, logvar = self.components()
        k = torch.randint(self.num_components, (n,), device=mu.device)
        return mu[k] + torch.exp(0.5 * logvar[k]) * torch.randn(n, self.latent_dim, device=mu.device, dtype=mu.dtype)

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, num_components={self.num_components}, data_dim={self.data_dim}, init={self.init!r}"
