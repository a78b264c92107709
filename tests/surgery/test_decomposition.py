"""The ELBO surgery evaluator against float64 brute force (plain double loops) and analytic cases."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from priors.gaussian import GaussianPrior
from surgery import SurgeryReport, aggregate_terms, decompose, importance_log_likelihood, terms_by_size
from surgery.decomposition import (
    CUDA_IS_BATCH_ELEMENTS,
    ImportanceState,
    importance_batch_shape,
    importance_key,
    upgrade_dict,
)
from surgery.text import format_table, table_rows
from vae.model import VAE

ROOT = Path(__file__).resolve().parents[2]


class FixedData:
    """Anything with `split(name)` serves as data."""

    def __init__(self, **splits):
        self.splits = splits

    def split(self, name):
        return self.splits[name]


def tiny_vae(seed=0, data_dim=6, latent_dim=2, dtype=torch.float64):
    torch.manual_seed(seed)
    model = VAE.mlp(data_dim, latent_dim, [5], GaussianPrior(latent_dim)).to(dtype)
    with torch.no_grad():  # sharpen the posteriors so MI is far from 0 and from log N
        model.encoder.net[-1].bias[latent_dim:] -= 4.0
        model.encoder.net[-1].weight.mul_(8.0)
    return model


def log_normal_1d(z, mu, logvar):
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / math.exp(logvar))


def mean_and_stderr(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def brute_force(mu, logvar, z, recon=None, kl=None, index=None):
    """Every aggregate term by double loops over samples and posteriors, in float64 Python floats.

    `index[m]` is the posterior sample m was drawn from (default: sample m from posterior m);
    the prior is N(0, I)."""
    mu, logvar, z = mu.tolist(), logvar.tolist(), torch.as_tensor(z).tolist()
    n, d = len(mu), len(mu[0])
    index = list(range(len(z))) if index is None else list(index)
    mi, mkl, tc, dw, per_dim = [], [], [], [], [[] for _ in range(d)]
    for m, zm in enumerate(z):
        comps = [sum(log_normal_1d(zm[j], mu[i][j], logvar[i][j]) for j in range(d)) for i in range(n)]
        top = max(comps)
        log_q = top + math.log(sum(math.exp(c - top) for c in comps)) - math.log(n)
        log_q_dims = []
        for j in range(d):
            cs = [log_normal_1d(zm[j], mu[i][j], logvar[i][j]) for i in range(n)]
            t = max(cs)
            log_q_dims.append(t + math.log(sum(math.exp(c - t) for c in cs)) - math.log(n))
        log_p_dims = [log_normal_1d(zm[j], 0.0, 0.0) for j in range(d)]
        log_p = sum(log_p_dims)
        mi.append(comps[index[m]] - log_q)
        mkl.append(log_q - log_p)
        tc.append(log_q - sum(log_q_dims))
        dw.append(sum(log_q_dims) - log_p)
        for j in range(d):
            per_dim[j].append(log_q_dims[j] - log_p_dims[j])
    out = {
        "mutual_info": mean_and_stderr(mi),
        "marginal_kl": mean_and_stderr(mkl),
        "total_correlation": mean_and_stderr(tc),
        "prior_mismatch_remainder": mean_and_stderr(dw),
        "dimwise_kl": mean_and_stderr(dw),  # N(0, I) factorizes: the remainder is the dimension-wise KL
        "per_dim": [sum(v) / len(v) for v in per_dim],
    }
    if recon is not None:
        out["reconstruction"] = mean_and_stderr(recon)
        out["elbo"] = mean_and_stderr([r - k for r, k in zip(recon, kl, strict=False)])
        out["optimal_prior_elbo"] = mean_and_stderr([r - k + g for r, k, g in zip(recon, kl, mkl, strict=False)])
        out["avg_kl"] = (sum(kl) / len(kl), 0.0)
    return out


def test_decompose_matches_brute_force_to_1e6():
    model = tiny_vae()
    x = torch.bernoulli(torch.full((15, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    report = decompose(
        model,
        FixedData(train=x),
        n_samples=None,
        dimwise_samples=None,
        is_samples=None,
        seed=5,
        chunk_size=4,
        block_size=8,
    )

    # Redo it by hand: the same draws, then double loops.
    with torch.no_grad():
        mu, logvar = model.encode(x)
        g = torch.Generator().manual_seed(5)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g, dtype=mu.dtype)
        logits = model.decode(z)
    recon, kl = [], []
    for n in range(15):
        r = 0.0
        for p in range(6):
            line, xv = float(logits[n, p]), float(x[n, p])
            r += xv * -math.log1p(math.exp(-line)) + (1 - xv) * -math.log1p(math.exp(line))
        recon.append(r)
        kl.append(
            sum(
                0.5 * (math.exp(float(logvar[n, j])) + float(mu[n, j]) ** 2 - 1 - float(logvar[n, j])) for j in range(2)
            )
        )
    ref = brute_force(mu, logvar, z, recon, kl)

    for name in (
        "elbo",
        "reconstruction",
        "avg_kl",
        "mutual_info",
        "marginal_kl",
        "total_correlation",
        "dimwise_kl",
        "prior_mismatch_remainder",
        "optimal_prior_elbo",
    ):
        value, stderr = ref[name]
        assert getattr(report, name).value == pytest.approx(value, abs=1e-6), name
        assert getattr(report, name).stderr == pytest.approx(stderr, abs=1e-6), name
    assert report.dimwise_kl_per_dim == pytest.approx(ref["per_dim"], abs=1e-6)
    assert report.log_n == pytest.approx(math.log(15), abs=1e-12)
    assert 0.5 < report.mutual_info.value < math.log(15)  # a case where MI is informative
    # avg KL = MI + marginal KL, up to Monte Carlo error of the right size
    assert abs(report.identity_gap.value) < 4 * report.identity_gap.stderr + 1e-9
    assert report.n_points == report.n_samples == 15


AGGREGATE = ("mutual_info", "marginal_kl", "total_correlation", "prior_mismatch_remainder", "dimwise_kl")


def reference_expectations(mu, logvar, draws_per_posterior, seed):
    """The aggregate terms' expectations: `brute_force` at `draws_per_posterior` independent draws from
    every posterior (Python's own random stream, so nothing is shared with the code under test)."""
    rng = random.Random(seed)
    z, index = [], []
    for i, (m, lv) in enumerate(zip(mu.tolist(), logvar.tolist(), strict=True)):
        for _ in range(draws_per_posterior):
            z.append([a + math.exp(0.5 * b) * rng.gauss(0.0, 1.0) for a, b in zip(m, lv, strict=True)])
            index.append(i)
    return brute_force(mu, logvar, torch.tensor(z, dtype=torch.float64), index=index)


def test_aggregate_terms_match_brute_force_with_subsamples():
    g = torch.Generator().manual_seed(0)
    mu, logvar = (
        torch.randn(20, 3, generator=g, dtype=torch.float64),
        torch.randn(20, 3, generator=g, dtype=torch.float64) - 1,
    )
    prior = GaussianPrior(3).double()
    kernel = {"chunk_size": 3, "block_size": 4}

    # Given points from some of the posteriors (one twice, most never): every value and stderr
    # equals the double loop at the same points, MI taking log q(z|x_n) from the right posterior.
    index = torch.tensor([3, 3, 7, 0, 19, 11, 12, 5, 16])
    z = mu[index] + torch.exp(0.5 * logvar[index]) * torch.randn((9, 3), generator=g, dtype=torch.float64)
    terms = aggregate_terms(mu, logvar, prior, z, index, dimwise_samples=None, **kernel)
    ref = brute_force(mu, logvar, z, index=index.tolist())
    assert terms.n_samples == terms.dimwise_samples == 9 and terms.index.tolist() == index.tolist()
    for name in AGGREGATE:
        estimate = getattr(terms, name)
        assert (estimate.value, estimate.stderr) == pytest.approx(ref[name], abs=1e-9), name
    assert terms.dimwise_kl_per_dim == pytest.approx(ref["per_dim"], abs=1e-9)

    # Drawn by aggregate_terms itself: M = 12 of the N = 20 posteriors (a random subset), or M = 60
    # (each posterior 3 times). Unbiased for the expectations, so within Monte Carlo error of the
    # reference's own 2,000 independent draws.
    expected = reference_expectations(mu, logvar, draws_per_posterior=100, seed=1)
    for m in (12, 60):
        terms = aggregate_terms(
            mu, logvar, prior, n_samples=m, dimwise_samples=None, generator=torch.Generator().manual_seed(2), **kernel
        )
        assert terms.n_samples == m and len(set(terms.index.tolist())) == min(m, 20)
        for name in AGGREGATE:
            estimate, (value, stderr) = getattr(terms, name), expected[name]
            assert abs(estimate.value - value) <= 5 * math.hypot(estimate.stderr, stderr), (m, name)


def test_encoder_equal_to_the_prior_gives_zero_mi_and_marginal_kl():
    mu, logvar = torch.zeros(300, 4), torch.zeros(300, 4)
    terms = aggregate_terms(mu, logvar, GaussianPrior(4))
    assert terms.mutual_info.value == pytest.approx(0.0, abs=1e-6)
    assert terms.marginal_kl.value == pytest.approx(0.0, abs=1e-6)
    assert terms.total_correlation.value == pytest.approx(0.0, abs=1e-6)
    assert terms.dimwise_kl.value == pytest.approx(0.0, abs=1e-6)
    assert terms.prior_mismatch_remainder == terms.dimwise_kl  # the prior factorizes: one and the same


def test_two_far_apart_points_give_mi_log_2():
    mu = torch.tensor([[-100.0, 0.0], [100.0, 0.0]])
    terms = aggregate_terms(mu, torch.zeros(2, 2), GaussianPrior(2), n_samples=400)
    assert terms.mutual_info.value == pytest.approx(math.log(2), abs=1e-6)
    assert terms.mutual_info.stderr == pytest.approx(0.0, abs=1e-6)


def test_terms_by_size_far_apart_posteriors_give_mi_log_m_at_every_size():
    # N separate bumps: q(z) of any M of them has MI = log M exactly, and the marginal KL is
    # what is left of the average KL
    mu = torch.stack([100.0 * torch.arange(60.0), torch.zeros(60)], dim=1).double()
    sizes = [1, 2, 10, 60]
    rows = terms_by_size(mu, torch.zeros_like(mu), GaussianPrior(2).double(), sizes, dimwise_samples=None)
    for m, terms in zip(sizes, rows, strict=True):
        assert terms.n_samples == m and terms.log_n == pytest.approx(math.log(m))
        assert terms.mutual_info.value == pytest.approx(math.log(m), abs=1e-6)
        assert terms.marginal_kl.value == pytest.approx(terms.avg_kl_mc.value - math.log(m), abs=1e-6)


def test_terms_by_size_identical_posteriors_give_the_analytic_kl_at_every_size():
    # q(z) = N(0.5, e^-1) per dimension whatever M: MI 0, marginal KL = KL(N(0.5, e^-1) || N(0, 1)) x 3
    mu, logvar = torch.full((1000, 3), 0.5, dtype=torch.float64), torch.full((1000, 3), -1.0, dtype=torch.float64)
    expected = 3 * 0.5 * (math.exp(-1.0) + 0.25 - 1.0 + 1.0)
    for terms in terms_by_size(mu, logvar, GaussianPrior(3).double(), [100, 1000]):
        assert terms.mutual_info.value == pytest.approx(0.0, abs=1e-6)
        assert abs(terms.marginal_kl.value - expected) <= 4 * terms.marginal_kl.stderr


def test_terms_by_size_whole_split_agrees_with_aggregate_terms():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(400, 2, generator=g).double(), (0.3 * torch.randn(400, 2, generator=g) - 2).double()
    prior = GaussianPrior(2).double()
    whole = terms_by_size(mu, logvar, prior, [100, 400], generator=torch.Generator().manual_seed(1))[-1]
    reference = aggregate_terms(mu, logvar, prior, generator=torch.Generator().manual_seed(2))
    for name in ("mutual_info", "marginal_kl", "total_correlation"):
        a, b = getattr(whole, name), getattr(reference, name)
        assert abs(a.value - b.value) <= 5 * math.hypot(a.stderr, b.stderr), name


@pytest.mark.parametrize("sizes", [[], [0, 5], [5, 5], [10, 5], [5, 401]])
def test_terms_by_size_refuses_sizes_out_of_order_or_range(sizes):
    with pytest.raises(ValueError, match="strictly increasing"):
        terms_by_size(torch.zeros(400, 2), torch.zeros(400, 2), GaussianPrior(2), sizes)


def test_total_correlation_zero_when_q_factorizes():
    # posteriors on a product grid with equal variances: q(z) = q(z_1) q(z_2) exactly
    a = torch.linspace(-2, 2, 7)
    b = torch.linspace(-1, 3, 5)
    mu = torch.cartesian_prod(a, b).double()
    terms = aggregate_terms(mu, torch.full_like(mu, -3.0), GaussianPrior(2).double(), n_samples=500)
    assert terms.total_correlation.value == pytest.approx(0.0, abs=1e-9)
    assert terms.total_correlation.stderr == pytest.approx(0.0, abs=1e-9)
    assert terms.mutual_info.value > 1.0
    # and the dimension-wise KL then carries the whole marginal KL
    assert terms.dimwise_kl.value == pytest.approx(terms.marginal_kl.value, abs=1e-9)


def test_all_samples_by_default_and_tc_plus_remainder_is_the_marginal_kl():
    # At all M samples (the default) TC + remainder = marginal KL sample by sample, so on average too.
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(800, 5, generator=g)
    logvar = torch.cat([-5 + torch.rand(800, 3, generator=g), 0.01 * torch.randn(800, 2, generator=g)], dim=1)
    terms = aggregate_terms(mu, logvar, GaussianPrior(5))
    assert terms.dimwise_samples == terms.n_samples == 800
    total = terms.total_correlation.value + terms.prior_mismatch_remainder.value
    assert total == pytest.approx(terms.marginal_kl.value, abs=1e-9)
    assert terms.total_correlation.value > 0.1  # a case with dependence between dimensions


def test_importance_batches_are_wider_on_a_gpu():
    # The CPU's calls as configured; a GPU's at least CUDA_IS_BATCH_ELEMENTS outputs (launch-bound otherwise).
    assert importance_batch_shape(5000, 784, 2_000_000, "cpu") == (2551, 1)
    s, b = importance_batch_shape(5000, 784, 2_000_000, "cuda")
    assert s == 5000 and b * s * 784 <= CUDA_IS_BATCH_ELEMENTS < (b + 1) * s * 784
    assert importance_batch_shape(50, 784, 2_000_000, "cpu") == (50, 51)


def test_float32_agrees_with_float64_to_1e4_nats():
    g = torch.Generator().manual_seed(0)
    mu = 2 * torch.randn(1000, 12, generator=g)
    logvar = -7 + torch.randn(1000, 12, generator=g)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    # the same sample points for both dtypes
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
    idx = torch.arange(1000)
    t32 = aggregate_terms(mu, logvar, GaussianPrior(12), z, idx, generator=gen(), dimwise_samples=100)
    t64 = aggregate_terms(
        mu.double(), logvar.double(), GaussianPrior(12).double(), z.double(), idx, generator=gen(), dimwise_samples=100
    )
    for name in ("mutual_info", "marginal_kl", "total_correlation", "dimwise_kl"):
        assert abs(getattr(t32, name).value - getattr(t64, name).value) < 1e-4, name


def test_chunk_size_does_not_change_results():
    model = tiny_vae(latent_dim=3).float()
    x = torch.bernoulli(torch.full((300, 6), 0.3), generator=torch.Generator().manual_seed(0))
    data = FixedData(train=x, test=x[:20])
    a = decompose(model, data, is_samples=50, chunk_size=2048, block_size=2048)
    # (the importance samples' stream depends on is_batch_elements, so that stays)
    b = decompose(model, data, is_samples=50, chunk_size=7, block_size=33, batch_size=64)
    for name in ("elbo", "mutual_info", "marginal_kl", "total_correlation", "dimwise_kl", "log_likelihood"):
        assert getattr(a, name).value == pytest.approx(getattr(b, name).value, abs=1e-6), name


class LinearGaussian(nn.Module):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I): log p(x) = log N(x; b, W W^T + s^2 I) exactly.

    The encoder is the exact posterior times a distortion (`shift`, `inflate`), so
    importance sampling has nonzero variance unless both are neutral.
    """

    def __init__(self, shift=0.0, inflate=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 2, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
        self.s2 = 0.5
        self.shift, self.inflate = shift, inflate
        self.prior = GaussianPrior(2).double()

    def encode(self, x):
        precision = torch.eye(2, dtype=x.dtype) + self.w.T @ self.w / self.s2
        cov = torch.linalg.inv(precision)
        mean = (x - self.b) @ self.w @ cov.T / self.s2
        # A diagonal proposal: the exact posterior is diagonal only if W^T W is; use its diagonal
        # marginals, so the encoder is close to, not equal to, the posterior.
        var = torch.diagonal(cov).expand_as(mean) * self.inflate
        return mean + self.shift, torch.log(var)

    def decode(self, z):
        return z @ self.w.T + self.b

    def log_likelihood(self, x, mean):
        return (-0.5 * (math.log(2 * math.pi * self.s2) + (x - mean) ** 2 / self.s2)).sum(-1)

    def exact_log_evidence(self, x):
        cov = self.w @ self.w.T + self.s2 * torch.eye(4, dtype=x.dtype)
        return torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)


def test_importance_sampling_recovers_the_exact_evidence():
    model = LinearGaussian(shift=0.02, inflate=1.1)
    model.w.data = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)  # W^T W diagonal
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = model.exact_log_evidence(x)
    with torch.no_grad():
        one = importance_log_likelihood(model, x, 1)
        est = importance_log_likelihood(
            model, x, 5000, batch_elements=4 * 700, generator=torch.Generator().manual_seed(0)
        )
    assert (est - exact).abs().max() < 1e-2  # converges: Monte Carlo error a few 1e-3 at K = 5000
    assert (est - exact).mean().abs() < 5e-3
    assert (one - exact).abs().max() > 2e-2  # and the test could fail: one sample is visibly off


def test_importance_sampling_is_exact_when_the_proposal_is_the_posterior():
    model = LinearGaussian()
    model.w.data = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # W^T W diagonal
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        est = importance_log_likelihood(model, x, 7)
    torch.testing.assert_close(est, model.exact_log_evidence(x), rtol=0, atol=1e-9)


class RecordedProgress:
    """A progress factory that keeps what it was told."""

    def __init__(self):
        self.opened, self.updates, self.closed = [], [], 0

    def __call__(self, **kwargs):
        self.opened.append(kwargs)
        return self

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed += 1


def test_importance_sampling_reports_every_point_and_draws_the_same():
    model = LinearGaussian(shift=0.02, inflate=1.1)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    progress = RecordedProgress()
    # 3 samples per decoder call and 2 points per batch: 4 batches, the last of one point
    kwargs = {"batch_elements": 4 * 6, "generator": None}
    silent = importance_log_likelihood(model, x, 3, **kwargs)
    reported = importance_log_likelihood(model, x, 3, progress=progress, **kwargs)
    assert progress.opened == [{"total": 7, "desc": "log p(x), K = 3", "unit": "points"}]
    assert progress.updates == [2, 2, 2, 1] and progress.closed == 1
    torch.testing.assert_close(reported, silent, rtol=0, atol=0)


class StoppingCheckpoint:
    """Keeps the last state in memory, saves after every batch, and stops the pass (as a killed
    process would) after `stop_after` saves; `None`: never stops."""

    def __init__(self, stop_after=None):
        self.state, self.saves, self.stop_after = None, 0, stop_after

    def load(self, key):
        return self.state if self.state is not None and self.state.key == key else None

    def due(self):
        return True

    def save(self, state):
        self.state, self.saves = state, self.saves + 1
        if self.saves == self.stop_after:
            raise KeyboardInterrupt


def test_a_stopped_importance_pass_continues_to_the_values_of_an_unstopped_one():
    model = LinearGaussian(shift=0.02, inflate=1.1)
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kwargs = {"batch_elements": 4 * 6}  # 3 samples per call, 2 points per batch: batches of 2, 2, 2, 1
    unstopped = importance_log_likelihood(model, x, 3, **kwargs)
    checkpoint = StoppingCheckpoint(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        importance_log_likelihood(model, x, 3, checkpoint=checkpoint, **kwargs)
    assert checkpoint.state.done == 4
    torch.testing.assert_close(checkpoint.state.values, unstopped[:4], rtol=0, atol=0)
    checkpoint.stop_after = None
    progress = RecordedProgress()
    continued = importance_log_likelihood(model, x, 3, checkpoint=checkpoint, progress=progress, **kwargs)
    torch.testing.assert_close(continued, unstopped, rtol=0, atol=0)
    assert progress.opened == [{"total": 7, "desc": "log p(x), K = 3", "unit": "points", "initial": 4}]
    assert progress.updates == [2, 1]  # only the points left were computed
    assert checkpoint.saves == 3  # not after the last batch: the caller writes the values then


def test_the_key_of_an_importance_pass_changes_with_everything_its_values_depend_on():
    model = LinearGaussian()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def key(model=model, x=x, k=5, shape=(3, 2), seed=0):
        return importance_key(model, x, k, shape, torch.Generator().manual_seed(seed))

    assert key() == key() == key(model=LinearGaussian())
    other_weights = LinearGaussian()
    with torch.no_grad():
        other_weights.b[0] += 1e-12
    changed = [key(model=other_weights), key(x=x[:4]), key(x=x.flip(0)), key(k=6), key(shape=(2, 3)), key(seed=1)]
    assert len({key(), *changed}) == 1 + len(changed)


def test_a_state_that_cannot_continue_the_pass_is_refused():
    model = LinearGaussian()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    checkpoint = StoppingCheckpoint()
    importance_log_likelihood(model, x, 3, checkpoint=checkpoint, batch_elements=4 * 6)
    state = checkpoint.state  # 4 points done, in batches of 2
    checkpoint.state = ImportanceState(state.key, state.values[:3], state.generator_state)
    with pytest.raises(ValueError, match="a saved state of 3 points does not continue this pass"):
        importance_log_likelihood(model, x, 3, checkpoint=checkpoint, batch_elements=4 * 6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2000, 10, generator=g), torch.randn(2000, 10, generator=g) - 5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
    idx = torch.arange(2000)
    cpu = aggregate_terms(mu, logvar, GaussianPrior(10), z, idx, dimwise_samples=None)
    gpu = aggregate_terms(
        mu.cuda(), logvar.cuda(), GaussianPrior(10).cuda(), z.cuda(), idx.cuda(), dimwise_samples=None
    )
    for name in ("mutual_info", "marginal_kl", "total_correlation", "dimwise_kl"):
        assert abs(getattr(cpu, name).value - getattr(gpu, name).value) < 1e-4


class MonteCarloGaussian(GaussianPrior):
    """N(0, I) that pretends to have no analytic KL and no factorization, like a mixture or flow prior."""

    has_analytic_kl = False
    is_factorized = False


def test_prior_without_analytic_kl_uses_monte_carlo_and_reports_the_remainder():
    torch.manual_seed(0)
    model = VAE.mlp(6, 2, [5], MonteCarloGaussian(2)).double()
    with torch.no_grad():
        model.encoder.net[-1].bias[2:] -= 4.0
        model.encoder.net[-1].weight.mul_(8.0)
    x = torch.bernoulli(torch.full((12, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    report = decompose(model, FixedData(train=x), dimwise_samples=None, is_samples=None, seed=2)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        g = torch.Generator().manual_seed(2)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g, dtype=mu.dtype)
    ref = brute_force(mu, logvar, z)
    assert not report.avg_kl_analytic and not report.prior_factorized and report.dimwise_kl_per_dim is None
    assert report.mutual_info.value == pytest.approx(ref["mutual_info"][0], abs=1e-6)
    assert report.marginal_kl.value == pytest.approx(ref["marginal_kl"][0], abs=1e-6)
    # the Monte Carlo average KL is MI + marginal KL sample by sample: the identity is exact
    assert report.avg_kl.value == pytest.approx(report.mutual_info.value + report.marginal_kl.value, abs=1e-9)
    assert report.identity_gap.value == pytest.approx(0.0, abs=1e-9)
    assert report.avg_kl.stderr > 0
    # the remainder E[log prod q(z_d) - log p(z)], under its own name; no dimension-wise KL for a prior
    # that does not declare itself factorized (this one happens to factorize, so the values agree)
    assert report.dimwise_kl is None
    remainder = report.prior_mismatch_remainder
    assert (remainder.value, remainder.stderr) == pytest.approx(ref["prior_mismatch_remainder"], abs=1e-6)
    assert report.total_correlation.value == pytest.approx(ref["total_correlation"][0], abs=1e-6)
    saved = report.to_dict()
    assert saved["dimwise_kl"] is None and saved["dimwise_kl_stderr"] is None
    assert saved["prior_mismatch_remainder"] == report.prior_mismatch_remainder.value
    table = format_table(report)
    assert "remainder E[log prod q(z_d) - log p(z)]" in table and "dimension-wise KL" not in table
    assert [r[0] for r in table_rows(report)][6] == "prior_mismatch_remainder"


#: surgery.json's keys, in order: the file format that results/**/surgery.json and surgery.report rely on.
SURGERY_JSON_KEYS = [
    "split",
    "n_points",
    "n_samples",
    "elbo",
    "elbo_stderr",
    "reconstruction",
    "reconstruction_stderr",
    "avg_kl",
    "avg_kl_stderr",
    "avg_kl_analytic",
    "mutual_info",
    "mutual_info_stderr",
    "marginal_kl",
    "marginal_kl_stderr",
    "log_n",
    "identity_gap",
    "identity_gap_stderr",
    "total_correlation",
    "total_correlation_stderr",
    "dimwise_kl",
    "dimwise_kl_stderr",
    "prior_mismatch_remainder",
    "prior_mismatch_remainder_stderr",
    "dimwise_samples",
    "prior_factorized",
    "dimwise_kl_per_dim",
    "optimal_prior_elbo",
    "optimal_prior_elbo_stderr",
    "log_likelihood",
    "log_likelihood_stderr",
    "log_likelihood_split",
    "is_samples",
    "is_points",
    "latent_dim",
    "prior",
    "seconds",
]


@pytest.mark.parametrize("prior", [GaussianPrior, MonteCarloGaussian])
def test_surgery_json_round_trip_and_old_files(prior):
    torch.manual_seed(0)
    model = VAE.mlp(6, 2, [5], prior(2)).double()
    x = torch.bernoulli(torch.full((12, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    report = decompose(model, FixedData(train=x, test=x[:4]), is_samples=3, seed=1)
    saved = json.loads(json.dumps(report.to_dict()))
    assert list(saved) == SURGERY_JSON_KEYS
    assert saved["elbo"] == report.elbo.value and saved["elbo_stderr"] == report.elbo.stderr
    assert saved["log_likelihood"] == report.log_likelihood.value and saved["is_points"] == 4
    assert SurgeryReport.from_dict(saved) == report

    # A file written before the remainder had its own key stored it as `dimwise_kl` for every prior.
    old = {k: v for k, v in saved.items() if not k.startswith("prior_mismatch_remainder")}
    old["dimwise_kl"] = saved["prior_mismatch_remainder"]
    old["dimwise_kl_stderr"] = saved["prior_mismatch_remainder_stderr"]
    assert upgrade_dict(old) == saved and "prior_mismatch_remainder" not in old  # the input is left alone
    assert SurgeryReport.from_dict(old) == report
    without_flag = {k: v for k, v in old.items() if k != "prior_factorized"}  # the per-dimension KLs decide
    assert upgrade_dict(without_flag)["dimwise_kl"] == saved["dimwise_kl"]


_FAKE_JSON = {
    **{k: 1.0 for k in SURGERY_JSON_KEYS},
    "split": "train",
    "n_points": 10,
    "n_samples": 10,
    "avg_kl_analytic": False,
    "dimwise_samples": 10,
    "prior_factorized": False,
    "dimwise_kl": None,
    "dimwise_kl_stderr": None,
    "dimwise_kl_per_dim": None,
    "log_likelihood_split": "test",
    "is_samples": 5,
    "is_points": 3,
    "latent_dim": 2,
    "prior": "MixturePrior",
    "seconds": {},
}
