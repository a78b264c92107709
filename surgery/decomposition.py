"""ELBO surgery: the exact decomposition of the ELBO over a whole data split.

    ELBO        = reconstruction - average KL
    average KL  = I[n; z] + KL(q(z) || p(z))                      (Hoffman & Johnson 2016)
    KL(q || p)  = total correlation + dimension-wise KL           (Chen et al. 2018)

The aggregate posterior q(z) = 1/N sum_n q(z|x_n) is evaluated exactly, over all N
posteriors, by `priors.densities.DiagonalGaussianMixture`; only the outer
expectations over z are Monte Carlo, and each comes with its standard error.

Everything here is a pure function of a model and data: no prints, no files. The CLI
(`python -m surgery`) and `train.py` print, save and log the `SurgeryReport`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from priors.base import Prior
from priors.densities import DiagonalGaussianMixture, diagonal_normal_log_prob
from vae.callbacks import encode as encode_in_batches

ESTIMATES = (
    "elbo",
    "reconstruction",
    "avg_kl",
    "mutual_info",
    "marginal_kl",
    "total_correlation",
    "dimwise_kl",
    "optimal_prior_elbo",
    "log_likelihood",
)


@dataclass
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
    dimwise_kl: Estimate  # factorized prior: sum_d KL(q(z_d) || p(z_d)); else E_q[log prod_d q(z_d) - log p(z)]
    dimwise_kl_per_dim: list[float] | None  # factorized priors only
    n_samples: int  # M, the points z at which log q(z) is evaluated
    dimwise_samples: int  # the subset of them used for TC and the dimension-wise KL
    log_n: float
    seconds_aggregate: float
    seconds_dimwise: float
    index: Tensor = field(repr=False)  # [M]: the posterior each sample was drawn from
    mutual_info_per_sample: Tensor = field(repr=False)  # [M] log q(z|x_n) - log q(z)
    marginal_kl_per_sample: Tensor = field(repr=False)  # [M] log q(z) - log p(z)


@dataclass
class SurgeryReport:
    """The ELBO decomposition of one model on one split, in nats per data point.

    `*_stderr` is the standard error of each Monte Carlo estimate (0 for an exact one:
    the analytic average KL). See docs/surgery.md for what each number means.
    """

    split: str
    n_points: int
    n_samples: int
    elbo: float
    elbo_stderr: float
    reconstruction: float
    reconstruction_stderr: float
    avg_kl: float
    avg_kl_stderr: float
    avg_kl_analytic: bool
    mutual_info: float
    mutual_info_stderr: float
    marginal_kl: float
    marginal_kl_stderr: float
    log_n: float
    identity_gap: float  # avg_kl - (mutual_info + marginal_kl): zero up to Monte Carlo error
    identity_gap_stderr: float
    total_correlation: float
    total_correlation_stderr: float
    dimwise_kl: float
    dimwise_kl_stderr: float
    dimwise_samples: int
    prior_factorized: bool
    dimwise_kl_per_dim: list[float] | None
    optimal_prior_elbo: float
    optimal_prior_elbo_stderr: float
    log_likelihood: float | None
    log_likelihood_stderr: float | None
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
        out = asdict(self)
        out.pop("log_likelihood_per_point")
        return out

    def metrics(self, prefix: str = "surgery/") -> dict[str, float]:
        """The numbers as flat scalar metrics (for a logger's summary)."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            out[prefix + key] = value
        return out

    def rows(self) -> list[list[Any]]:
        """`[name, value, stderr]` rows of the decomposition (for a table)."""
        rows = []
        for name in ESTIMATES:
            value = getattr(self, name)
            if value is not None:
                rows.append([name, value, getattr(self, name + "_stderr")])
        rows.append(["log_n", self.log_n, 0.0])
        rows.append(["identity_gap", self.identity_gap, self.identity_gap_stderr])
        return rows

    def table(self) -> str:
        """A readable plain-text table."""
        dimwise_name = "dimension-wise KL" if self.prior_factorized else "remainder E[log prod q(z_d) - log p(z)]"
        lines = [
            f"ELBO surgery on the {self.split} split: N = {self.n_points:,} points, M = {self.n_samples:,} samples "
            f"of z, prior {self.prior}, {self.latent_dim}-D latents (nats per data point, +- one standard error)",
        ]

        def row(label: str, value: float | None, stderr: float | None, note: str = "") -> None:
            if value is None:
                return
            se = "" if stderr is None or stderr == 0 else f" +- {stderr:.4f}"
            lines.append(f"  {label:<38} {value:>12.4f}{se:<12} {note}".rstrip())

        row("ELBO", self.elbo, self.elbo_stderr)
        row("  reconstruction E_q[log p(x|z)]", self.reconstruction, self.reconstruction_stderr)
        row("  average KL", self.avg_kl, self.avg_kl_stderr, "(analytic)" if self.avg_kl_analytic else "(Monte Carlo)")
        row(
            "    index-code mutual info I[n;z]",
            self.mutual_info,
            self.mutual_info_stderr,
            f"(log N = {self.log_n:.4f})",
        )
        row("    marginal KL(q(z)||p(z))", self.marginal_kl, self.marginal_kl_stderr)
        row(
            "      total correlation",
            self.total_correlation,
            self.total_correlation_stderr,
            f"(M = {self.dimwise_samples:,})",
        )
        row(f"      {dimwise_name}", self.dimwise_kl, self.dimwise_kl_stderr, f"(M = {self.dimwise_samples:,})")
        row("  check: avg KL - (MI + marginal KL)", self.identity_gap, self.identity_gap_stderr, "(0 up to MC error)")
        row("optimal-prior ELBO (ELBO + marginal KL)", self.optimal_prior_elbo, self.optimal_prior_elbo_stderr)
        if self.log_likelihood is not None:
            row(
                f"log p(x), {self.log_likelihood_split}, IS K={self.is_samples}",
                self.log_likelihood,
                self.log_likelihood_stderr,
                f"({self.is_points:,} points)",
            )
        return "\n".join(lines)


# ---- pieces ---------------------------------------------------------------------------


@torch.inference_mode()
def encode(model: Any, x: Tensor, batch_size: int = 1000, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Posterior parameters of every point: (mu, logvar), each `[N, D]`, on `device` (the model's by default)."""
    return encode_in_batches(model.encoder, x, batch_size, device or next(model.parameters()).device)


def draw(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z ~ N(mu, diag(exp(logvar))) by reparameterization, one draw per row."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def _prior_log_prob(prior: Prior, z: Tensor, batch_size: int) -> Tensor:
    return torch.cat([prior.log_prob(z[s : s + batch_size]) for s in range(0, len(z), batch_size)])


@torch.inference_mode()
def aggregate_terms(
    mu: Tensor,
    logvar: Tensor,
    prior: Prior | None,
    z: Tensor | None = None,
    index: Tensor | None = None,
    *,
    n_samples: int | None = None,
    dimwise_samples: int | None = 10_000,
    generator: torch.Generator | None = None,
    chunk_size: int = 2048,
    block_size: int = 2048,
    prior_batch_size: int = 10_000,
) -> AggregateTerms:
    """Mutual information, marginal KL, total correlation and dimension-wise KL, exactly in q(z).

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
            (None: all). They cost D one-dimensional kernels of that many rows x N.
        generator: the random stream.
        chunk_size, block_size: the kernel's block (memory: chunk x block floats).
        prior_batch_size: points per call of `prior.log_prob`.

    Returns:
        `AggregateTerms`. Memory: O((M + N) D) plus the kernel's block.

    References:
        Hoffman & Johnson, "ELBO surgery", 2016; Chen et al., "Isolating sources of
        disentanglement in VAEs", 2018.
    """
    n, d = mu.shape
    if n == 0:
        raise ValueError("aggregate_terms needs at least one posterior")
    generator = generator or torch.Generator(device=mu.device).manual_seed(0)
    started = time.perf_counter()
    if z is None:
        index = _sample_index(n, n_samples, generator, mu.device)
        z = draw(mu[index], logvar[index], generator)
    elif index is None or index.shape != z.shape[:1]:
        raise ValueError("aggregate_terms: pass index [M] with z [M, D]")
    m = z.shape[0]
    log_n = math.log(n)
    log_q_z_given_x = diagonal_normal_log_prob(z.double(), mu[index].double(), logvar[index].double())
    q_z = DiagonalGaussianMixture(mu, logvar, small_components=0, chunk_size=chunk_size, block_size=block_size)
    log_q_z = q_z.log_prob(z, out_dtype=torch.float64)
    if prior is not None:
        log_p_z = _prior_log_prob(prior, z, prior_batch_size).double()
    else:
        log_p_z = torch.full_like(log_q_z, math.nan)
    mutual_info = Estimate.of(log_q_z_given_x - log_q_z)
    marginal_kl = Estimate.of(log_q_z - log_p_z)
    avg_kl_mc = Estimate.of(log_q_z_given_x - log_p_z)
    seconds_aggregate = time.perf_counter() - started

    started = time.perf_counter()
    k = m if dimwise_samples is None else min(int(dimwise_samples), m)
    sub = torch.randperm(m, generator=generator, device=mu.device)[:k] if k < m else torch.arange(m, device=mu.device)
    zs = z[sub]
    log_q_dims = torch.stack(
        [
            DiagonalGaussianMixture(
                mu[:, j : j + 1].contiguous(),
                logvar[:, j : j + 1].contiguous(),
                small_components=0,
                chunk_size=chunk_size,
                block_size=block_size,
            ).log_prob(zs[:, j : j + 1].contiguous(), out_dtype=torch.float64)
            for j in range(d)
        ],
        dim=-1,
    )  # [k, D]
    total_correlation = Estimate.of(log_q_z[sub] - log_q_dims.sum(-1))
    dimwise_kl = Estimate.of(log_q_dims.sum(-1) - log_p_z[sub])
    per_dim = None
    if prior is not None and prior.is_factorized:
        log_p_dims = torch.cat(
            [prior.log_prob_per_dim(zs[s : s + prior_batch_size]) for s in range(0, k, prior_batch_size)]
        )
        per_dim = (log_q_dims - log_p_dims.double()).mean(0).tolist()
    return AggregateTerms(
        mutual_info=mutual_info,
        marginal_kl=marginal_kl,
        avg_kl_mc=avg_kl_mc,
        total_correlation=total_correlation,
        dimwise_kl=dimwise_kl,
        dimwise_kl_per_dim=per_dim,
        n_samples=m,
        dimwise_samples=k,
        log_n=log_n,
        seconds_aggregate=seconds_aggregate,
        seconds_dimwise=time.perf_counter() - started,
        index=index,
        mutual_info_per_sample=log_q_z_given_x - log_q_z,
        marginal_kl_per_sample=log_q_z - log_p_z,
    )


def _sample_index(n: int, n_samples: int | None, generator: torch.Generator, device: torch.device) -> Tensor:
    if n_samples is None or n_samples == n:
        return torch.arange(n, device=device)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive or None, got {n_samples}")
    if n_samples < n:
        return torch.randperm(n, generator=generator, device=device)[:n_samples].sort().values
    return torch.arange(n_samples, device=device) % n


@torch.inference_mode()
def importance_log_likelihood(
    model: Any,
    x: Tensor,
    n_samples: int = 5000,
    *,
    batch_elements: int = 2_000_000,
    generator: torch.Generator | None = None,
) -> Tensor:
    """log p(x) per point by importance sampling with the encoder as proposal.

    log p(x) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x).
    Batched over points and samples: each decoder call sees B x S latent samples with
    B x S x data_dim <= `batch_elements` (memory bound); the logsumexp over samples is
    kept online per point in float64.

    Args:
        model: a VAE (encode, decode, log_likelihood, prior).
        x: points `[B, data_dim]`.
        n_samples: K.
        batch_elements: bound on the logits tensor of one decoder call.
        generator: the random stream (on the model's device).

    Returns:
        `[B]` float64 log-likelihoods, in nats.

    References:
        Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", 2016 (the K = 5000 protocol).
    """
    device = next(model.parameters()).device
    generator = generator or torch.Generator(device=device).manual_seed(0)
    data_dim = x.shape[1]
    per_call = max(1, batch_elements // data_dim)  # latent samples per decoder call
    s = min(n_samples, per_call)
    b = max(1, per_call // s)
    out = []
    for start in range(0, len(x), b):
        xb = x[start : start + b].to(device)
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
    return torch.cat(out)


# ---- the whole decomposition -------------------------------------------------------------


def decompose(
    model: Any,
    data: Any,
    split: str = "train",
    *,
    n_samples: int | None = None,
    dimwise_samples: int | None = 10_000,
    is_samples: int | None = 5000,
    is_points: int | None = None,
    is_split: str = "test",
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 1000,
    chunk_size: int = 2048,
    block_size: int = 2048,
    is_batch_elements: int = 2_000_000,
) -> SurgeryReport:
    """The ELBO decomposition of `model` on `data.split(split)`, exactly in q(z), with standard errors.

    Args:
        model: a `vae.model.VAE` (or anything with `encode`, `decode`, `log_likelihood`,
            `prior`, `parameters`); it is moved to `device` and put in eval mode.
        data: a `vae.data.BinarizedData` (anything with `split(name)`); the fixed
            binarization of each split is used.
        split: where the decomposition is computed ("train": N = 50,000 on MNIST).
        n_samples: M, the samples z ~ q(z|x_n) at which log q(z) is evaluated exactly
            (None: one per point). The reconstruction uses one sample per point.
        dimwise_samples: how many of the M samples the total correlation and the
            dimension-wise KL use (None: all M; they cost D times the MI kernel).
        is_samples: K for the importance-sampled log p(x) (None or 0: skip it).
        is_points: how many points of `is_split` (the first ones) to estimate log p(x) on
            (None: all).
        is_split: the split of the log-likelihood ("test").
        seed: seeds every random draw (a forked stream: the global RNG is untouched).
        device: where to compute (None: the model's device).
        batch_size: points per encoder/decoder call for the ELBO terms.
        chunk_size, block_size: the mixture kernel's block (memory bound).
        is_batch_elements: bound on the decoder's output per call in the log-likelihood.

    Returns:
        A `SurgeryReport`.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    seconds: dict[str, float] = {}
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        with torch.inference_mode():
            started = time.perf_counter()
            x = data.split(split)
            mu, logvar = encode(model, x, batch_size, device)
            z = draw(mu, logvar, generator)  # one sample per point
            recon = torch.cat(
                [
                    model.log_likelihood(x[s : s + batch_size].to(device), model.decode(z[s : s + batch_size]))
                    for s in range(0, len(x), batch_size)
                ]
            ).double()
            prior = model.prior
            log_p_z = _prior_log_prob(prior, z, batch_size).double()
            log_q_z_given_x = diagonal_normal_log_prob(z.double(), mu.double(), logvar.double())
            if prior.has_analytic_kl:
                kl = torch.cat(
                    [prior.kl(mu[s : s + batch_size], logvar[s : s + batch_size]) for s in range(0, len(x), batch_size)]
                ).double()
            else:
                kl = log_q_z_given_x - log_p_z
            seconds["elbo"] = time.perf_counter() - started

            n = len(x)
            if n_samples is None or n_samples == n:
                z_agg, index = z, torch.arange(n, device=device)
            else:
                index = _sample_index(n, n_samples, generator, device)
                z_agg = draw(mu[index], logvar[index], generator)
            agg = aggregate_terms(
                mu,
                logvar,
                prior,
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

            reconstruction = Estimate.of(recon)
            avg_kl = Estimate(float(kl.mean()), 0.0) if prior.has_analytic_kl else Estimate.of(kl)
            elbo = Estimate.of(recon - kl)
            # The identity average KL = MI + marginal KL holds exactly in expectation; its
            # check compares the average KL with the Monte Carlo MI + marginal KL.
            mc_kl = agg.mutual_info_per_sample + agg.marginal_kl_per_sample  # [M]
            same_samples = z_agg is z
            if prior.has_analytic_kl:
                gap = Estimate(avg_kl.value - float(mc_kl.mean()), Estimate.of(kl[index] - mc_kl).stderr)
            elif same_samples:  # the Monte Carlo KL *is* MI + marginal KL sample by sample
                gap = Estimate(avg_kl.value - float(mc_kl.mean()), 0.0)
            else:
                gap = Estimate(avg_kl.value - float(mc_kl.mean()), math.hypot(avg_kl.stderr, Estimate.of(mc_kl).stderr))
            if same_samples:  # pair the terms point by point
                optimal = Estimate.of(recon - kl + agg.marginal_kl_per_sample)
            else:
                optimal = Estimate(elbo.value + agg.marginal_kl.value, math.hypot(elbo.stderr, agg.marginal_kl.stderr))

            ll = ll_per_point = None
            n_is = None
            if is_samples:
                started = time.perf_counter()
                x_test = data.split(is_split)
                if is_points is not None:
                    x_test = x_test[: int(is_points)]
                n_is = len(x_test)
                ll_per_point = importance_log_likelihood(
                    model, x_test, int(is_samples), batch_elements=is_batch_elements, generator=generator
                ).cpu()
                ll = Estimate.of(ll_per_point)
                seconds["log_likelihood"] = time.perf_counter() - started
    finally:
        model.train(was_training)

    return SurgeryReport(
        split=split,
        n_points=n,
        n_samples=agg.n_samples,
        elbo=elbo.value,
        elbo_stderr=elbo.stderr,
        reconstruction=reconstruction.value,
        reconstruction_stderr=reconstruction.stderr,
        avg_kl=avg_kl.value,
        avg_kl_stderr=avg_kl.stderr,
        avg_kl_analytic=bool(prior.has_analytic_kl),
        mutual_info=agg.mutual_info.value,
        mutual_info_stderr=agg.mutual_info.stderr,
        marginal_kl=agg.marginal_kl.value,
        marginal_kl_stderr=agg.marginal_kl.stderr,
        log_n=agg.log_n,
        identity_gap=gap.value,
        identity_gap_stderr=gap.stderr,
        total_correlation=agg.total_correlation.value,
        total_correlation_stderr=agg.total_correlation.stderr,
        dimwise_kl=agg.dimwise_kl.value,
        dimwise_kl_stderr=agg.dimwise_kl.stderr,
        dimwise_samples=agg.dimwise_samples,
        prior_factorized=bool(prior.is_factorized),
        dimwise_kl_per_dim=agg.dimwise_kl_per_dim,
        optimal_prior_elbo=optimal.value,
        optimal_prior_elbo_stderr=optimal.stderr,
        log_likelihood=None if ll is None else ll.value,
        log_likelihood_stderr=None if ll is None else ll.stderr,
        log_likelihood_split=is_split if ll is not None else None,
        is_samples=int(is_samples) if ll is not None else None,
        is_points=n_is,
        latent_dim=int(mu.shape[1]),
        prior=type(prior).__name__,
        seconds=seconds,
        log_likelihood_per_point=ll_per_point,
    )
