"""ELBO surgery: the exact decomposition of the ELBO over a whole data split.

    ELBO        = reconstruction - average KL
    average KL  = I[n; z] + KL(q(z) || p(z))                      (Hoffman & Johnson 2016)
    KL(q || p)  = total correlation + prior-mismatch remainder    (Chen et al. 2018)

The remainder E_q(z)[log prod_d q(z_d) - log p(z)] is the dimension-wise KL
sum_d KL(q(z_d) || p(z_d)) when the prior factorizes over dimensions; for other priors it is
not a sum of per-dimension KLs, and the report has no dimension-wise KL.

The aggregate posterior q(z) = 1/N sum_n q(z|x_n) is evaluated exactly, over all N
posteriors, by `priors.densities.DiagonalGaussianMixture`; only the outer
expectations over z are Monte Carlo, and each comes with its standard error.

Everything here is a pure function of a model and data: no prints, no files, no text.
`surgery.text` formats a `SurgeryReport` as a table; the CLI (`python -m surgery`) and
`train.py` print, save and log it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from priors.base import Prior
from priors.densities import (
    DiagonalGaussianMixture,
    diagonal_normal_log_prob,
    gaussian_mixture_marginals_logsumexp,
    reparameterize,
)
from surgery.memory import pin_mmap_threshold
from vae.callbacks import encode as encode_in_batches

#: Reports the progress of a long pass, called like tqdm: `factory(total=..., desc=..., unit=...)`
#: returns an object with `update(n)` and `close()` (lab.progress.PassProgress; None: silent).
ProgressFactory = Callable[..., Any]


@dataclass(frozen=True)
class ImportanceState:
    """How far a pass of `importance_log_likelihood` has come: enough to continue it exactly.

    Attributes:
        key: what the pass computes (`importance_key`); a state of another key is not continued.
        values: `[done]` float64 log p(x) of the pass's first points, on the CPU.
        generator_state: the random stream after them (`torch.Generator.get_state()`).
    """

    key: str
    values: Tensor
    generator_state: Tensor

    @property
    def done(self) -> int:
        return len(self.values)


class ImportanceCheckpoint(Protocol):
    """Where a long importance pass keeps its progress (lab.surgery.PartialLogLikelihood: a file).

    `load(key)` returns the saved state of that key or None; the pass asks `due()` after each
    batch of points and, when it is, gives `save` its state. A pass continued from a state
    draws the same samples as one never stopped, so it returns the same values, bit for bit.
    """

    def load(self, key: str) -> ImportanceState | None: ...

    def due(self) -> bool: ...

    def save(self, state: ImportanceState) -> None: ...


# ---- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean over samples and its standard error (0 for an exact value)."""

    value: float
    stderr: float

    @classmethod
    def of(cls, per_sample: Tensor) -> Estimate:
        x = per_sample.double()
        n = x.numel()
        stderr = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
        return cls(float(x.mean()), stderr)


@dataclass
class AggregateTerms:
    """The terms that need the aggregate posterior, in nats per data point."""

    mutual_info: Estimate
    marginal_kl: Estimate
    avg_kl_mc: Estimate  # mean of log q(z|x) - log p(z) at the same samples: MI + marginal KL
    total_correlation: Estimate
    prior_mismatch_remainder: Estimate  # E_q[log prod_d q(z_d) - log p(z)] = marginal KL - TC, sample by sample
    dimwise_kl: Estimate | None  # the remainder when the prior factorizes (sum_d KL(q(z_d) || p(z_d))), else None
    dimwise_kl_per_dim: list[float] | None  # factorized priors only
    n_samples: int  # M, the points z at which log q(z) is evaluated
    dimwise_samples: int  # the subset of them used for TC and the remainder
    log_n: float
    seconds_aggregate: float
    seconds_dimwise: float
    index: Tensor = field(repr=False)  # [M]: the posterior each sample was drawn from
    mutual_info_per_sample: Tensor = field(repr=False)  # [M] log q(z|x_n) - log q(z)
    marginal_kl_per_sample: Tensor = field(repr=False)  # [M] log q(z) - log p(z)


