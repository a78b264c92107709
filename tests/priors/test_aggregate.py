"""priors/aggregate.py: the aggregate posterior q(z) of the training set against a double loop, leaving each
point out, and its errors before it has encodings."""

from __future__ import annotations

import math

import pytest
import torch

from priors.aggregate import AggregatePosteriorPrior
from priors.base import PriorShapeError
from vae.networks import MLPEncoder

F64 = torch.float64


def tiny_encoder(latent_dim: int = 2, data_dim: int = 5) -> MLPEncoder:
    torch.manual_seed(0)
    return MLPEncoder(data_dim, latent_dim, [7]).double()


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


def test_encodings_of_the_wrong_size_and_a_context_of_the_wrong_shape_are_named() -> None:
    encoder = tiny_encoder(2)
    with pytest.raises(ValueError, match=r"AggregatePosteriorPrior: needs encodings mu, logvar of shape \[N, 4\]"):
        AggregatePosteriorPrior(4).update_encodings(*encoder(torch.rand(6, 5, dtype=F64)))
    q, _, _ = _aggregate(n=5, d=3)
    with pytest.raises(PriorShapeError, match=r"AggregatePosteriorPrior.log_prob expects a context of shape \(4,\)"):
        q.log_prob(torch.randn(4, 3, dtype=F64), context=torch.arange(3))
