"""The Prior contract, checked on every prior in conf/prior/ (and on `--prior MODULE.CLASS`).

Each case is built the way a run builds it: `hydra.utils.instantiate(cfg.prior,
latent_dim=D)` from the composed config (shrunk to a few components or layers where the
config has such a key, so grid integrals stay cheap and accurate), completed, if it is a
`_partial_` node, with a tiny VAE's encoder and a tiny random `train_x`; a prior built on
the training set gets its encodings as the trainer's callback would give them. Everything
runs in float64.

Run the suite on your own prior with
`python -m pytest tests/priors/test_prior_contract.py --prior mypkg.module.MyPrior`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from priors.base import Prior
from priors.gaussian import GaussianPrior
from vae.callbacks import consumers, encode
from vae.model import VAE
from vae.networks import MLPDecoder, MLPEncoder

CONF = Path(__file__).resolve().parents[2] / "conf"
# Shrinks applied to any config that has the key: small, well-conditioned priors.
SMALL = {"num_components": 3, "num_layers": 2, "hidden_features": 16, "num_exemplars": 5, "k": 3}
DATA_DIM, N_TRAIN = 6, 12
# The normalization grids: (dimension, points across the uniform core of each axis).
GRIDS = [(1, 4001), (2, 501)]
# Each axis of a normalization grid runs on to |z| = ZMAX, so heavy tails are integrated, not cut off.
ZMAX = 1e6
# On these grids the reference N(0, I) integrates to 1 within 5e-16, float64 rounding
# (test_the_grid_integrates_the_reference_gaussian_to_rounding measures it); a prior may be off
# by a small factor more, plus its own estimated quadrature error (see `normalization`).
NORMALIZATION_TOL = 1e-13
# A grid whose estimated quadrature error exceeds this cannot check the prior at all.
MAX_QUADRATURE_ERROR = 1e-3


@dataclass
class PriorCase:
    name: str
    make: Callable[[int], Any]  # latent_dim -> a prior, or a partial one to complete with encoder and train_x


def _config_case(compose: Callable[..., Any], name: str) -> PriorCase:
    cfg = compose(f"prior={name}", "logger=none").prior
    for key, value in SMALL.items():
        if key in cfg:
            cfg[key] = value
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    return PriorCase(name, lambda d: hydra.utils.instantiate(cfg, latent_dim=d))


def _class_case(path: str) -> PriorCase:
    module, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    needs_model = "encoder" in inspect.signature(cls).parameters
    return PriorCase(path, lambda d: functools.partial(cls, latent_dim=d) if needs_model else cls(latent_dim=d))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One case per conf/prior option (its name; the `case` fixture composes it) and per `--prior`
    (imported here, so a wrong MODULE.CLASS fails the collection)."""
    if "case" in metafunc.fixturenames:
        cases: list[str | PriorCase] = [p.stem for p in sorted(CONF.glob("prior/*.yaml"))]
        cases += [_class_case(p) for p in metafunc.config.getoption("--prior")]
        ids = [c if isinstance(c, str) else c.name for c in cases]
        metafunc.parametrize("case", cases, ids=ids, indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest, compose: Callable[..., Any]) -> PriorCase:
    param = request.param
    return _config_case(compose, param) if isinstance(param, str) else param


def build(case: PriorCase, latent_dim: int, seed: int = 0) -> tuple[Prior, VAE, torch.Tensor]:
    """The prior inside a tiny float64 VAE, as `vae.build_model` and the trainer make it."""
    torch.manual_seed(seed)
    encoder = MLPEncoder(DATA_DIM, latent_dim, [8]).double()
    decoder = MLPDecoder(DATA_DIM, latent_dim, [8]).double()
    train_x = torch.rand(N_TRAIN, DATA_DIM, dtype=torch.float64)
    prior = case.make(latent_dim)
    if isinstance(prior, functools.partial):
        prior = prior(encoder=encoder, train_x=train_x)
    model = VAE(encoder, decoder, prior.double(), latent_dim)
    mu, logvar = encode(encoder, train_x, 100, torch.device("cpu"))
    for consumer in consumers(model):
        consumer.update_encodings(mu, logvar)
    return prior, model, train_x


def grid_half(prior: Prior) -> float:
    """Half the width of a square grid wide enough for the prior's samples (at least 10)."""
    with torch.no_grad():
        spread = prior.sample(4000).abs().quantile(0.999).item()
    return max(10.0, 2.0 * spread)


