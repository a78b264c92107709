"""The mixture kernel `priors.densities.gaussian_mixture_logsumexp` against float64 double loops."""

from __future__ import annotations

import math

import pytest
import torch

import priors.densities as densities
from priors.densities import DiagonalGaussianMixture, diagonal_normal_log_prob, gaussian_mixture_logsumexp


def reference_logsumexp(z, mu, logvar, exclude=None):
    """Plain double loop over points and components, float64, the textbook formula."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    out = []
    for m in range(z.shape[0]):
        terms = []
        for n in range(mu.shape[0]):
            if exclude is not None and int(exclude[m]) == n:
                continue
            log_density = 0.0
            for d in range(z.shape[1]):
                var = math.exp(float(logvar[n, d]))
                log_density += -0.5 * math.log(2 * math.pi * var) - 0.5 * (float(z[m, d]) - float(mu[n, d])) ** 2 / var
            terms.append(log_density)
        if not terms:
            out.append(-math.inf)
            continue
        top = max(terms)
        out.append(top + math.log(sum(math.exp(t - top) for t in terms)))
    return torch.tensor(out, dtype=torch.float64)


def vectorized_reference(z, mu, logvar, exclude=None):
    """The same in float64 with broadcasting (for sizes the double loop cannot afford)."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    lp = -0.5 * (math.log(2 * math.pi) + logvar + (z[:, None] - mu) ** 2 * torch.exp(-logvar)).sum(-1)
    if exclude is not None:
        lp = lp.masked_fill(torch.arange(mu.shape[0]) == exclude[:, None], -math.inf)
    return torch.logsumexp(lp, -1)


