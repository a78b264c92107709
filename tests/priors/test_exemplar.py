"""priors/exemplar.py: the exemplar prior's four ways of choosing exemplars against double loops, its cache,
the nearest-neighbour search against brute force, and its bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from priors.exemplar import ExemplarPrior, NearestNeighbours
from vae.networks import MLPEncoder

F64 = torch.float64


def tiny_encoder(latent_dim: int = 2, data_dim: int = 5) -> MLPEncoder:
    torch.manual_seed(0)
    return MLPEncoder(data_dim, latent_dim, [7]).double()


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


def _leave_one_out_matches_the_loop(p, z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Training-mode log p(z_i) at 5 points of the prior over 8 exemplars, each point leaving its
    own out, against the double loop over `means`; returns them (for a backward pass)."""
    index = torch.tensor([0, 7, 3, 3, 1])
    p.train()
    loo = p.log_prob(z, context=index)
    for i in range(5):
        others = [m for m in range(8) if m != int(index[i])]
        assert abs(loo[i].item() - _loop_exemplar(z[i], means, p.logvar, others)) < 1e-10
    return loo


@pytest.mark.parametrize("variance", ["scalar", "per_dim"])
def test_exemplar_all_matches_double_loop_with_leave_one_out_and_gradients(variance: str) -> None:
    p, encoder, train_x = _exemplar("all", variance=variance)
    if variance == "per_dim":
        with torch.no_grad():
            p.logvar.copy_(torch.tensor([-0.3, 0.4]))
    means = encoder(train_x)[0].detach()
    z = torch.randn(5, 2, dtype=F64)
    loo = _leave_one_out_matches_the_loop(p, z, means)
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
        # normalized by k, not N - 1: log((N - 1) / k) above the neighbours' share of the
        # leave-one-out sum, which is at most that sum (docs/priors.md)
        others = [m for m in range(9) if m != n]
        assert got[i].item() - math.log(8 / 3) <= _loop_exemplar(z[i], means, p.logvar, others) + 1e-12


def test_exemplar_random_knn_takes_the_nearest_of_the_random_subset_normalized_as_random() -> None:
    p, encoder, train_x = _exemplar("random_knn", n=9, num_exemplars=5, k=2)
    means = encoder(train_x)[0].detach()
    z = torch.randn(9, 2, dtype=F64)
    index = torch.arange(9)  # some points in the subset drawn, some not
    p.train()
    torch.manual_seed(3)
    got = p.log_prob(z, context=index)
    torch.manual_seed(3)
    chosen = torch.randperm(9)[:5].tolist()  # the subset the prior drew
    assert any(i in chosen for i in range(9)) and any(i not in chosen for i in range(9))
    for i in range(9):
        members = [m for m in chosen if m != i]
        by_distance = sorted((float((means[m] - means[i]).square().sum()), m) for m in members)
        nearest = [m for _, m in by_distance[:2]]
        want = _loop_exemplar(z[i], means, p.logvar, nearest) + math.log(2 / len(members))
        assert abs(got[i].item() - want) < 1e-10
        # the neighbours' share of what `random` sums: at most `random`'s value
        assert got[i].item() <= _loop_exemplar(z[i], means, p.logvar, members) + 1e-12
    got.sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in encoder.parameters())
    assert p.logvar.grad is not None and p.logvar.grad.abs().sum() > 0


def test_exemplar_random_knn_with_every_other_member_is_random() -> None:
    # k = |S| - 1: a point drawn into S sums the same exemplars as `random` does, on the same draw
    knn, _, _ = _exemplar("random_knn", n=9, num_exemplars=5, k=4)
    rand, _, _ = _exemplar("random", n=9, num_exemplars=5)
    z, index = torch.randn(9, 2, dtype=F64), torch.arange(9)
    knn.train(), rand.train()
    torch.manual_seed(5)
    a = knn.log_prob(z, context=index)
    torch.manual_seed(5)
    b = rand.log_prob(z, context=index)
    torch.manual_seed(5)
    drawn = torch.randperm(9)[:5]
    assert torch.allclose(a[drawn], b[drawn], atol=1e-12, rtol=0)


def test_exemplar_without_gradient_uses_the_stale_cache_and_leaves_the_encoder_alone() -> None:
    p, encoder, train_x = _exemplar("all", gradient=False)
    stale = encoder(train_x)[0].detach()  # the cache the fixture filled
    with torch.no_grad():  # the encoder moves on after the cache was filled
        for q in encoder.parameters():
            q.add_(0.5)
    z = torch.randn(5, 2, dtype=F64)
    loo = _leave_one_out_matches_the_loop(p, z, stale)
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


def test_exemplar_bad_arguments() -> None:
    encoder, x = tiny_encoder(), torch.rand(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="exemplars must be one of"):
        ExemplarPrior(2, encoder, x, exemplars="some")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\]"):
        ExemplarPrior(2, encoder, x, k=6)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        ExemplarPrior(2, encoder, x, exemplars="random_knn", num_exemplars=4, k=4)
    with pytest.raises(ValueError, match=r"num_exemplars must be an integer in \[1, 6\]"):
        ExemplarPrior(2, encoder, x, exemplars="random_knn", num_exemplars=7, k=2)
    with pytest.raises(RuntimeError, match="no cached exemplar means yet"):
        ExemplarPrior(2, encoder, x, k=2).log_prob(torch.zeros(3, 2))


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
    # -1 leaves nothing out, not the last point (128 points: no padding after it)
    full, near_last, none = points[:128], points[120:128] + 0.01, torch.full((8,), -1)
    got = NearestNeighbours(full, width=width).search(near_last, 7, exclude=none).tolist()
    assert got == _brute_force_neighbours(full, near_last, 7, none) and 127 in got[-1]
