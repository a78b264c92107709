"""priors/flow.py: the flow's density is the change of variables through its transform, its samples invert
the transform, the spline option, and its bad options."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform

from priors.flow import FlowPrior, IdentityAffineTransform
from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from priors.vampprior import VampPrior

F64 = torch.float64


def random_flow(latent_dim: int = 3, seed: int = 0, base=None) -> FlowPrior:
    """A MAF prior in float64 moved away from its near-identity initialization."""
    torch.manual_seed(seed)
    flow = FlowPrior(latent_dim, num_layers=2, hidden_features=8, base=base).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def test_log_prob_is_the_change_of_variables_with_an_autograd_jacobian() -> None:
    flow = random_flow()
    forward = flow.flow._transform  # z -> the base's noise u
    z = torch.randn(4, 3, dtype=F64)
    got = flow.log_prob(z)
    for i in range(4):
        u = forward(z[i : i + 1])[0][0]
        jacobian = torch.autograd.functional.jacobian(lambda v: forward(v[None])[0][0], z[i])
        _, logabsdet = torch.linalg.slogdet(jacobian)
        base = -0.5 * (3 * math.log(2 * math.pi) + u.square().sum())
        assert got[i].item() == pytest.approx((base + logabsdet).item(), abs=1e-10)
    assert flow.log_prob(z.reshape(2, 2, 3)).shape == (2, 2)


def test_samples_are_the_inverse_transform_of_noise_in_the_modules_dtype() -> None:
    flow = random_flow()
    torch.manual_seed(5)
    z = flow.sample(6)
    torch.manual_seed(5)
    noise = torch.randn(6, 3, dtype=F64)
    assert z.dtype == F64
    torch.testing.assert_close(flow.flow._transform(z)[0], noise, rtol=0, atol=1e-9)


def test_a_base_prior_takes_the_standard_normals_place() -> None:
    # The density is the base's at f(z) times |det df/dz| (autograd Jacobian, float64); a
    # standard normal base prior gives the default flow's density exactly.
    flow = random_flow(base=partial(MixturePrior, num_components=3, init_std=1.5))
    assert isinstance(flow.base, MixturePrior) and flow.base.latent_dim == 3
    assert any(p is flow.base.means for p in flow.parameters())  # trained with the flow
    forward = flow.flow._transform
    z = torch.randn(4, 3, dtype=F64)
    got = flow.log_prob(z)
    for i in range(4):
        u = forward(z[i : i + 1])[0]
        jacobian = torch.autograd.functional.jacobian(lambda v: forward(v[None])[0][0], z[i])
        expected = flow.base.log_prob(u)[0] + torch.linalg.slogdet(jacobian)[1]
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-10)
    plain = random_flow()
    normal_base = random_flow(base=GaussianPrior(3))
    torch.testing.assert_close(normal_base.log_prob(z), plain.log_prob(z), rtol=0, atol=1e-12)


def test_samples_over_a_base_invert_the_base_samples() -> None:
    flow = random_flow(base=partial(MixturePrior, num_components=3))
    torch.manual_seed(7)
    z = flow.sample(5)
    torch.manual_seed(7)
    u = flow.base.sample(5)
    torch.testing.assert_close(flow.flow._transform(z)[0], u, rtol=0, atol=1e-9)


def test_a_base_that_needs_the_model_gets_it_through_the_flow() -> None:
    encoder = torch.nn.Linear(6, 4)  # stands in for an encoder: (mu, logvar) halves below
    encode = lambda x: encoder(x).chunk(2, dim=-1)  # noqa: E731
    flow = FlowPrior(
        2,
        num_layers=1,
        hidden_features=4,
        base=partial(VampPrior, num_components=3),
        encoder=encode,
        train_x=torch.rand(10, 6),
    )
    assert isinstance(flow.base, VampPrior) and flow.base.pseudo_inputs.shape == (3, 6)
    assert flow.log_prob(torch.randn(5, 2)).shape == (5,)
    with pytest.raises(ValueError, match=r"base needs the model \(encoder, train_x\).*_partial_: true"):
        FlowPrior(2, base=partial(VampPrior, num_components=3))


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


def test_an_identity_started_maf_is_the_standard_normal_until_it_trains() -> None:
    def deep(init_scale):
        torch.manual_seed(0)
        layer = partial(IdentityAffineTransform, num_blocks=2, init_scale=init_scale)
        return FlowPrior(4, num_layers=10, hidden_features=32, layer=layer)

    z = 3 * torch.randn(64, 4)
    gaussian = GaussianPrior(4).log_prob(z)
    # init_scale=0: every layer is the identity (each scale 1 to float32 rounding).
    torch.testing.assert_close(deep(0.0).log_prob(z), gaussian, rtol=1e-5, atol=0)
    deep = deep(1e-3)  # the default: near it (these z reach |z| ~ 10)
    assert 0 < (deep.log_prob(z) - gaussian).abs().max() < 0.2
    with pytest.raises(ValueError, match="init_scale must be >= 0, got -1"):
        IdentityAffineTransform(features=2, hidden_features=4, init_scale=-1)
    optimizer = torch.optim.Adam(deep.parameters(), lr=1e-2)
    for _ in range(3):  # fit a shifted, squeezed cloud: the flow leaves the identity
        optimizer.zero_grad()
        (-deep.log_prob(0.5 * torch.randn(64, 4) + 1.0).mean()).backward()
        optimizer.step()
    assert (deep.log_prob(z) - GaussianPrior(4).log_prob(z)).abs().max() > 0.1
    # ...and stays an autoregressive flow: its log_prob is the change of variables (autograd Jacobian).
    deep = deep.double()
    forward = deep.flow._transform
    point = torch.randn(4, dtype=F64)
    u = forward(point[None])[0][0]
    _, logabsdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(lambda v: forward(v[None])[0][0], point))
    expected = -0.5 * (4 * math.log(2 * math.pi) + u.square().sum()) + logabsdet
    assert deep.log_prob(point[None]).item() == pytest.approx(expected.item(), abs=1e-10)


def test_flow_bad_options() -> None:
    with pytest.raises(ValueError, match="FlowPrior: num_layers"):
        FlowPrior(2, num_layers=0)
    with pytest.raises(TypeError, match="FlowPrior: layer must be a callable"):
        FlowPrior(2, layer="spline")
    with pytest.raises(ValueError, match="FlowPrior: hidden_features must be a positive integer, got 0"):
        FlowPrior(2, hidden_features=0)
    with pytest.raises(TypeError, match="FlowPrior: layer built a Linear, not an nflows Transform"):
        FlowPrior(2, layer=lambda features, hidden_features: torch.nn.Linear(features, features))
    with pytest.raises(ValueError, match="the base is over 3 dimensions, the flow over 2"):
        FlowPrior(2, base=GaussianPrior(3))
    with pytest.raises(TypeError, match="FlowPrior: base must be a Prior or a callable"):
        FlowPrior(2, base="vampprior")
    with pytest.raises(TypeError, match="FlowPrior: base built a Linear"):
        FlowPrior(2, base=lambda latent_dim: torch.nn.Linear(latent_dim, latent_dim))