def posteriors(n, d, logvar_mean, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    mu = spread * torch.randn(n, d, generator=g)
    logvar = logvar_mean + torch.randn(n, d, generator=g)
    return mu, logvar


def shared_posteriors(n, d, logvar_mean, seed=0):
    """Components with one set of log variances for all (the exemplar prior's shared sigma^2)."""
    mu, logvar = posteriors(n, d, logvar_mean, seed)
    return mu, logvar[:1].expand(n, d)


def samples(mu, logvar, m, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(mu.shape[0], (m,), generator=g)
    z = mu[idx] + torch.exp(0.5 * logvar[idx]) * torch.randn(m, mu.shape[1], generator=g)
    return z, idx


@pytest.mark.parametrize("logvar_mean", [-8.0, -2.0, 0.0])
def test_matches_double_loop(logvar_mean):
    mu, logvar = posteriors(9, 3, logvar_mean)
    z, idx = samples(mu, logvar, 6)
    exclude = torch.where(torch.arange(6) % 2 == 0, idx, torch.full_like(idx, -1))
    for ex in (None, exclude):
        expected = reference_logsumexp(z, mu, logvar, ex)
        got = gaussian_mixture_logsumexp(
            z.double(), mu.double(), logvar.double(), ex, chunk_size=4, block_size=4, group=2
        )
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        got32 = gaussian_mixture_logsumexp(
            z, mu, logvar, ex, chunk_size=4, block_size=4, group=2, out_dtype=torch.float64
        )
        torch.testing.assert_close(got32, reference_logsumexp(z, mu.float(), logvar.float(), ex), rtol=0, atol=1e-9)


@pytest.mark.parametrize("d,logvar_mean", [(40, -9.0), (10, -6.0), (2, -3.0), (1, -6.0), (1, 0.0)])
def test_float32_within_1e4_nats_where_bare_matmul_is_not(d, logvar_mean):
    mu, logvar = posteriors(2000, d, logvar_mean)
    z, idx = samples(mu, logvar, 200)
    expected = vectorized_reference(z, mu, logvar)
    got = gaussian_mixture_logsumexp(z, mu, logvar, out_dtype=torch.float64)
    assert (got - expected).abs().max() < 1e-4
    if d == 40:
        # The test can fail: the bare float32 [z^2, z, 1] product misses by far more.
        prec = torch.exp(-logvar)
        c = -0.5 * (d * math.log(2 * math.pi) + logvar.sum(-1) + (prec * mu**2).sum(-1))
        bare = torch.logsumexp(torch.cat([z**2, z], -1) @ torch.cat([-0.5 * prec, prec * mu], -1).T + c, -1)
        assert (bare.double() - expected).abs().max() > 1e-3


def test_one_dimension_with_exclusion_matches_double_loop():
    mu, logvar = posteriors(11, 1, -2.0)
    z, idx = samples(mu, logvar, 7)
    expected = reference_logsumexp(z, mu, logvar, idx)
    got = gaussian_mixture_logsumexp(z.double(), mu.double(), logvar.double(), idx)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_exclude_and_edge_cases():
    mu, logvar = posteriors(5, 2, -1.0)
    z, idx = samples(mu, logvar, 5)
    # exclude = -1 everywhere is the same as no exclusion
    none = torch.full((5,), -1, dtype=torch.int64)
    torch.testing.assert_close(
        gaussian_mixture_logsumexp(z, mu, logvar, none), gaussian_mixture_logsumexp(z, mu, logvar)
    )
    # one component, excluded: -inf
    out = gaussian_mixture_logsumexp(z[:2], mu[:1], logvar[:1], torch.tensor([0, -1]))
    assert out[0] == -math.inf and torch.isfinite(out[1])
    assert gaussian_mixture_logsumexp(z[:0], mu, logvar).shape == (0,)
    with pytest.raises(ValueError, match="exclude must have shape"):
        gaussian_mixture_logsumexp(z, mu, logvar, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="expects z"):
        gaussian_mixture_logsumexp(z[:, :1], mu, logvar)


def test_chunking_does_not_change_results():
    mu, logvar = posteriors(400, 6, -4.0)
    z, idx = samples(mu, logvar, 120)
    exclude = idx
    base = gaussian_mixture_logsumexp(z, mu, logvar, exclude, out_dtype=torch.float64)
    for chunk, block, group in [(1, 32, 32), (7, 64, 8), (120, 1000, 16), (64, 96, 1)]:
        got = gaussian_mixture_logsumexp(
            z, mu, logvar, exclude, chunk, block_size=block, group=group, out_dtype=torch.float64
        )
        torch.testing.assert_close(got, base, rtol=0, atol=1e-10)


def test_dense_fallback_for_broad_posteriors():
    # An encoder that ignores x: every component the same, every entry matters.
    mu = torch.zeros(500, 4) + 0.01 * torch.randn(500, 4)
    logvar = torch.zeros(500, 4)
    z = torch.randn(200, 4)
    expected = vectorized_reference(z, mu, logvar, torch.arange(200))
    got = gaussian_mixture_logsumexp(z, mu, logvar, torch.arange(200), out_dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("logvar_mean", [-3.0, 1.0], ids=["located", "dense"])
def test_memory_is_bounded_by_the_block(monkeypatch, logvar_mean):
    seen = {}

    def spy(name):
        real = getattr(torch, name)

        def product(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.setdefault(name, []).append(out.numel())
            return out

        return product

    monkeypatch.setattr(densities.torch, "addmm", spy("addmm"))  # the locating product
    monkeypatch.setattr(densities.torch, "mm", spy("mm"))  # the dense float64 blocks
    monkeypatch.setattr(densities, "DENSE_BLOCK_ELEMENTS", 128 * 64)
    mu, logvar = posteriors(800, 5, logvar_mean)  # 4 row chunks of 128 against 4 blocks of 256 components
    z, _ = samples(mu, logvar, 500)
    gaussian_mixture_logsumexp(z, mu, logvar, chunk_size=128, block_size=256)
    assert seen["addmm"] and max(seen["addmm"]) <= 128 * 256
    if logvar_mean > 0:  # broad posteriors: dense blocks, even where a wider located block turned dense
        assert seen["mm"] and max(seen["mm"]) <= 128 * 64


def test_cached_constants_follow_in_place_updates():
    mu, logvar = posteriors(50, 3, -1.0)
    z, _ = samples(mu, logvar, 10)
    first = gaussian_mixture_logsumexp(z, mu, logvar, out_dtype=torch.float64)
    torch.testing.assert_close(gaussian_mixture_logsumexp(z, mu, logvar, out_dtype=torch.float64), first)
    mu.add_(0.5)  # an in-place refresh, as the aggregate prior does every epoch
    logvar.copy_(logvar - 1)
    expected = vectorized_reference(z, mu, logvar)
    torch.testing.assert_close(
        gaussian_mixture_logsumexp(z, mu, logvar, out_dtype=torch.float64), expected, rtol=0, atol=1e-9
    )
    with torch.inference_mode():  # inference tensors have no version counter: never cached, still right
        mu_i, logvar_i = mu.clone(), logvar.clone()
        first = gaussian_mixture_logsumexp(z, mu_i, logvar_i, out_dtype=torch.float64)
        mu_i.add_(1.0)
        again = gaussian_mixture_logsumexp(z, mu_i, logvar_i, out_dtype=torch.float64)
    torch.testing.assert_close(again, vectorized_reference(z, mu + 1.0, logvar), rtol=0, atol=1e-9)
    assert (again - first).abs().max() > 1e-3


@pytest.mark.parametrize("shared", [False, True], ids=["own variances", "shared variances"])
@pytest.mark.parametrize("saved_bytes", [densities.SAVED_ENTRIES_BYTES, 0], ids=["kept", "recomputed"])
def test_gradcheck_float64(monkeypatch, saved_bytes, shared):
    # The backward pass from the entries the forward pass kept (and the dense blocks' sums),
    # and (over budget) recomputed.
    monkeypatch.setattr(densities, "SAVED_ENTRIES_BYTES", saved_bytes)
    mu, logvar = (shared_posteriors if shared else posteriors)(12, 3, -1.0)
    z, idx = samples(mu, logvar, 5)
    z = z.double().requires_grad_()
    exclude = torch.tensor([int(idx[0]), -1, int(idx[2]), -1, -1])
    for dense in (0.25, 0.0):  # sparse refinement and the dense float64 block
        torch.autograd.gradcheck(
            lambda z_, dense=dense: gaussian_mixture_logsumexp(
                z_, mu.double(), logvar.double(), exclude, 2, block_size=8, group=4, dense_fraction=dense
            ),
            (z,),
        )


@pytest.mark.slow
@pytest.mark.parametrize("saved_bytes", [densities.SAVED_ENTRIES_BYTES, 0], ids=["kept", "recomputed"])
def test_gradient_float32_matches_autograd_reference(monkeypatch, saved_bytes):
    monkeypatch.setattr(densities, "SAVED_ENTRIES_BYTES", saved_bytes)
    mu, logvar = posteriors(2000, 40, -6.0)
    z, idx = samples(mu, logvar, 100)
    z32 = z.clone().requires_grad_()
    gaussian_mixture_logsumexp(z32, mu, logvar, idx).sum().backward()
    z64 = z.double().requires_grad_()
    vectorized_reference(z64, mu, logvar, idx).sum().backward()
    torch.testing.assert_close(z32.grad.double(), z64.grad, rtol=1e-4, atol=1e-3)


def test_differentiable_in_the_components_when_they_require_grad():
    mu, logvar = posteriors(30, 3, -1.0)
    z, _ = samples(mu, logvar, 10)
    mu64 = mu.double().requires_grad_()
    got = gaussian_mixture_logsumexp(z.double(), mu64, logvar.double())
    got.sum().backward()
    mu_ref = mu.double().requires_grad_()
    vectorized_reference(z, mu_ref, logvar).sum().backward()
    torch.testing.assert_close(mu64.grad, mu_ref.grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_float64_and_leaves_tf32_setting_alone():
    mu, logvar = posteriors(5000, 40, -8.0)
    z, idx = samples(mu, logvar, 1000)
    expected = vectorized_reference(z, mu, logvar, idx)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        got = gaussian_mixture_logsumexp(z.cuda(), mu.cuda(), logvar.cuda(), idx.cuda(), out_dtype=torch.float64)
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert (got.cpu() - expected).abs().max() < 1e-4


@pytest.mark.parametrize("materialized", [False, True], ids=["expanded", "materialized"])
@pytest.mark.parametrize("logvar_mean", [-6.0, 0.0])
def test_shared_variances_match_double_loop(materialized, logvar_mean):
    # Shared variances take the D-column product and a row term instead of the 2D-column one.
    mu, logvar = shared_posteriors(9, 3, logvar_mean)
    if materialized:
        logvar = logvar.clone()
    z, idx = samples(mu, logvar, 6)
    exclude = torch.where(torch.arange(6) % 2 == 0, idx, torch.full_like(idx, -1))
    expected = reference_logsumexp(z, mu, logvar, exclude)
    for dense in (0.0, 0.25, 1.0):  # always dense, the default, never dense
        got = gaussian_mixture_logsumexp(
            z.double(), mu.double(), logvar.double(), exclude, chunk_size=4, block_size=4, group=2, dense_fraction=dense
        )
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        got32 = gaussian_mixture_logsumexp(
            z, mu, logvar, exclude, 4, block_size=4, group=2, dense_fraction=dense, out_dtype=torch.float64
        )
        torch.testing.assert_close(got32, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shared", [False, True], ids=["own variances", "shared variances"])
def test_dense_blocks_after_a_narrow_first_block_match_the_reference(monkeypatch, shared):
    # Broad posteriors: the narrow first block is dense, the rest of each row chunk is computed
    # densely in small blocks (several of them here), with exclusions falling in every block.
    monkeypatch.setattr(densities, "DENSE_BLOCK_ELEMENTS", 16 * 40)
    mu, logvar = (shared_posteriors if shared else posteriors)(1000, 4, 0.0)
    z, idx = samples(mu, logvar, 40)
    for kwargs in (dict(chunk_size=16, block_size=300, group=2), dict(chunk_size=40, block_size=2048, group=1)):
        got = gaussian_mixture_logsumexp(z, mu, logvar, idx, out_dtype=torch.float64, **kwargs)
        torch.testing.assert_close(got, vectorized_reference(z, mu, logvar, idx), rtol=0, atol=1e-9)


@pytest.mark.parametrize("shared", [False, True], ids=["own variances", "shared variances"])
def test_dense_gradient_matches_autograd_reference(monkeypatch, shared):
    # The dense blocks' gradient is summed during the forward pass, in z's dtype.
    monkeypatch.setattr(densities, "DENSE_BLOCK_ELEMENTS", 16 * 40)
    mu, logvar = (shared_posteriors if shared else posteriors)(1000, 6, 0.0)
    z, idx = samples(mu, logvar, 40)
    z64 = z.double().requires_grad_()
    vectorized_reference(z64, mu, logvar, idx).sum().backward()
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        zz = z.detach().to(dtype, copy=True).requires_grad_()
        gaussian_mixture_logsumexp(
            zz, mu.to(dtype), logvar.to(dtype), idx, 16, block_size=300, group=2
        ).sum().backward()
        torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=tol, atol=tol)


def test_gradient_where_a_row_chunk_turns_dense_after_sparse_blocks(monkeypatch):
    # The first block's components are sharp (located, kept sparsely), the rest broad (dense,
    # summed during the forward pass): the backward pass adds both kinds up.
    monkeypatch.setattr(densities, "DENSE_BLOCK_ELEMENTS", 16 * 64)
    sharp_mu, sharp_logvar = posteriors(256, 4, -3.0, seed=2)
    broad_mu, broad_logvar = posteriors(744, 4, 0.0, seed=3)
    mu, logvar = torch.cat([sharp_mu, broad_mu]), torch.cat([sharp_logvar, broad_logvar])
    z, idx = samples(mu[:256], logvar[:256], 32)  # near a sharp component, a few nats above the broad ones
    seen = []
    real = densities._DenseSums.add
    monkeypatch.setattr(densities._DenseSums, "add", lambda self, *a: seen.append(1) or real(self, *a))
    z64 = z.double().requires_grad_()
    vectorized_reference(z64, mu, logvar, idx).sum().backward()
    zz = z.clone().requires_grad_()
    got = gaussian_mixture_logsumexp(zz, mu, logvar, idx, 16, block_size=256, group=2, out_dtype=torch.float64)
    got.sum().backward()
    assert seen  # dense blocks were summed
    torch.testing.assert_close(got, vectorized_reference(z, mu, logvar, idx), rtol=0, atol=1e-9)
    torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("logvar_mean", [-6.0, 0.0])
def test_gpu_block_profile_gives_the_same_results_on_the_cpu(monkeypatch, logvar_mean):
    # A GPU walks the matrix in wide blocks, with no narrow first block and large dense blocks,
    # and recomputes a block's located entries in pieces; forced here on the CPU (scaled down),
    # sparse (sharp) and dense (broad), with exclusions and the gradient.
    use_gpu_like_blocks(monkeypatch)
    monkeypatch.setattr(densities, "RECOMPUTE_ELEMENTS", 16)  # pieces of 3 entries of D = 5
    mu, logvar = posteriors(700, 5, logvar_mean)
    z, idx = samples(mu, logvar, 50)
    exclude = torch.where(torch.arange(50) % 3 == 0, torch.full_like(idx, -1), idx)
    assert_small_blocks_match_reference(z, mu, logvar, exclude)


def use_gpu_like_blocks(monkeypatch):
    """A GPU's block profile, scaled down for the CPU: wide blocks, no narrow first one."""
    gpu_like = densities._BlockProfile(min_block_elements=3000, first_block_groups=None, dense_block_elements=900)
    monkeypatch.setattr(densities, "_block_profile", lambda device: gpu_like)


def assert_small_blocks_match_reference(z, mu, logvar, exclude):
    """The kernel in small blocks (chunks of 16, blocks of 64, groups of 4) against the
    float64 reference: values to 1e-10 and the gradient to 1e-9."""
    z64 = z.double().requires_grad_()
    expected = vectorized_reference(z64, mu, logvar, exclude)
    expected.sum().backward()
    zz = z.double().requires_grad_()
    got = gaussian_mixture_logsumexp(zz, mu.double(), logvar.double(), exclude, 16, block_size=64, group=4)
    got.sum().backward()
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(zz.grad, z64.grad, rtol=1e-9, atol=1e-9)


# ---- the one-dimensional marginals: gaussian_mixture_marginals_logsumexp ----------------------


def reference_marginals(z, mu, logvar):
    """Each dimension's mixture by a plain double loop over points and components, in Python floats."""
    z, mu, logvar = z.double().tolist(), mu.double().tolist(), logvar.double().tolist()
    out = []
    for zm in z:
        row = []
        for d, zmd in enumerate(zm):
            terms = [
                -0.5 * math.log(2 * math.pi * math.exp(lv[d])) - 0.5 * (zmd - mn[d]) ** 2 / math.exp(lv[d])
                for mn, lv in zip(mu, logvar, strict=True)
            ]
            top = max(terms)
            row.append(top + math.log(sum(math.exp(t - top) for t in terms)))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def vectorized_marginals(z, mu, logvar):
    """The same with broadcasting, float64, one dimension at a time."""
    z, mu, logvar = z.double(), mu.double(), logvar.double()
    cols = []
    for d in range(z.shape[1]):
        lv = logvar[:, d]
        cols.append(
            torch.logsumexp(-0.5 * (math.log(2 * math.pi) + lv + (z[:, d, None] - mu[:, d]) ** 2 / lv.exp()), -1)
        )
    return torch.stack(cols, -1)


def marginal_posteriors(n, m, seed=0):
    """Four kinds of dimension: sharp and spread (log-variances -7..-3, several classes), collapsed
    (all near N(0, 1): every component counts everywhere), in between, and a mixture of sharp and
    collapsed components in one dimension; points drawn from the mixture."""
    g = torch.Generator().manual_seed(seed)
    mu, logvar = torch.empty(n, 4), torch.empty(n, 4)
    mu[:, 0], logvar[:, 0] = torch.randn(n, generator=g), -7 + 4 * torch.rand(n, generator=g)
    mu[:, 1], logvar[:, 1] = 0.01 * torch.randn(n, generator=g), 0.01 * torch.randn(n, generator=g)
    mu[:, 2], logvar[:, 2] = 0.8 * torch.randn(n, generator=g), -1 + 0.5 * torch.randn(n, generator=g)
    half = n // 2
    mu[:, 3], logvar[:, 3] = (
        2 * torch.randn(n, generator=g),
        torch.cat([torch.full((half,), -6.0), torch.zeros(n - half)]),
    )
    idx = torch.randint(n, (m,), generator=g)
    z = mu[idx] + torch.exp(0.5 * logvar[idx]) * torch.randn(m, 4, generator=g)
    return z, mu, logvar


def test_marginals_match_double_loop():
    z, mu, logvar = marginal_posteriors(40, 12)
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(
        z.double(), mu.double(), logvar.double(), method="expand", stats=stats
    )
    assert got.dtype == torch.float64 and got.shape == (12, 4)
    torch.testing.assert_close(got, reference_marginals(z, mu, logvar), rtol=0, atol=1e-11)
    assert stats["direct"] == 0 and stats["pairs"] > 0  # the expansion did the work


@pytest.mark.slow  # 2,000 components x 1,000 points: the scale is the point
def test_marginals_at_scale_skip_most_entries_and_stay_exact():
    z, mu, logvar = marginal_posteriors(2000, 1000)
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, stats=stats)
    # float32 inputs are taken as the float64 numbers they are
    assert (got - vectorized_marginals(z, mu, logvar)).abs().max() < 1e-11
    assert stats["pairs"] < 2000 * 4 * 60  # ~30-40 nodes per component, not 1,000 points
    assert stats["direct"] < 0.001 * got.numel()


def test_marginals_error_stays_within_a_loose_tolerance():
    # Short expansions: the bound sends what it cannot vouch for to the direct sum, and what it keeps
    # is within the tolerance (an underestimating bound would let larger errors through).
    z, mu, logvar = marginal_posteriors(500, 400, seed=1)
    expected = vectorized_marginals(z, mu, logvar)
    errors = []
    for order in (8, 10, 12):
        stats = {}
        got = densities.gaussian_mixture_marginals_logsumexp(
            z, mu, logvar, order=order, tolerance=1e-4, method="expand", stats=stats
        )
        errors.append((got - expected).abs().max().item())
        assert errors[-1] <= 1e-4, order
        assert stats["direct"] < got.numel()
    assert max(errors) > 1e-9  # the truncation was visible, so the check above could fail


def test_marginals_outliers_and_zero_tolerance_take_the_direct_sum():
    z, mu, logvar = marginal_posteriors(300, 50, seed=2)
    z[:3, 0] = torch.tensor([30.0, -45.0, 12.0])  # far beyond every sharp component: tiny sums
    expected = vectorized_marginals(z, mu, logvar)
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, method="expand", stats=stats)
    # (the outliers' values are ~ -1e4 nats: float64 formulas differ by ~1e-16 of that)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-11)
    assert stats["direct"] >= 3
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, tolerance=0.0, method="expand", stats=stats)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-12)
    assert stats["direct"] == got.numel() and stats["pairs"] > 0


def test_marginals_passes_and_too_fine_grids_do_not_change_results(monkeypatch):
    z, mu, logvar = marginal_posteriors(200, 40, seed=3)
    expected = vectorized_marginals(z, mu, logvar)
    monkeypatch.setattr(densities, "_marginal_budgets", lambda device: (2000, 100))  # several passes of each kind
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, method="expand", stats=stats)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-11)
    assert stats["direct"] == 0
    monkeypatch.setattr(densities, "_NODE_LIMIT", 1)  # every grid too fine: each dimension direct
    stats = {}
    got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, stats=stats)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert stats["direct_dims"] == 4


