"""priors/vampprior.py: the mixture of the encoder's posteriors at the pseudo-inputs, against a sum over
components and dimensions, and its bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as dist

from priors.vampprior import VampPrior
from vae.networks import MLPEncoder

F64 = torch.float64


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


def test_the_encoder_is_not_part_of_the_priors_state() -> None:
    # The encoder's weights belong to the VAE: a second copy in the prior's state_dict would be loaded twice.
    p = VampPrior(2, tiny_encoder(), torch.rand(10, 5, dtype=F64), num_components=4)
    assert list(p.state_dict()) == ["pseudo_inputs_raw"] and p.pseudo_inputs_raw.dtype == F64
    assert [name for name, _ in p.named_parameters()] == ["pseudo_inputs_raw"]


@pytest.mark.parametrize("k", [0, -3])
def test_nonpositive_k(k: int) -> None:
    with pytest.raises(ValueError, match=rf"VampPrior: num_components \(K\) must be a positive integer, got {k}"):
        VampPrior(2, tiny_encoder(), torch.rand(6, 5, dtype=F64), num_components=k)


def test_vampprior_bad_arguments() -> None:
    with pytest.raises(ValueError, match="VampPrior: init must be one of"):
        VampPrior(2, tiny_encoder(), torch.rand(6, 5, dtype=F64), init="kmeans")
    with pytest.raises(ValueError, match="VampPrior expects train_x of shape"):
        VampPrior(2, tiny_encoder(), torch.rand(5, dtype=F64))
    with pytest.raises(ValueError, match="VampPrior: init='data' needs at least K=7 training points, got 6"):
        VampPrior(2, tiny_encoder(), torch.rand(6, 5, dtype=F64), num_components=7, init="data")
    with pytest.raises(
        ValueError, match=r"VampPrior: the encoder maps pseudo-inputs to mu \(3, 2\).*expected \(3, 4\)"
    ):
        VampPrior(4, tiny_encoder(2), torch.rand(6, 5, dtype=F64), num_components=3)
