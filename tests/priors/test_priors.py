"""Each prior against an independent float64 reference, and the bad-input errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform
from torch import distributions as dist

from examples.student_t_prior import StudentTPrior
from priors.aggregate import AggregatePosteriorPrior
from priors.base import Prior, PriorShapeError
from priors.exemplar import ExemplarPrior, NearestNeighbours
from priors.flow import FlowPrior
from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from priors.vampprior import VampPrior
from vae.model import VAE
from vae.networks import MLPEncoder

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def tiny_vae(prior: Prior, data_dim: int = 5, latent_dim: int = 2) -> VAE:
    torch.manual_seed(0)
    return VAE.mlp(data_dim=data_dim, latent_dim=latent_dim, hidden_dims=[7], prior=prior).double()


# ---- references -----------------------------------------------------------------------


def test_mixture_matches_torch_mixture_same_family() -> None:
    torch.manual_seed(0)
    p = MixturePrior(3, num_components=5).double()
    with torch.no_grad():
        p.logits.normal_()
        p.logvars.normal_(0, 0.5)
    z = torch.randn(4, 6, 3, dtype=F64)
    ref = dist.MixtureSameFamily(
        dist.Categorical(logits=p.logits), dist.Independent(dist.Normal(p.means, torch.exp(0.5 * p.logvars)), 1)
    ).log_prob(z)
    torch.testing.assert_close(p.log_prob(z), ref, rtol=0, atol=1e-12)


def tiny_encoder(latent_dim: int = 2, data_dim: int = 5) -> MLPEncoder:
    torch.manual_seed(0)
    return MLPEncoder(data_dim, latent_dim, [7]).double()


def test_vampprior_matches_mean_of_encoder_posteriors() -> None:
    encoder = tiny_encoder()
    p = VampPrior(2, encoder, torch.rand(10, 5, dtype=F64), num_components=4)
    z = torch.randn(7, 2, dtype=F64)
    mu, logvar = encoder(p.pseudo_inputs)
    ref = torch.stack(
        [
            math.log(0.25)
            + sum(dist.Normal(mu[k, d], torch.exp(0.5 * logvar[k, d])).log_prob(z[:, d]) for d in range(2))
            for k in range(4)
        ]
    ).logsumexp(0)
    torch.testing.assert_close(p.log_prob(z), ref, rtol=0, atol=1e-12)
    assert p.pseudo_inputs.min() >= 0 and p.pseudo_inputs.max() <= 1


def test_vampprior_data_init_uses_training_images() -> None:
    train_x = torch.rand(10, 5, dtype=F64)
    p = VampPrior(2, tiny_encoder(), train_x, num_components=3, init="data")
    for u in p.pseudo_inputs:
        assert (train_x - u).abs().sum(-1).min() == 0


def test_vampprior_follows_the_encoder_after_a_step() -> None:
    encoder = tiny_encoder()
    p = VampPrior(2, encoder, torch.rand(10, 5, dtype=F64), num_components=4)
    z = torch.randn(5, 2, dtype=F64)
    before = p.log_prob(z).detach()
    opt = torch.optim.SGD(list(encoder.parameters()) + [p.pseudo_inputs_raw], lr=0.1)
    (-p.log_prob(z).sum()).backward()
    opt.step()
    with torch.no_grad():
        mu, logvar = encoder(p.pseudo_inputs)
        ref = torch.logsumexp(
            -0.5 * (math.log(2 * math.pi) + logvar + (z[:, None] - mu).square() / logvar.exp()).sum(-1), -1
        )
        torch.testing.assert_close(p.log_prob(z), ref - math.log(4), rtol=0, atol=1e-12)
        assert not torch.allclose(p.log_prob(z), before)


def _aggregate(n: int = 9, d: int = 2) -> tuple[AggregatePosteriorPrior, MLPEncoder, torch.Tensor]:
    p = AggregatePosteriorPrior(d, chunk_size=4).double()
    encoder = tiny_encoder(d)
    train_x = torch.rand(n, 5, dtype=F64)
    with torch.no_grad():
        p.update_encodings(*encoder(train_x))
    return p, encoder, train_x


def _loop_log_q(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, skip: int = -1) -> float:
    terms = []
    for n in range(len(mu)):
        if n == skip:
            continue
        t = 0.0
        for d in range(z.shape[0]):
            var = math.exp(logvar[n, d].item())
            t += -0.5 * (math.log(2 * math.pi * var) + (z[d].item() - mu[n, d].item()) ** 2 / var)
        terms.append(t)
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(len(terms))


def test_aggregate_matches_double_loop_and_leaves_one_out() -> None:
    p, encoder, train_x = _aggregate()
    mu, logvar = (t.detach() for t in encoder(train_x))
    z = torch.randn(6, 2, dtype=F64)
    index = torch.tensor([0, 3, 8, 3, 5, 1])
    full, loo = p.log_prob(z), p.log_prob(z, context=index)
    for m in range(6):
        assert abs(full[m].item() - _loop_log_q(z[m], mu, logvar)) < 1e-10
        assert abs(loo[m].item() - _loop_log_q(z[m], mu, logvar, skip=int(index[m]))) < 1e-10
    # With separated, narrow posteriors a point's own component dominates at its own mean:
    # leaving it out must lower the density by far.
    separated = torch.stack([10.0 * torch.arange(9, dtype=F64), torch.zeros(9, dtype=F64)], dim=-1)
    p.update_encodings(separated, torch.full((9, 2), -2.0, dtype=F64))
    own = p.mu[index]
    assert (p.log_prob(own, context=index) < p.log_prob(own) - 5.0).all()


def test_aggregate_new_encodings_replace_the_old_and_a_resized_load() -> None:
    p, encoder, _ = _aggregate()
    z = torch.randn(3, 2, dtype=F64)
    before = p.log_prob(z)
    x1 = torch.rand(9, 5, dtype=F64)
    with torch.no_grad():
        p.update_encodings(*encoder(x1))
        mu, logvar = encoder(x1)
    assert abs(p.log_prob(z)[0].item() - _loop_log_q(z[0], mu, logvar)) < 1e-10 and not torch.allclose(
        p.log_prob(z), before
    )
    # A checkpoint with another N loads into a fresh prior sized differently.
    other, _, _ = _aggregate(n=4)
    other.load_state_dict(p.state_dict())
    assert other.num_points == 9
    torch.testing.assert_close(other.log_prob(z), p.log_prob(z), rtol=0, atol=0)


def _exemplar(
    exemplars: str, n: int = 8, d: int = 2, variance: str = "scalar", **kw
) -> tuple[ExemplarPrior, MLPEncoder, torch.Tensor]:
    encoder = tiny_encoder(d)
    train_x = torch.rand(n, 5, dtype=F64)
    p = ExemplarPrior(d, encoder, train_x, exemplars=exemplars, variance=variance, init_logvar=-0.7, **kw).double()
    with torch.no_grad():
        p.update_encodings(*encoder(train_x))
    return p, encoder, train_x


def _loop_exemplar(z: torch.Tensor, means: torch.Tensor, logvar: torch.Tensor, members: list[int]) -> float:
    """log (1/|members|) sum_{m in members} N(z; means[m], diag(exp(logvar))), by loops."""
    terms = []
    for m in members:
        t = 0.0
        for d in range(z.shape[0]):
            var = math.exp(logvar[d % len(logvar)].item())
            t += -0.5 * (math.log(2 * math.pi * var) + (z[d].item() - means[m, d].item()) ** 2 / var)
        terms.append(t)
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms)) - math.log(len(terms))


@pytest.mark.parametrize("variance", ["scalar", "per_dim"])
def test_exemplar_all_matches_double_loop_with_leave_one_out_and_gradients(variance: str) -> None:
    p, encoder, train_x = _exemplar("all", variance=variance)
    if variance == "per_dim":
        with torch.no_grad():
            p.logvar.copy_(torch.tensor([-0.3, 0.4]))
    means = encoder(train_x)[0].detach()
    z = torch.randn(5, 2, dtype=F64)
    index = torch.tensor([0, 7, 3, 3, 1])
    p.train()
    loo = p.log_prob(z, context=index)
    for i in range(5):
        others = [m for m in range(8) if m != int(index[i])]
        assert abs(loo[i].item() - _loop_exemplar(z[i], means, p.logvar, others)) < 1e-10
    loo.sum().backward()  # the exemplar means are in the graph: the encoder gets gradients
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in encoder.parameters())
    assert p.logvar.grad is not None and p.logvar.grad.abs().sum() > 0
    full = p.log_prob(z)  # evaluation: every exemplar, from the cache
    for i in range(5):
        assert abs(full[i].item() - _loop_exemplar(z[i], means, p.logvar, list(range(8)))) < 1e-10


def test_exemplar_random_subset_is_normalized_by_what_it_summed() -> None:
    p, encoder, train_x = _exemplar("random", n=8, num_exemplars=4)
    means = encoder(train_x)[0].detach()
    z = torch.randn(8, 2, dtype=F64)
    index = torch.arange(8)
    p.train()
    torch.manual_seed(3)
    got = p.log_prob(z, context=index)
    torch.manual_seed(3)
    chosen = torch.randperm(8)[:4].tolist()  # the subset the prior drew
    for i in range(8):
        members = [m for m in chosen if m != i]  # 3 exemplars when i was drawn, else 4
        assert abs(got[i].item() - _loop_exemplar(z[i], means, p.logvar, members)) < 1e-10


def test_exemplar_knn_uses_each_points_nearest_cached_means_but_never_itself() -> None:
    p, encoder, train_x = _exemplar("knn", n=9, k=3)
    means = encoder(train_x)[0].detach()
    z = torch.randn(4, 2, dtype=F64)
    index = torch.tensor([0, 4, 8, 4])
    p.train()
    got = p.log_prob(z, context=index)
    for i in range(4):
        n = int(index[i])
        by_distance = sorted((float((means[m] - means[n]).square().sum()), m) for m in range(9) if m != n)
        nearest = [m for _, m in by_distance[:3]]
        assert abs(got[i].item() - _loop_exemplar(z[i], means, p.logvar, nearest)) < 1e-10


def test_exemplar_without_gradient_uses_the_stale_cache_and_leaves_the_encoder_alone() -> None:
    p, encoder, train_x = _exemplar("all", gradient=False)
    stale = encoder(train_x)[0].detach()  # the cache the fixture filled
    with torch.no_grad():  # the encoder moves on after the cache was filled
        for q in encoder.parameters():
            q.add_(0.5)
    z = torch.randn(5, 2, dtype=F64)
    index = torch.tensor([0, 7, 3, 3, 1])
    p.train()
    loo = p.log_prob(z, context=index)
    for i in range(5):
        others = [m for m in range(8) if m != int(index[i])]
        assert abs(loo[i].item() - _loop_exemplar(z[i], stale, p.logvar, others)) < 1e-10
    loo.sum().backward()
    assert all(q.grad is None for q in encoder.parameters())
    assert p.logvar.grad is not None and p.logvar.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gradient must be true or false"):
        ExemplarPrior(2, encoder, train_x, exemplars="all", gradient="no")


def test_exemplar_with_a_frozen_encoder_takes_its_cache_and_never_calls_the_encoder() -> None:
    # A prior fitted to a trained VAE: re-encoding the exemplars would give the cache again.
    p, encoder, train_x = _exemplar("knn", n=9, k=3)
    means = encoder(train_x)[0].detach()
    encoder.requires_grad_(False)
    calls = []
    encoder.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(4, 2, dtype=F64)
    index = torch.tensor([0, 4, 8, 4])
    p.train()
    got = p.log_prob(z, context=index)
    assert not calls
    for i in range(4):
        n = int(index[i])
        nearest = sorted(range(9), key=lambda m: float((means[m] - means[n]).square().sum()) if m != n else math.inf)
        assert abs(got[i].item() - _loop_exemplar(z[i], means, p.logvar, nearest[:3])) < 1e-10
    got.sum().backward()
    assert p.logvar.grad is not None and p.logvar.grad.abs().sum() > 0


def test_exemplar_bad_arguments() -> None:
    encoder, x = tiny_encoder(), torch.rand(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="exemplars must be one of"):
        ExemplarPrior(2, encoder, x, exemplars="some")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
        ExemplarPrior(2, encoder, x, k=6)
    with pytest.raises(RuntimeError, match="no cached exemplar means yet"):
        ExemplarPrior(2, encoder, x, k=2).log_prob(torch.zeros(3, 2))


def test_student_t_matches_torch() -> None:
    p = StudentTPrior(3, df=3.0, scale=2.0).double()
    z = torch.randn(5, 3, dtype=F64) * 3
    ref = dist.StudentT(torch.tensor(3.0, dtype=F64), 0.0, torch.tensor(2.0, dtype=F64)).log_prob(z).sum(-1)
    # log_df and log_scale start as float32 logs, so nu and s are exact only to ~1e-7.
    torch.testing.assert_close(p.log_prob(z), ref, rtol=1e-7, atol=1e-7)
    fixed = StudentTPrior(3, learn_df=False, learn_scale=False)
    assert len(list(fixed.parameters())) == 0 and "log_df" in fixed.state_dict()


def test_flow_spline_option_and_one_dimension() -> None:
    spline = FlowPrior(
        2,
        num_layers=2,
        hidden_features=8,
        layer=partial(
            MaskedPiecewiseRationalQuadraticAutoregressiveTransform, tails="linear", tail_bound=3.0, num_bins=4
        ),
    )
    assert isinstance(spline.flow._transform._transforms[0], MaskedPiecewiseRationalQuadraticAutoregressiveTransform)
    # Outside the tail bound the spline is the identity: the density there is the standard normal's.
    far = torch.tensor([[50.0, -60.0]])
    torch.testing.assert_close(spline.log_prob(far), GaussianPrior(2).log_prob(far), rtol=1e-5, atol=1e-4)
    one = FlowPrior(1, num_layers=2, hidden_features=8).double()
    z = one.sample(5)
    assert z.shape == (5, 1) and torch.isfinite(one.log_prob(z)).all()


# ---- bad input: a clear error naming the prior and what is wrong -------------------------


@pytest.mark.parametrize("cls", [MixturePrior, VampPrior])
@pytest.mark.parametrize("k", [0, -3])
def test_nonpositive_k(cls: type, k: int) -> None:
    build = partial(cls, 2) if cls is MixturePrior else partial(cls, 2, tiny_encoder(), torch.rand(6, 5, dtype=F64))
    with pytest.raises(ValueError, match=rf"{cls.__name__}: num_components \(K\) must be a positive integer, got {k}"):
        build(num_components=k)


def test_flow_bad_options() -> None:
    with pytest.raises(ValueError, match="FlowPrior: num_layers"):
        FlowPrior(2, num_layers=0)
    with pytest.raises(TypeError, match="FlowPrior: layer must be a callable"):
        FlowPrior(2, layer="spline")


@pytest.mark.parametrize("prior", [MixturePrior(3, 2), FlowPrior(3, 1, 8), StudentTPrior(3)], ids=type)
def test_latent_size_mismatch(prior: Prior) -> None:
    with pytest.raises(PriorShapeError, match=rf"{type(prior).__name__}.log_prob expects z of shape \[..., 3\]"):
        prior.log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=rf"{type(prior).__name__} has latent_dim=3 but the VAE has latent_dim=2"):
        VAE.mlp(data_dim=5, latent_dim=2, hidden_dims=[4], prior=prior)


def test_encoder_latent_size_mismatch() -> None:
    encoder = tiny_encoder(2)
    with pytest.raises(
        ValueError, match=r"VampPrior: the encoder maps pseudo-inputs to mu \(3, 2\).*expected \(3, 4\)"
    ):
        VampPrior(4, encoder, torch.rand(6, 5, dtype=F64), num_components=3)
    with pytest.raises(ValueError, match=r"AggregatePosteriorPrior: needs encodings mu, logvar of shape \[N, 4\]"):
        AggregatePosteriorPrior(4).update_encodings(*encoder(torch.rand(6, 5, dtype=F64)))


def test_wrong_output_shape_caught_by_base_class() -> None:
    class BadPrior(Prior):
        def _log_prob(self, z):
            return z.sum(-1, keepdim=True)

        def _sample(self, n):
            return torch.zeros(n, self.latent_dim + 1)

    bad = BadPrior(2)
    with pytest.raises(PriorShapeError, match=r"BadPrior._log_prob returned shape \(4, 1\), expected \(4,\)"):
        bad.log_prob(torch.zeros(4, 2))
    with pytest.raises(PriorShapeError, match=r"BadPrior._sample returned shape \(3, 3\), expected \(3, 2\)"):
        bad.sample(3)


def test_vampprior_bad_arguments() -> None:
    with pytest.raises(ValueError, match="VampPrior: init must be one of"):
        VampPrior(2, tiny_encoder(), torch.rand(6, 5, dtype=F64), init="kmeans")
    with pytest.raises(ValueError, match="VampPrior expects train_x of shape"):
        VampPrior(2, tiny_encoder(), torch.rand(5, dtype=F64))


def test_aggregate_without_encodings() -> None:
    p = AggregatePosteriorPrior(2)
    for call in (
        lambda: p.log_prob(torch.zeros(3, 2)),
        lambda: p.sample(2),
        lambda: p.log_prob(torch.zeros(3, 2), context=torch.zeros(3, dtype=torch.int64)),
    ):
        with pytest.raises(RuntimeError, match="AggregatePosteriorPrior has no encodings of the training set yet"):
            call()
    q, _, _ = _aggregate(n=5)
    with pytest.raises(IndexError, match=r"AggregatePosteriorPrior.log_prob: context indices must lie in \[0, 5\)"):
        q.log_prob(torch.zeros(2, 2, dtype=F64), context=torch.tensor([0, 5]))


def test_a_prior_without_context_ignores_it_and_a_wrong_context_shape_is_named() -> None:
    z = torch.randn(4, 3)
    t = StudentTPrior(3)  # implements _log_prob(z) only
    torch.testing.assert_close(t.log_prob(z, context=torch.arange(4)), t.log_prob(z))
    q, _, _ = _aggregate(n=5, d=3)
    with pytest.raises(PriorShapeError, match=r"AggregatePosteriorPrior.log_prob expects a context of shape \(4,\)"):
        q.log_prob(z.double(), context=torch.arange(3))


# ---- end to end ----------------------------------------------------------------------------


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override",
    [f"prior={p.stem}" for p in sorted((ROOT / "conf" / "prior").glob("*.yaml"))]
    + ["prior._target_=examples.student_t_prior.StudentTPrior"],
)
def test_trains_one_epoch_through_train_py(override: str, tmp_path: Path) -> None:
    r = _run(
        [
            "train.py",
            override,
            "data=digits",
            "logger=none",
            "trainer.max_epochs=1",
            "trainer.progress=false",
            "vae.latent_dim=4",
            "vae.hidden_dims=[32]",
            "prior.num_layers=2" if "flow" in override else "seed=0",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test ELBO" in r.stdout and (tmp_path / "checkpoints" / "best.pt").exists()


def _contract_suite(prior: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`pytest tests/priors/test_prior_contract.py --prior PRIOR`, on that prior's cases only."""
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/priors/test_prior_contract.py", "--prior", prior]
    return _run([*args, "-k", prior.rpartition(".")[2]], tmp_path, env)