def test_marginals_few_points_are_summed_directly():
    # 6 points against 300 components: the direct sum is cheaper than ~35 nodes per component.
    z, mu, logvar = marginal_posteriors(300, 6, seed=4)
    expected = vectorized_marginals(z, mu, logvar)
    for method in ("auto", "direct"):
        stats = {}
        got = densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, method=method, stats=stats)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        assert stats["direct"] == got.numel() and stats["pairs"] == 0, method
    with pytest.raises(ValueError, match="method"):
        densities.gaussian_mixture_marginals_logsumexp(z, mu, logvar, method="fast")


def test_marginals_edge_cases():
    z, mu, logvar = marginal_posteriors(20, 5)
    f = densities.gaussian_mixture_marginals_logsumexp
    assert f(z[:0], mu, logvar).shape == (0, 4)
    assert torch.isneginf(f(z, mu[:0], logvar[:0])).all()
    one = f(z, mu[:1], logvar[:1])  # one component: its log density
    torch.testing.assert_close(one, vectorized_marginals(z, mu[:1], logvar[:1]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expects z"):
        f(z[:, :2], mu, logvar)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_marginals_cuda_match_float64():
    z, mu, logvar = marginal_posteriors(4000, 3000)
    got = densities.gaussian_mixture_marginals_logsumexp(z.cuda(), mu.cuda(), logvar.cuda())
    assert got.is_cuda
    assert (got.cpu() - vectorized_marginals(z, mu, logvar)).abs().max() < 1e-11


def test_small_mixture_float32_agrees_with_float64_for_sharp_components() -> None:
    # The expanded quadratic form cancels large terms: in float32 arithmetic that costs more
    # than 1e-3 nats for sharp components away from the origin; computed in float64 only the
    # final rounding to float32 remains.
    g = torch.Generator().manual_seed(0)
    mu = (3 * torch.randn(50, 40, generator=g)).double()
    logvar = torch.full((50, 40), -6.0, dtype=torch.float64)
    z = (mu[:20] + 0.05 * torch.randn(20, 40, generator=g, dtype=torch.float64)).float().double()
    log_w = torch.log_softmax(torch.randn(50, generator=g, dtype=torch.float64), -1).float().double()
    exact = torch.logsumexp(diagonal_normal_log_prob(z[:, None, :], mu, logvar) + log_w, dim=-1)
    got = DiagonalGaussianMixture(mu.float(), logvar.float(), log_w.float()).log_prob(z.float())
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-4
    prec = torch.exp(-logvar).float()
    naive = torch.logsumexp(
        z.float().square() @ (-0.5 * prec).T
        + z.float() @ (mu.float() * prec).T
        - 0.5 * (40 * math.log(2 * math.pi) + logvar.float().sum(-1) + (mu.float().square() * prec).sum(-1))
        + log_w.float(),
        dim=-1,
    )
    assert (naive.double() - exact).abs().max() > 1e-3  # the case is hard enough to matter


# ---- spatially ordered constants: spatial_order, the candidate groups' union -----------------


@pytest.fixture
def ordered(monkeypatch):
    """Small mixtures run on spatially ordered constants (`_worth_ordering` at any size and breadth)."""
    monkeypatch.setattr(densities, "ORDER_MIN_COMPONENTS", 64)
    monkeypatch.setattr(densities, "ORDER_MIN_ROWS", 1)
    monkeypatch.setattr(densities, "ORDER_MAX_REACH", 1.0)


def clustered(n_clusters, per_cluster, d, logvar, m, seed=0):
    """Well separated clusters of components, interleaved in index order (component i in cluster
    i % n_clusters), with a shared log-variance; the points are drawn around cluster 0 only, as
    an importance sampler's draws for one test point are."""
    g = torch.Generator().manual_seed(seed)
    centres = 12.0 * torch.randn(n_clusters, d, generator=g)
    mu = centres.repeat(per_cluster, 1) + 0.5 * torch.randn(n_clusters * per_cluster, d, generator=g)
    logvar = torch.full((1, d), logvar).expand(mu.shape[0], d)
    z = centres[0] + 0.7 * torch.randn(m, d, generator=g)
    return z, mu, logvar


def counting_paths(monkeypatch):
    """Counts the entries computed densely over a range, over gathered columns, and one by one."""
    seen = {"range": 0, "union": 0, "sparse": 0}
    dense, exact = densities._dense_entries, densities._exact_entries

    def dense_spy(x64, comps, span, ex, buf):
        width = span.shape[0] if isinstance(span, torch.Tensor) else span[1] - span[0]
        seen["union" if isinstance(span, torch.Tensor) else "range"] += x64.shape[0] * width
        return dense(x64, comps, span, ex, buf)

    def exact_spy(z64, comps, rows, cols):
        seen["sparse"] += rows.shape[0]
        return exact(z64, comps, rows, cols)

    monkeypatch.setattr(densities, "_dense_entries", dense_spy)
    monkeypatch.setattr(densities, "_exact_entries", exact_spy)
    return seen


def test_spatial_order_is_a_deterministic_permutation_into_compact_groups():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 5, generator=g) * torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])
    order = densities.spatial_order(x, group=16)
    assert torch.equal(order.sort().values, torch.arange(1000))
    assert torch.equal(densities.spatial_order(x, group=16), order)

    def spread(points):  # mean squared distance to the group's centroid, over full groups of 16
        groups = points[: len(points) // 16 * 16].view(-1, 16, points.shape[1])
        return (groups - groups.mean(1, keepdim=True)).square().sum(-1).mean()

    assert spread(x[order]) < 0.25 * spread(x)
    assert torch.equal(densities.spatial_order(x[:10], group=16), torch.arange(10))
    assert densities.spatial_order(x[:0], group=16).shape == (0,)
    same = densities.spatial_order(torch.zeros(100, 3), group=8)  # no direction to split along
    assert torch.equal(same.sort().values, torch.arange(100))


@pytest.mark.parametrize("shared", [False, True], ids=["own variances", "shared variances"])
@pytest.mark.parametrize("logvar_mean", [-4.0, 0.0])
def test_ordered_constants_match_the_reference_with_exclusions(ordered, shared, logvar_mean):
    mu, logvar = (shared_posteriors if shared else posteriors)(600, 5, logvar_mean)
    z, idx = samples(mu, logvar, 100)
    # leave-one-out, nothing left out, and an index past N (leaves nothing out, as unordered)
    exclude = torch.where(torch.arange(100) % 3 == 0, torch.full_like(idx, -1), idx)
    exclude[1] = 600 + 3
    z64 = z.double().requires_grad_()
    expected = vectorized_reference(z64, mu, logvar, torch.where(exclude < 600, exclude, -1))
    expected.sum().backward()
    expected = expected.detach()
    comps = densities._Components(mu, logvar, 8, torch.float32, order=True)
    assert comps.order is not None and not torch.equal(comps.order, torch.arange(600))
    for zz, m, lv, tol in ((z, mu, logvar, 1e-9), (z.double(), mu.double(), logvar.double(), 1e-10)):
        zz = zz.clone().requires_grad_()
        got = gaussian_mixture_logsumexp(zz, m, lv, exclude, 64, block_size=128, group=8, out_dtype=torch.float64)
        got.sum().backward()
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)
        grad_tol = 1e-4 if zz.dtype == torch.float32 else 1e-9
        torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=grad_tol, atol=grad_tol)
    mixture = DiagonalGaussianMixture(mu, logvar, small_components=0, chunk_size=64, block_size=128)
    got = mixture.log_prob(z, exclude=idx, out_dtype=torch.float64)
    torch.testing.assert_close(got, vectorized_reference(z, mu, logvar, idx) - math.log(599), rtol=0, atol=1e-9)
    assert [key[1] for key in mixture._constants] == [True]


