"""The mixture kernel `priors.densities.gaussian_mixture_logsumexp` against float64 double loops."""

from __future__ import annotations

import math

import pytest
import torch

import priors.densities as densities
from priors.densities import gaussian_mixture_logsumexp


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
    mu, logvar = posteriors(3000, 5, logvar_mean)
    z, _ = samples(mu, logvar, 2000)
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
