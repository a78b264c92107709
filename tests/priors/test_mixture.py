"""priors/mixture.py: the learned Gaussian mixture against torch.distributions, its samples, and its bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as dist

from priors.mixture import MixturePrior

F64 = torch.float64


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


def test_samples_fall_to_each_component_by_its_weight() -> None:
    # Far-apart narrow components: which one a sample came from is plain to see.
    p = MixturePrior(2, num_components=3).double()
    with torch.no_grad():
        p.means.copy_(torch.tensor([[-20.0, 0.0], [0.0, 20.0], [20.0, 0.0]]))
        p.logvars.fill_(-4.0)
        p.logits.copy_(torch.log(torch.tensor([0.2, 0.5, 0.3])))
    torch.manual_seed(0)
    n = 20000
    z = p.sample(n)
    assert z.shape == (n, 2) and z.dtype == F64
    nearest = torch.cdist(z, p.means).argmin(-1)
    for k, w in enumerate([0.2, 0.5, 0.3]):
        share = (nearest == k).double().mean().item()
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n), (k, share)
        spread = (z[nearest == k] - p.means[k]).std(0)
        torch.testing.assert_close(spread, torch.full((2,), math.exp(-2.0), dtype=F64), rtol=0.05, atol=0)


@pytest.mark.parametrize("k", [0, -3, 2.5])
def test_a_number_of_components_that_is_not_a_positive_integer_is_refused(k) -> None:
    with pytest.raises(ValueError, match=rf"MixturePrior: num_components \(K\) must be a positive integer, got {k}"):
        MixturePrior(2, num_components=k)