def test_ordering_changes_the_path_not_the_result(monkeypatch):
    # Interleaved clusters: in index order every group holds components near the points and
    # every block is dense; ordered, the points' cluster fills a few groups, computed densely
    # over their union alone.
    z, mu, logvar = clustered(16, 64, 4, -1.0, 200)
    exclude = torch.arange(200) * 5  # components of several clusters, in and out of the points' own
    expected = vectorized_reference(z, mu, logvar, exclude)
    results, entries = {}, {}
    for order in (False, True):
        seen = counting_paths(monkeypatch)
        comps = densities._Components(mu, logvar, 16, torch.float32, order=order)
        results[order] = densities._kernel(z, comps, exclude, 64, 256, 0.25, torch.float64)
        entries[order] = dict(seen)
        torch.testing.assert_close(results[order], expected, rtol=0, atol=1e-9)
    assert entries[False]["union"] == 0 and entries[False]["range"] == 200 * 1024
    assert entries[True]["range"] == 0 and 0 < entries[True]["union"] <= 200 * 1024 // 8


@pytest.mark.parametrize("saved_bytes", [densities.SAVED_ENTRIES_BYTES, 0], ids=["kept", "recomputed"])
def test_gradient_through_ordered_constants_and_union_blocks(monkeypatch, saved_bytes):
    # The backward pass works on the permuted constants (kept entries and the union blocks'
    # sums, or the walk repeated): against autograd through the float64 reference.
    monkeypatch.setattr(densities, "SAVED_ENTRIES_BYTES", saved_bytes)
    z, mu, logvar = clustered(8, 32, 3, -1.0, 40, seed=1)
    exclude = torch.where(torch.arange(40) % 2 == 0, torch.arange(40) * 8, -1)  # in the points' cluster
    z64 = z.double().requires_grad_()
    vectorized_reference(z64, mu, logvar, exclude).sum().backward()
    seen = counting_paths(monkeypatch)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        zz = z.to(dtype).requires_grad_()
        comps = densities._Components(mu.to(dtype), logvar.to(dtype), 8, dtype, order=True)
        densities._kernel(zz, comps, exclude, 16, 64, 0.25, torch.float64).sum().backward()
        torch.testing.assert_close(zz.grad.double(), z64.grad, rtol=tol, atol=tol)
    assert seen["union"] > 0