@pytest.mark.slow
def test_contract_suite_runs_on_a_user_prior(tmp_path: Path) -> None:
    r = _contract_suite("examples.student_t_prior.StudentTPrior", tmp_path)
    # pytest exits 0 only when tests ran and none failed (5: none collected, 1: a failure).
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.slow
def test_contract_suite_fails_a_user_prior_whose_log_prob_is_off_by_a_constant(tmp_path: Path) -> None:
    (tmp_path / "off_by_a_constant.py").write_text(
        "from priors.gaussian import GaussianPrior\n\n\n"
        "class OffByAConstant(GaussianPrior):\n"
        "    is_factorized = False  # no per-dimension densities to disagree with\n\n"
        "    def _log_prob(self, z):\n"
        "        return super()._log_prob(z) + 1e-4\n"
    )
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = _contract_suite("off_by_a_constant.OffByAConstant", tmp_path, env)
    assert r.returncode == 1, r.stdout[-3000:]  # 1: tests ran and some failed
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED ")]
    assert failed and all("::test_normalized[" in line for line in failed), r.stdout[-3000:]


def test_small_mixture_float32_agrees_with_float64_for_sharp_components() -> None:
    # The expanded quadratic form cancels large terms: in float32 arithmetic that costs more
    # than 1e-3 nats for sharp components away from the origin; computed in float64 only the
    # final rounding to float32 remains.
    from priors.densities import DiagonalGaussianMixture, diagonal_normal_log_prob

    g = torch.Generator().manual_seed(0)
    mu = (3 * torch.randn(50, 40, generator=g)).double()
    logvar = torch.full((50, 40), -6.0, dtype=F64)
    z = (mu[:20] + 0.05 * torch.randn(20, 40, generator=g, dtype=F64)).float().double()
    log_w = torch.log_softmax(torch.randn(50, generator=g, dtype=F64), -1).float().double()
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