@dataclass
class SurgeryReport:
    """The ELBO decomposition of one model on one split, in nats per data point.

    Each Monte Carlo quantity is an `Estimate` (value and standard error; stderr 0 for an
    exact one: the analytic average KL). `to_dict` flattens them to `x` / `x_stderr` for
    surgery.json; `from_dict` reads that back, old files included. See docs/surgery.md for
    what each number means.
    """

    split: str
    n_points: int
    n_samples: int
    elbo: Estimate
    reconstruction: Estimate
    avg_kl: Estimate
    avg_kl_analytic: bool
    mutual_info: Estimate
    marginal_kl: Estimate
    log_n: float
    identity_gap: Estimate  # avg_kl - (mutual_info + marginal_kl): zero up to Monte Carlo error
    total_correlation: Estimate
    dimwise_kl: Estimate | None  # factorized priors only: sum_d KL(q(z_d) || p(z_d))
    prior_mismatch_remainder: Estimate  # E_q[log prod_d q(z_d) - log p(z)]; = dimwise_kl if it exists
    dimwise_samples: int
    prior_factorized: bool
    dimwise_kl_per_dim: list[float] | None
    optimal_prior_elbo: Estimate
    log_likelihood: Estimate | None
    log_likelihood_split: str | None
    is_samples: int | None
    is_points: int | None
    latent_dim: int
    prior: str
    seconds: dict[str, float] = field(default_factory=dict)
    #: log p(x) of each of the `is_points` points, float64 `[is_points]` (not in `to_dict`: it
    #: is saved beside surgery.json, for paired comparisons of models on the same points).
    log_likelihood_per_point: Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The content of surgery.json: each `Estimate` as `x`, `x_stderr` (both null for a missing one)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "log_likelihood_per_point":
                continue
            value = getattr(self, f.name)
            if f.name in ESTIMATE_FIELDS:
                out[f.name] = None if value is None else value.value
                out[f.name + "_stderr"] = None if value is None else value.stderr
            elif isinstance(value, (dict, list)):
                out[f.name] = type(value)(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> SurgeryReport:
        """A report from surgery.json's content (`to_dict`'s output, or an older file: see `upgrade_dict`)."""
        content = upgrade_dict(content)
        names = {f.name for f in fields(cls)} - {"log_likelihood_per_point"}
        kwargs = {}
        for name in names:
            if name in ESTIMATE_FIELDS:
                value = content.get(name)
                kwargs[name] = None if value is None else Estimate(value, content.get(name + "_stderr"))
            else:
                kwargs[name] = content.get(name)
        return cls(**kwargs)

    def metrics(self, prefix: str = "surgery/") -> dict[str, float]:
        """The numbers as flat scalar metrics (for a logger's summary)."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[prefix + key] = value
        return out


#: The `SurgeryReport` fields that are `Estimate`s (or None), in field order; `to_dict` writes each as
#: `x`, `x_stderr`. Read off the dataclass, so it is no second list (labels, units, display order:
#: `surgery.text.TERMS`).
ESTIMATE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(SurgeryReport) if f.type in ("Estimate", "Estimate | None")
)


def upgrade_dict(content: dict[str, Any]) -> dict[str, Any]:
    """surgery.json content in the current format; a copy, the input untouched.

    Files written before `prior_mismatch_remainder` existed stored the remainder
    E_q[log prod_d q(z_d) - log p(z)] as `dimwise_kl` for every prior: it becomes
    `prior_mismatch_remainder`, and `dimwise_kl` is kept only where the prior factorizes
    (`prior_factorized`; in a file without that flag, the per-dimension KLs, present only
    for factorized priors, decide). Current files pass through unchanged.
    """
    out = dict(content)
    if "prior_mismatch_remainder" in out or "dimwise_kl" not in out:
        return out
    out["prior_mismatch_remainder"] = out["dimwise_kl"]
    out["prior_mismatch_remainder_stderr"] = out.get("dimwise_kl_stderr")
    factorized = out.get("prior_factorized")
    if factorized is None:
        factorized = out.get("dimwise_kl_per_dim") is not None
    if not factorized:
        out["dimwise_kl"] = out["dimwise_kl_stderr"] = None
    return out


# ---- pieces ---------------------------------------------------------------------------


@torch.inference_mode()
def encode(model: Any, x: Tensor, batch_size: int = 1000, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Posterior parameters of every point: (mu, logvar), each `[N, D]`, on `device` (the model's by default)."""
    return encode_in_batches(model.encoder, x, batch_size, device or next(model.parameters()).device)


def _prior_log_prob(prior: Prior, z: Tensor, batch_size: int) -> Tensor:
    return torch.cat([prior.log_prob(z[s : s + batch_size]) for s in range(0, len(z), batch_size)])


def _wait_for(device: torch.device) -> None:
    """Let a GPU finish its queued work, so that a stage's clock reading covers that stage's work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_index(n: int, n_samples: int | None, generator: torch.Generator, device: torch.device) -> Tensor:
    """The posterior of each of M samples: all N once (None or N), a random subset (M < N), or cycling (M > N)."""
    if n_samples is None or n_samples == n:
        return torch.arange(n, device=device)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive or None, got {n_samples}")
    if n_samples < n:
        return torch.randperm(n, generator=generator, device=device)[:n_samples].sort().values
    return torch.arange(n_samples, device=device) % n


def _joint_log_densities(
    mu: Tensor,
    logvar: Tensor,
    prior: Prior | None,
    z: Tensor,
    index: Tensor,
    *,
    chunk_size: int,
    block_size: int,
    prior_batch_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """log q(z_m|x_{n_m}), log q(z_m) (exact over all N posteriors) and log p(z_m), each float64 `[M]`.

    log p(z) is NaN without a prior.
    """
    log_q_z_given_x = diagonal_normal_log_prob(z.double(), mu[index].double(), logvar[index].double())
    q_z = DiagonalGaussianMixture(mu, logvar, small_components=0, chunk_size=chunk_size, block_size=block_size)
    log_q_z = q_z.log_prob(z, out_dtype=torch.float64)
    if prior is not None:
        log_p_z = _prior_log_prob(prior, z, prior_batch_size).double()
    else:
        log_p_z = torch.full_like(log_q_z, math.nan)
    return log_q_z_given_x, log_q_z, log_p_z


def _marginal_log_densities(mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
    """log q(z_d) of each dimension's aggregate posterior (exact over all N), float64 `[K, D]` for z `[K, D]`.

    `gaussian_mixture_marginals_logsumexp`: within 1e-12 nats of the float64 direct sum per value.
    """
    return gaussian_mixture_marginals_logsumexp(z, mu, logvar) - math.log(mu.shape[0])


def _dimwise_kl_per_dim(prior: Prior, z: Tensor, log_q_dims: Tensor, batch_size: int) -> list[float]:
    """KL(q(z_d) || p(z_d)) of each dimension, at the samples `z` `[K, D]` (a factorized prior)."""
    log_p_dims = torch.cat([prior.log_prob_per_dim(z[s : s + batch_size]) for s in range(0, len(z), batch_size)])
    return (log_q_dims - log_p_dims.double()).mean(0).tolist()


@torch.inference_mode()
def aggregate_terms(
    mu: Tensor,
    logvar: Tensor,
    prior: Prior | None,
    z: Tensor | None = None,
    index: Tensor | None = None,
    *,
    n_samples: int | None = None,
    dimwise_samples: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 2048,
    block_size: int = 2048,
    prior_batch_size: int = 10_000,
) -> AggregateTerms:
    """Mutual information, marginal KL, total correlation and the prior-mismatch remainder, exactly in q(z).

    log q(z) = logsumexp_n log q(z|x_n) - log N over all N posteriors, at M sample
    points z_m ~ q(z|x_{n_m}); the expectations over z are averages over the M samples.

    Args:
        mu, logvar: the N posteriors, `[N, D]`.
        prior: the prior p(z) (None skips the terms that need it: they come out NaN).
        z, index: optional sample points `[M, D]` and the index `[M]` of the posterior
            each was drawn from; drawn here if None.
        n_samples: M when drawing (None: one per posterior, M = N; less: a random
            subset of posteriors without replacement; more: cycles through them).
        dimwise_samples: how many of the M samples the per-dimension terms use
            (None: all). Their D one-dimensional marginals cost about 3e7 pairs of
            expansion work at N = M = 50,000, D = 40 (`gaussian_mixture_marginals_logsumexp`).
        generator: the random stream.
        chunk_size, block_size: the kernel's block (memory: chunk x block floats).
        prior_batch_size: points per call of `prior.log_prob`.

    Returns:
        `AggregateTerms`. Memory: O((M + N) D) plus the kernels' blocks (see
        `gaussian_mixture_logsumexp` and `gaussian_mixture_marginals_logsumexp`); freed
        blocks leave the process (`surgery.memory.pin_mmap_threshold`).

    References:
        Hoffman & Johnson, "ELBO surgery", 2016; Chen et al., "Isolating sources of
        disentanglement in VAEs", 2018.
    """
    n = mu.shape[0]
    if n == 0:
        raise ValueError("aggregate_terms needs at least one posterior")
    pin_mmap_threshold()
    generator = generator or torch.Generator(device=mu.device).manual_seed(0)
    kernel = {"chunk_size": chunk_size, "block_size": block_size}
    started = time.perf_counter()
    if z is None:
        index = _sample_index(n, n_samples, generator, mu.device)
        z = reparameterize(mu[index], logvar[index], generator)
    elif index is None or index.shape != z.shape[:1]:
        raise ValueError("aggregate_terms: pass index [M] with z [M, D]")
    m = z.shape[0]
    log_q_z_given_x, log_q_z, log_p_z = _joint_log_densities(
        mu, logvar, prior, z, index, prior_batch_size=prior_batch_size, **kernel
    )
    _wait_for(mu.device)
    seconds_aggregate = time.perf_counter() - started

    started = time.perf_counter()
    k = m if dimwise_samples is None else min(int(dimwise_samples), m)
    sub = torch.randperm(m, generator=generator, device=mu.device)[:k] if k < m else torch.arange(m, device=mu.device)
    log_q_dims = _marginal_log_densities(mu, logvar, z[sub])  # [k, D]
    remainder = Estimate.of(log_q_dims.sum(-1) - log_p_z[sub])
    factorized = prior is not None and prior.is_factorized
    per_dim = _dimwise_kl_per_dim(prior, z[sub], log_q_dims, prior_batch_size) if factorized else None
    seconds_dimwise = time.perf_counter() - started
    return AggregateTerms(
        mutual_info=Estimate.of(log_q_z_given_x - log_q_z),
        marginal_kl=Estimate.of(log_q_z - log_p_z),
        avg_kl_mc=Estimate.of(log_q_z_given_x - log_p_z),
        total_correlation=Estimate.of(log_q_z[sub] - log_q_dims.sum(-1)),
        prior_mismatch_remainder=remainder,
        dimwise_kl=remainder if factorized else None,
        dimwise_kl_per_dim=per_dim,
        n_samples=m,
        dimwise_samples=k,
        log_n=math.log(n),
        seconds_aggregate=seconds_aggregate,
        seconds_dimwise=seconds_dimwise,
        index=index,
        mutual_info_per_sample=log_q_z_given_x - log_q_z,
        marginal_kl_per_sample=log_q_z - log_p_z,
    )


def terms_by_size(
    mu: Tensor,
    logvar: Tensor,
    prior: Prior,
    sizes: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dimwise_samples: int | None = None,
    chunk_size: int = 2048,
    block_size: int = 2048,
    prior_batch_size: int = 10_000,
) -> list[AggregateTerms]:
    """`aggregate_terms` of the aggregate posterior of the first M posteriors, for each M in `sizes`.

    The M are nested prefixes of one random order of the N posteriors, so a larger M adds
    points to a smaller one's. While the posteriors barely overlap, q(z) of M points is M
    separate bumps: the mutual information sits at log M, and a fixed prior's marginal KL
    (average KL - MI) falls by one nat each time M grows e-fold, in the total correlation.
    That part is a property of the data set's size, not of the prior: a prior fitted to one
    set of points cannot place bumps on points it has not seen.

    Args:
        mu, logvar: the N posteriors, `[N, D]`.
        prior: the prior p(z).
        sizes: the M, each in 1..N, strictly increasing.
        generator: the random stream (the order, then each size's samples).
        dimwise_samples, chunk_size, block_size, prior_batch_size: as in `aggregate_terms`.
    """
    n = len(mu)
    sizes = [int(m) for m in sizes]
    if not sizes or any(m < 1 or m > n for m in sizes) or sizes != sorted(set(sizes)):
        raise ValueError(f"sizes must be strictly increasing, each in 1..{n} (the split's points); got {sizes}")
    generator = generator or torch.Generator(device=mu.device).manual_seed(0)
    order = torch.randperm(n, generator=generator, device=mu.device)
    mu, logvar = mu[order], logvar[order]
    return [
        aggregate_terms(
            mu[:m],
            logvar[:m],
            prior,
            dimwise_samples=dimwise_samples,
            generator=generator,
            chunk_size=chunk_size,
            block_size=block_size,
            prior_batch_size=prior_batch_size,
        )
        for m in sizes
    ]


#: On a GPU, a decoder call of the importance sampling sees at least this many output elements
#: (latent samples x pixels; 256 MiB of float32 logits): calls of the CPU's 2e6 elements are
#: launch-bound there (measured 2.69x the bare decoder passes on an H200, 2026-11).
CUDA_IS_BATCH_ELEMENTS = 1 << 26


def importance_batch_shape(
    n_samples: int, data_dim: int, batch_elements: int, device: torch.device | str
) -> tuple[int, int]:
    """(S, B) of `importance_log_likelihood`'s decoder calls: S latent samples for each of B points.

    B x S x data_dim <= max(`batch_elements`, `CUDA_IS_BATCH_ELEMENTS` on a GPU).
    """
    if torch.device(device).type == "cuda":
        batch_elements = max(batch_elements, CUDA_IS_BATCH_ELEMENTS)
    per_call = max(1, batch_elements // data_dim)  # latent samples per decoder call
    s = min(n_samples, per_call)
    return s, max(1, per_call // s)


@torch.inference_mode()
def importance_log_likelihood(
    model: Any,
    x: Tensor,
    n_samples: int = 5000,
    *,
    batch_elements: int = 2_000_000,
    generator: torch.Generator | None = None,
    progress: ProgressFactory | None = None,
    checkpoint: ImportanceCheckpoint | None = None,
) -> Tensor:
    """log p(x) per point by importance sampling with the encoder as proposal.

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).
    Batched over points and samples: each decoder call sees B x S latent samples with
    B x S x data_dim <= `batch_elements` (memory bound; on a GPU at least
    `CUDA_IS_BATCH_ELEMENTS`, see `importance_batch_shape`); the logsumexp over samples is
    kept online per point in float64, on the device (no host synchronization per call).

    Args:
        model: a VAE (encode, decode, log_likelihood, prior).
        x: points `[B, data_dim]`.
        n_samples: K.
        batch_elements: bound on the logits tensor of one decoder call.
        generator: the random stream (on the model's device). The draws depend on the call
            shape, so a GPU run draws other samples than a CPU run of the same seed.
        progress: told of the points done after each batch of them (`ProgressFactory`; called
            with `initial=` the points already done when the pass continues a saved state).
        checkpoint: keeps the pass's progress (`ImportanceCheckpoint`): the pass continues the
            state saved under its `importance_key`, if any, and saves its own when `due()`.

    Returns:
        `[B]` float64 log-likelihoods, in nats. Memory: one decoder call's tensors, which
        leave the process when freed (`surgery.memory.pin_mmap_threshold`).

    References:
        Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016 (the K = 5000 protocol).
    """
    pin_mmap_threshold()
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    s, b = importance_batch_shape(n_samples, x.shape[1], batch_elements, device)
    x = x.to(device)  # once: a copy per batch would wait for the device each time
    out: list[Tensor] = []
    first = 0
    key = importance_key(model, x, n_samples, (s, b), generator) if checkpoint is not None else ""
    if checkpoint is not None and (state := checkpoint.load(key)) is not None:
        if state.key != key or state.done > len(x) or (state.done % b and state.done != len(x)):
            raise ValueError(
                f"importance_log_likelihood: a saved state of {state.done} points does not continue this pass "
                f"({len(x)} points in batches of {b})"
            )
        generator.set_state(state.generator_state)
        out.append(state.values.to(device=device, dtype=torch.float64))
        first = state.done
    bar = None
    if progress is not None:
        resumed = {"initial": first} if first else {}
        bar = progress(total=len(x), desc=f"log p(x), K = {n_samples}", unit="points", **resumed)
    for start in range(first, len(x), b):
        xb = x[start : start + b]
        mu, logvar = model.encode(xb)
        running = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=device)
        for k0 in range(0, n_samples, s):
            k = min(s, n_samples - k0)
            eps = torch.randn((len(xb), k, mu.shape[1]), generator=generator, device=device, dtype=mu.dtype)
            z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * eps  # [b, k, D]
            log_px_z = model.log_likelihood(xb[:, None], model.decode(z))  # [b, k]
            log_pz = model.prior.log_prob(z.reshape(-1, z.shape[-1])).view(len(xb), k)
            # log q(z|x) from the standard normal draws: no cancellation in (z - mu)
            log_qz = -0.5 * (math.log(2 * math.pi) * mu.shape[1] + logvar.sum(-1)[:, None] + eps.square().sum(-1))
            log_w = (log_px_z + log_pz - log_qz).double()
            running = torch.logaddexp(running, torch.logsumexp(log_w, dim=1))
        out.append(running - math.log(n_samples))
        if bar is not None:
            bar.update(len(xb))
        if checkpoint is not None and start + b < len(x) and checkpoint.due():
            values = torch.cat(out)
            out = [values]
            checkpoint.save(ImportanceState(key, values.cpu(), generator.get_state()))
    if bar is not None:
        bar.close()
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64, device=device)


def importance_key(
    model: Any, x: Tensor, n_samples: int, call_shape: tuple[int, int], generator: torch.Generator
) -> str:
    """A digest of everything an importance pass's values depend on: the model's parameters and
    buffers, the points, K, the decoder calls' shape and the random stream where the pass starts.

    Two passes of one key draw the same samples and compute the same values, so a saved state
    of the key continues exactly; any other change (a weight, a point, the seed) changes the key.
    """
    digest = hashlib.sha256(b"priorlab importance pass, format 1")

    def add(tensor: Tensor) -> None:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    digest.update(f"K={int(n_samples)} calls={tuple(call_shape)} device={x.device.type}".encode())
    add(x)
    add(generator.get_state())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        add(tensor)
    return digest.hexdigest()


# ---- the whole decomposition, step by step ------------------------------------------------


@dataclass
class PointTerms:
    """The ELBO's terms per point at one sample z_n ~ q(z|x_n) per point, each float64 `[N]`."""

    reconstruction: Tensor  # log p(x_n|z_n)
    kl: Tensor  # KL(q(z|x_n) || p(z)): analytic, or log q(z_n|x_n) - log p(z_n) at the sample
    kl_analytic: bool


@dataclass
class BoundTerms:
    """The ELBO, its two terms, the identity check and the optimal-prior ELBO, as estimates."""

    reconstruction: Estimate
    avg_kl: Estimate
    elbo: Estimate
    identity_gap: Estimate  # avg KL - (MI + marginal KL)
    optimal_prior_elbo: Estimate  # ELBO + marginal KL


def point_terms(model: Any, x: Tensor, mu: Tensor, logvar: Tensor, z: Tensor, batch_size: int) -> PointTerms:
    """Reconstruction log p(x_n|z_n) and KL of every point at its sample z_n, in batches of `batch_size`."""
    device = z.device
    recon = torch.cat(
        [
            model.log_likelihood(x[s : s + batch_size].to(device), model.decode(z[s : s + batch_size]))
            for s in range(0, len(x), batch_size)
        ]
    ).double()
    prior = model.prior
    if prior.has_analytic_kl:
        kl = torch.cat(
            [prior.kl(mu[s : s + batch_size], logvar[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        ).double()
    else:
        log_p_z = _prior_log_prob(prior, z, batch_size).double()
        kl = diagonal_normal_log_prob(z.double(), mu.double(), logvar.double()) - log_p_z
    return PointTerms(recon, kl, bool(prior.has_analytic_kl))


def aggregate_sample_points(
    mu: Tensor, logvar: Tensor, z: Tensor, n_samples: int | None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The M points at which log q(z) is evaluated, `[M, D]`, and the posterior of each, `[M]`.

    With M = N (n_samples None or N) they are the ELBO's own samples z, so every term pairs
    point by point; otherwise M fresh draws (`_sample_index` picks the posteriors).
    """
    n = len(mu)
    if n_samples is None or n_samples == n:
        return z, torch.arange(n, device=mu.device)
    index = _sample_index(n, n_samples, generator, mu.device)
    return reparameterize(mu[index], logvar[index], generator), index


def bound_terms(points: PointTerms, agg: AggregateTerms, same_samples: bool) -> BoundTerms:
    """Combine the per-point terms with the aggregate ones.

    The identity average KL = MI + marginal KL holds exactly in expectation; its check
    compares the average KL with the Monte Carlo MI + marginal KL. `same_samples`: the
    aggregate terms were evaluated at the ELBO's own samples (M = N), so they pair point
    by point with the per-point terms.
    """
    recon, kl = points.reconstruction, points.kl
    avg_kl = Estimate(float(kl.mean()), 0.0) if points.kl_analytic else Estimate.of(kl)
    mc_kl = agg.mutual_info_per_sample + agg.marginal_kl_per_sample  # [M]
    gap_value = avg_kl.value - float(mc_kl.mean())
    if points.kl_analytic:
        gap = Estimate(gap_value, Estimate.of(kl[agg.index] - mc_kl).stderr)
    elif same_samples:  # the Monte Carlo KL *is* MI + marginal KL sample by sample
        gap = Estimate(gap_value, 0.0)
    else:
        gap = Estimate(gap_value, math.hypot(avg_kl.stderr, Estimate.of(mc_kl).stderr))
    elbo = Estimate.of(recon - kl)
    if same_samples:  # pair the terms point by point
        optimal = Estimate.of(recon - kl + agg.marginal_kl_per_sample)
    else:
        optimal = Estimate(elbo.value + agg.marginal_kl.value, math.hypot(elbo.stderr, agg.marginal_kl.stderr))
    return BoundTerms(Estimate.of(recon), avg_kl, elbo, gap, optimal)


def split_log_likelihood(
    model: Any,
    data: Any,
    split: str,
    n_points: int | None,
    n_samples: int,
    batch_elements: int,
    generator: torch.Generator,
    progress: ProgressFactory | None = None,
    checkpoint: ImportanceCheckpoint | None = None,
) -> Tensor:
    """Importance-sampled log p(x) of the first `n_points` of `split` (None: all), float64 `[points]` on the CPU."""
    x = data.split(split)
    if n_points is not None:
        x = x[: int(n_points)]
    return importance_log_likelihood(
        model,
        x,
        int(n_samples),
        batch_elements=batch_elements,
        generator=generator,
        progress=progress,
        checkpoint=checkpoint,
    ).cpu()


def assemble_report(
    split: str,
    n_points: int,
    latent_dim: int,
    prior: Prior,
    bounds: BoundTerms,
    agg: AggregateTerms,
    log_likelihood: tuple[str, int, Tensor] | None,
    seconds: dict[str, float],
) -> SurgeryReport:
    """The `SurgeryReport` of the pieces; `log_likelihood` is (its split, K, its per-point values) or None."""
    ll_split, ll_samples, ll_per_point = log_likelihood if log_likelihood is not None else (None, None, None)
    return SurgeryReport(
        split=split,
        n_points=n_points,
        n_samples=agg.n_samples,
        elbo=bounds.elbo,
        reconstruction=bounds.reconstruction,
        avg_kl=bounds.avg_kl,
        avg_kl_analytic=bool(prior.has_analytic_kl),
        mutual_info=agg.mutual_info,
        marginal_kl=agg.marginal_kl,
        log_n=agg.log_n,
        identity_gap=bounds.identity_gap,
        total_correlation=agg.total_correlation,
        dimwise_kl=agg.dimwise_kl,
        prior_mismatch_remainder=agg.prior_mismatch_remainder,
        dimwise_samples=agg.dimwise_samples,
        prior_factorized=bool(prior.is_factorized),
        dimwise_kl_per_dim=agg.dimwise_kl_per_dim,
        optimal_prior_elbo=bounds.optimal_prior_elbo,
        log_likelihood=None if ll_per_point is None else Estimate.of(ll_per_point),
        log_likelihood_split=ll_split,
        is_samples=ll_samples,
        is_points=None if ll_per_point is None else len(ll_per_point),
        latent_dim=latent_dim,
        prior=type(prior).__name__,
        seconds=seconds,
        log_likelihood_per_point=ll_per_point,
    )


def decompose(
    model: Any,
    data: Any,
    split: str = "train",
    *,
    n_samples: int | None = None,
    dimwise_samples: int | None = None,
    is_samples: int | None = 5000,
    is_points: int | None = None,
    is_split: str = "test",
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 1000,
    chunk_size: int = 2048,
    block_size: int = 2048,
    is_batch_elements: int = 2_000_000,
    progress: ProgressFactory | None = None,
    is_checkpoint: ImportanceCheckpoint | None = None,
) -> SurgeryReport:
    """The ELBO decomposition of `model` on `data.split(split)`, exactly in q(z), with standard errors.

    Args:
        model: a `vae.model.VAE` (or anything with `encoder`, `encode`, `decode`, `log_likelihood`,
            `prior`, `parameters`); it is moved to `device` and put in eval mode.
        data: a `vae.data.BinarizedData` (anything with `split(name)`); the fixed
            binarization of each split is used.
        split: where the decomposition is computed ("train": N = 50,000 on MNIST).
        n_samples: M, the samples z ~ q(z|x_n) at which log q(z) is evaluated exactly
            (None: one per point). The reconstruction uses one sample per point.
        dimwise_samples: how many of the M samples the total correlation and the
            prior-mismatch remainder use (None: all M).
        is_samples: K for the importance-sampled log p(x) (None or 0: skip it).
        is_points: how many points of `is_split` (the first ones) to estimate log p(x) on
            (None: all).
        is_split: the split of the log-likelihood ("test").
        seed: seeds every random draw (a forked stream: the global RNG is untouched).
        device: where to compute (None: the model's device).
        batch_size: points per encoder/decoder call for the ELBO terms.
        chunk_size, block_size: the mixture kernel's block (memory bound).
        is_batch_elements: bound on the decoder's output per call in the log-likelihood.
        progress: reports the log-likelihood's pass over the points, the long part
            (`ProgressFactory`; None: silent).
        is_checkpoint: keeps that pass's progress, so that a stopped one continues where it
            was, to the same values (`ImportanceCheckpoint`; None: not kept).

    Returns:
        A `SurgeryReport`.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    seconds: dict[str, float] = {}
    # One stream, consumed in this order: the ELBO's samples, the aggregate samples (M != N),
    # the subset for the per-dimension terms, the importance samples.
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            x = data.split(split)
            mu, logvar = encode(model, x, batch_size, device)
            z = reparameterize(mu, logvar, generator)  # one sample per point
            points = point_terms(model, x, mu, logvar, z, batch_size)
            seconds["elbo"] = time.perf_counter() - started

            z_agg, index = aggregate_sample_points(mu, logvar, z, n_samples, generator)
            agg = aggregate_terms(
                mu,
                logvar,
                model.prior,
                z_agg,
                index,
                dimwise_samples=dimwise_samples,
                generator=generator,
                chunk_size=chunk_size,
                block_size=block_size,
                prior_batch_size=batch_size,
            )
            seconds["mutual_info_marginal_kl"] = agg.seconds_aggregate
            seconds["tc_dimwise"] = agg.seconds_dimwise
            bounds = bound_terms(points, agg, same_samples=z_agg is z)

            log_likelihood = None
            if is_samples:
                started = time.perf_counter()
                per_point = split_log_likelihood(
                    model, data, is_split, is_points, is_samples, is_batch_elements, generator, progress, is_checkpoint
                )
                log_likelihood = (is_split, int(is_samples), per_point)
                seconds["log_likelihood"] = time.perf_counter() - started
    finally:
        model.train(was_training)
    return assemble_report(split, len(x), int(mu.shape[1]), model.prior, bounds, agg, log_likelihood, seconds)