def grid(prior: Prior, dim: int, points: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """exp(log_prob) on a square grid wide enough for the prior's samples; (density, axes)."""
    axis = torch.linspace(-grid_half(prior), grid_half(prior), points, dtype=torch.float64)
    with torch.no_grad():
        mesh = torch.stack(torch.meshgrid(*[axis] * dim, indexing="ij"), dim=-1)
        return prior.log_prob(mesh).exp(), [axis] * dim


def quadrature_axis(half: float, points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis of a normalization grid: nodes z, trapezoid weights, and the weights of every other node.

    The nodes are `points` evenly spaced ones on [-half, half], continued with the same step h
    in t by z = +-(half + sinh(2 (|t| - half)) / 2) out to ZMAX. The trapezoid rule in t,
    with weights h dz/dt, stays accurate across the joint (z is twice differentiable there)
    and takes the tails out to ZMAX in a few hundred nodes.
    """
    h = 2.0 * half / (points - 1)
    m = (points - 1) // 2 + math.ceil(math.asinh(2.0 * (ZMAX - half)) / 2.0 / h)
    m += m % 2  # an even m: every other node keeps both ends
    t = h * torch.arange(-m, m + 1, dtype=torch.float64)
    s = (t.abs() - half).clamp(min=0.0)
    z = torch.where(s > 0, t.sign() * (half + torch.sinh(2.0 * s) / 2.0), t)
    dz = torch.cosh(2.0 * s)
    weights, coarse = h * dz, 2.0 * h * dz[::2]
    for w in (weights, coarse):
        w[0] /= 2.0
        w[-1] /= 2.0
    return z, weights, coarse


def normalization(prior: Prior, dim: int, half: float, points: int, context: int | None = None) -> tuple[float, float]:
    """The integral of exp(log_prob) over R^dim on a grid, and an estimate of its quadrature error.

    The error estimate is 4 |I - I_2| (I_2: the integral on every other node; about 3 times
    the error of I for a smooth integrand, and the factor 4 covers a spline flow's knots)
    plus the mass in the last decade of the grid, |z_i| > ZMAX / 10 (at least the mass
    beyond ZMAX for tails that decay like |z|^-2 or faster). For a smooth, light-tailed
    density both terms are at float64 rounding.

    Args:
        context: a training-set index that every grid point is conditioned on, or None.
    """
    z, weights, coarse = quadrature_axis(half, points)
    with torch.no_grad():
        mesh = torch.stack(torch.meshgrid(*[z] * dim, indexing="ij"), dim=-1).reshape(-1, dim)
        if context is None:
            log_p = prior.log_prob(mesh)
        else:
            log_p = prior.log_prob(mesh, context=torch.full(mesh.shape[:-1], context, dtype=torch.int64))
    density = log_p.exp().reshape([len(z)] * dim)

    def integrate(f: torch.Tensor, w: torch.Tensor) -> float:
        for _ in range(dim):
            f = torch.tensordot(w, f, dims=([0], [0]))
        return f.item()

    total = integrate(density, weights)
    every_other = integrate(density[(slice(None, None, 2),) * dim], coarse)
    inner = torch.stack(torch.meshgrid(*[z.abs() <= ZMAX / 10] * dim, indexing="ij")).all(0)
    last_decade = integrate(density.masked_fill(inner, 0.0), weights)
    return total, 4.0 * abs(total - every_other) + last_decade


def assert_normalized(prior: Prior, dim: int, half: float, points: int, what: str, context: int | None = None) -> None:
    """Assert that exp(log_prob) integrates to 1 within NORMALIZATION_TOL plus the grid's estimated error."""
    total, error = normalization(prior, dim, half, points, context)
    assert error < MAX_QUADRATURE_ERROR, (
        f"{what}: the grid cannot check the normalization: its estimated quadrature error is {error:.1e}"
    )
    tol = NORMALIZATION_TOL + error
    assert abs(total - 1.0) < tol, (
        f"{what}: the integral of exp(log_prob) over R^{dim} is {total:.12f}, not 1 within {tol:.1e}"
    )


def ks_statistic(samples: torch.Tensor, axis: torch.Tensor, density: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between `samples` and the grid CDF of a 1-D density."""
    cdf = torch.cat([density.new_zeros(1), torch.cumulative_trapezoid(density, axis)])
    cdf = (cdf / cdf[-1]).numpy()
    s = np.sort(samples.numpy())
    f = np.interp(s, axis.numpy(), cdf)
    n = len(s)
    return float(max((np.arange(1, n + 1) / n - f).max(), (f - np.arange(n) / n).max()))


# ---- the contract ---------------------------------------------------------------------


def test_shapes(case: PriorCase) -> None:
    prior, _, _ = build(case, 3)
    z = torch.randn(4, 5, 3, dtype=torch.float64)
    for mode in (True, False):
        prior.train(mode)
        assert prior.log_prob(z).shape == (4, 5)
        assert prior.log_prob(z[0, 0]).shape == ()
        assert torch.isfinite(prior.log_prob(z)).all()
        index = torch.randint(N_TRAIN, (4, 5))
        assert prior.log_prob(z, context=index).shape == (4, 5)
        with torch.no_grad():
            s = prior.sample(7)
        assert s.shape == (7, 3) and s.dtype == torch.float64 and torch.isfinite(s).all()
        assert prior.sample(0).shape == (0, 3)
    if prior.is_factorized:
        torch.testing.assert_close(prior.log_prob_per_dim(z).sum(-1), prior.log_prob(z))


@pytest.mark.parametrize("dim,points", GRIDS)
def test_normalized(case: PriorCase, dim: int, points: int) -> None:
    prior, _, _ = build(case, dim)
    prior.eval()
    assert_normalized(prior, dim, grid_half(prior), points, case.name)


@pytest.mark.parametrize("dim,points", GRIDS)
def test_normalized_given_a_training_context(case: PriorCase, dim: int, points: int) -> None:
    """A leave-one-out prior in training is a density for every point it leaves out."""
    prior, _, _ = build(case, dim)
    if not prior.takes_context:
        pytest.skip(f"{case.name} takes no context")
    prior.train()
    half = grid_half(prior)
    for index in (0, N_TRAIN - 1):
        torch.manual_seed(index)  # a random exemplar subset: the same one for every grid point
        assert_normalized(prior, dim, half, points, f"{case.name} leaving out point {index}", context=index)


@pytest.mark.parametrize("dim,points", GRIDS)
def test_the_grid_integrates_the_reference_gaussian_to_rounding(dim: int, points: int) -> None:
    prior = GaussianPrior(dim).double()
    total, error = normalization(prior, dim, grid_half(prior), points)
    assert abs(total - 1.0) < NORMALIZATION_TOL / 50 and error < NORMALIZATION_TOL / 50, (total - 1.0, error)


@pytest.mark.parametrize("dim,points", GRIDS)
@pytest.mark.parametrize("offset", [1e-4, -1e-4])
def test_a_log_prob_off_by_a_constant_fails_the_normalization_check(dim: int, points: int, offset: float) -> None:
    class OffByAConstant(GaussianPrior):
        def _log_prob(self, z: torch.Tensor) -> torch.Tensor:
            return super()._log_prob(z) + offset

    prior = OffByAConstant(dim).double()
    with pytest.raises(AssertionError, match=rf"over R\^{dim} is {math.exp(offset):.9f}"):
        assert_normalized(prior, dim, grid_half(prior), points, "OffByAConstant")


@pytest.mark.parametrize("dim,points", GRIDS)
def test_samples_follow_log_prob(case: PriorCase, dim: int, points: int) -> None:
    prior, _, _ = build(case, dim)
    prior.eval()
    density, axes = grid(prior, dim, points)
    torch.manual_seed(1)
    n = 4000
    with torch.no_grad():
        samples = prior.sample(n)
    # 1.95 / sqrt(n) is the KS test's 0.1% critical value.
    for d in range(dim):
        marginal = density
        for other in reversed(range(dim)):
            if other != d:
                marginal = torch.trapezoid(marginal, axes[other], dim=other)
        ks = ks_statistic(samples[:, d], axes[d], marginal)
        assert ks < 1.95 / n**0.5, f"{case.name}: KS distance {ks:.4f} of dimension {d} samples vs log_prob"
    if dim == 2:
        mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        cell = (axes[0][1] - axes[0][0]) ** 2
        weights = density * cell / (density * cell).sum()
        features = [lambda z: z[..., 0], lambda z: z[..., 1], lambda z: z[..., 0] * z[..., 1]]
        for i, f in enumerate(features):
            expected = (weights * f(mesh)).sum().item()
            values = f(samples)
            se = values.std().item() / n**0.5
            assert abs(values.mean().item() - expected) < 5 * se, f"{case.name}: moment {i} of samples vs log_prob"


def test_every_parameter_gets_a_gradient(case: PriorCase) -> None:
    prior, _, _ = build(case, 3)
    prior.train()
    z = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    index = torch.arange(16) % N_TRAIN
    loss = prior.log_prob(z).sum() + prior.log_prob(z, context=index).sum()
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    for name, p in prior.named_parameters():
        assert p.grad is not None, f"{case.name}: parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{case.name}: parameter {name} got a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{case.name}: parameter {name} got an all-zero gradient"


def test_state_dict_round_trip(case: PriorCase) -> None:
    prior_a, model_a, _ = build(case, 3, seed=0)
    prior_b, model_b, _ = build(case, 3, seed=1)
    z = torch.randn(9, 3, dtype=torch.float64)
    state_a, state_b = prior_a.state_dict(), prior_b.state_dict()
    priors_differ = any(
        not torch.equal(state_a[k], state_b[k]) for k in state_a if state_a[k].shape == state_b[k].shape
    )
    for p in (prior_a, prior_b):
        p.eval()
    with torch.no_grad():
        expected = prior_a.log_prob(z)
        before = prior_b.log_prob(z)  # also fills any evaluation cache, which must not go stale
        # Through the whole VAE, as a checkpoint does: a prior may depend on the encoder.
        model_b.load_state_dict(model_a.state_dict())
        after = prior_b.log_prob(z)
    assert torch.equal(after, expected)
    if priors_differ:
        assert not torch.equal(before, expected), "the two builds were identical: the round trip proves nothing"


@pytest.mark.cuda
def test_cuda_matches_cpu(case: PriorCase) -> None:
    prior, model, _ = build(case, 3)
    prior.eval()
    z = torch.randn(11, 3, dtype=torch.float64)
    with torch.no_grad():
        cpu = prior.log_prob(z)
        model.to("cuda")
        gpu = prior.log_prob(z.cuda())
        s = prior.sample(5)
    assert gpu.device.type == "cuda" and s.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu)