@pytest.mark.parametrize("shared", [False, True], ids=["own variances", "shared variances"])
def test_union_and_sparse_recomputation_agree(monkeypatch, shared):
    # The same located blocks recomputed one entry at a time and densely over the union of
    # their candidate groups, with and without the order; and very sharp components, whose
    # float64 product is not accurate enough, never take the union.
    monkeypatch.setattr(densities, "DENSE_REACH", 1.0)  # scattered points: no chunk taken for broad
    mu, logvar = (shared_posteriors if shared else posteriors)(600, 4, -4.0)
    z, idx = samples(mu, logvar, 100)
    expected = vectorized_reference(z, mu, logvar, idx)
    for cost in (0.0, math.inf):
        monkeypatch.setattr(densities, "SPARSE_ENTRY_COST", cost)
        for order in (False, True):
            seen = counting_paths(monkeypatch)
            comps = densities._Components(mu, logvar, 8, torch.float32, order=order)
            got = densities._kernel(z, comps, idx, 32, 128, 0.25, torch.float64)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
            assert (seen["union"] > 0) == (cost > 0) and seen["range"] == 0
    sharp_mu, sharp_logvar = (shared_posteriors if shared else posteriors)(600, 4, -9.0)
    z, idx = samples(sharp_mu, sharp_logvar, 50)
    seen = counting_paths(monkeypatch)
    comps = densities._Components(sharp_mu, sharp_logvar, 8, torch.float32, order=True)
    got = densities._kernel(z, comps, idx, 32, 128, 0.25, torch.float64)
    torch.testing.assert_close(got, vectorized_reference(z, sharp_mu, sharp_logvar, idx), rtol=0, atol=1e-9)
    assert seen["union"] == 0 and seen["sparse"] > 0