def _brute_force_neighbours(points: torch.Tensor, queries: torch.Tensor, k: int, exclude: torch.Tensor) -> list:
    """Each query's k nearest points by float64 distances, sorted in Python, `exclude[b]` left out."""
    out = []
    for b in range(len(queries)):
        dist = ((points.double() - queries[b].double()) ** 2).sum(-1).tolist()
        order = sorted((d, m) for m, d in enumerate(dist) if m != int(exclude[b]))
        out.append([m for _, m in order[:k]])
    return out


@pytest.mark.parametrize("width", [64, 1000], ids=["chunked", "one chunk per row"])
def test_nearest_neighbours_match_brute_force(width: int) -> None:
    g = torch.Generator().manual_seed(0)
    points = torch.randn(1500, 5, generator=g)  # 1,500 is no multiple of 64: the last chunk is padded
    index = torch.randint(1500, (20,), generator=g)
    queries = points[index] + 0.05 * torch.randn(20, 5, generator=g)
    search = NearestNeighbours(points, width=width)
    got = search.search(queries, 7, exclude=index)
    assert got.tolist() == _brute_force_neighbours(points, queries, 7, index)
    every = NearestNeighbours(points[:300], width=width).of_every_point(4, batch_size=64)
    assert every.tolist() == _brute_force_neighbours(points[:300], points[:300], 4, torch.arange(300))
    with pytest.raises(ValueError, match="k must lie in"):
        search.search(queries, 1500, exclude=index)


def test_exemplar_evaluation_follows_the_variance_and_the_cache() -> None:
    # Evaluation reuses one mixture over the cache: an optimizer step on sigma^2 or a new cache must show.
    p, encoder, train_x = _exemplar("knn", n=9, k=3)
    z = torch.randn(4, 2, dtype=F64)
    means = encoder(train_x)[0].detach()
    with torch.no_grad():
        first = p.log_prob(z)
        p.logvar.add_(0.5)  # what an optimizer step does, in place
        second = p.log_prob(z)
        p.update_encodings(means + 1.0, torch.zeros_like(means))
        third = p.log_prob(z)
    for i in range(4):
        assert abs(second[i].item() - _loop_exemplar(z[i], means, p.logvar, list(range(9)))) < 1e-10
        assert abs(third[i].item() - _loop_exemplar(z[i], means + 1.0, p.logvar, list(range(9)))) < 1e-10
    assert (first - second).abs().max() > 1e-3