def test_mixture_orders_for_many_points_against_narrow_components_only(monkeypatch):
    monkeypatch.setattr(densities, "ORDER_MIN_COMPONENTS", 64)
    monkeypatch.setattr(densities, "ORDER_MIN_ROWS", 100)
    z, mu, logvar = clustered(8, 64, 4, -1.0, 300)
    mixture = DiagonalGaussianMixture(mu, logvar, small_components=0)
    few = mixture.log_prob(z[:50], out_dtype=torch.float64)
    assert list(mixture._constants) == [(torch.float32, False)]
    many = mixture.log_prob(z, out_dtype=torch.float64)
    assert sorted(key[1] for key in mixture._constants) == [False, True]
    expected = vectorized_reference(z, mu, logvar) - math.log(512)
    torch.testing.assert_close(few, expected[:50], rtol=0, atol=1e-9)
    torch.testing.assert_close(many, expected, rtol=0, atol=1e-9)
    # Broad components (every entry within the margin): no order, whatever the number of points.
    broad = DiagonalGaussianMixture(0.1 * mu, logvar + 4.0, small_components=0)
    got = broad.log_prob(z, out_dtype=torch.float64)
    assert list(broad._constants) == [(torch.float32, False)]
    expected = vectorized_reference(z, 0.1 * mu, logvar + 4.0) - math.log(512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_gpu_block_profile_with_ordered_constants_on_the_cpu(ordered, monkeypatch):
    # A GPU's wide blocks (no narrow first block) over ordered constants: unions, exclusions
    # and the gradient, forced on the CPU (scaled down).
    use_gpu_like_blocks(monkeypatch)
    seen = counting_paths(monkeypatch)
    z, mu, logvar = clustered(8, 40, 5, -1.0, 50, seed=2)
    exclude = torch.where(torch.arange(50) % 3 == 0, -1, torch.arange(50) * 8)
    assert_small_blocks_match_reference(z, mu, logvar, exclude)
    assert seen["union"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ordered_constants_match_float64(ordered):
    z, mu, logvar = clustered(50, 100, 40, -0.6, 1000)
    exclude = torch.arange(1000) * 5
    expected = vectorized_reference(z, mu, logvar, exclude)
    got = gaussian_mixture_logsumexp(z.cuda(), mu.cuda(), logvar.cuda(), exclude.cuda(), out_dtype=torch.float64)
    assert (got.cpu() - expected).abs().max() < 1e-9
