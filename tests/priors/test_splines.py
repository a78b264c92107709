"""priors.splines: the bins-first spline against nflows' (float64), its own derivative, and analytic cases."""

from __future__ import annotations

import math

import pytest
import torch
from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform
from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

from priors.splines import MaskedSplineAutoregressiveTransform, rational_quadratic_spline

K, B = 6, 3.0


def spline_inputs(m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points inside and outside [-B, B], the two bounds exactly, and sharp (`* 3`) spline parameters `[M, 3K - 1]`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(m - 4, generator=g, dtype=torch.float64) * 2.5, torch.tensor([-B, B, -B - 1, B + 7])])
    params = torch.randn(m, 3 * K - 1, generator=g, dtype=torch.float64) * 3
    return x, params


def ours(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = params.T  # bins first
    return rational_quadratic_spline(x, p[:K], p[K : 2 * K], p[2 * K :], B)


def test_the_spline_is_nflows_spline():
    x, params = spline_inputs(5000)
    y, log_det = ours(x, params)
    y_ref, log_det_ref = unconstrained_rational_quadratic_spline(
        x, params[:, :K], params[:, K : 2 * K], params[:, 2 * K :].clone(), tails="linear", tail_bound=B
    )
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, log_det_ref, rtol=0, atol=1e-10)
    outside = x.abs() > B
    assert outside.sum() > 100 and torch.equal(y[outside], x[outside]) and (log_det[outside] == 0).all()


def test_log_det_is_the_log_derivative_of_the_output():
    x, params = spline_inputs(2000, seed=1)
    x = x.requires_grad_()
    y, log_det = ours(x, params)
    (dy_dx,) = torch.autograd.grad(y.sum(), x)  # elementwise: dy_m / dx_m
    assert (dy_dx > 0).all()  # monotone increasing
    torch.testing.assert_close(log_det.detach(), dy_dx.log(), rtol=0, atol=1e-9)


def test_flat_parameters_give_the_identity():
    # equal bins, and inner derivatives min + softplus(u) = 1: y = x everywhere, log |dy/dx| = 0
    m = 101
    x = torch.linspace(-2 * B, 2 * B, m, dtype=torch.float64)
    flat = torch.zeros(K, m, dtype=torch.float64)
    unit = torch.full((K - 1, m), math.log(math.expm1(1 - 1e-3)), dtype=torch.float64)
    y, log_det = rational_quadratic_spline(x, flat, flat, unit, B)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, torch.zeros_like(x), rtol=0, atol=1e-12)


def test_the_spline_maps_the_interval_onto_itself_in_order():
    g = torch.Generator().manual_seed(2)
    params = torch.randn(3 * K - 1, 1, generator=g, dtype=torch.float64).expand(-1, 999) * 3
    x = torch.linspace(-B, B, 999, dtype=torch.float64)
    y, _ = rational_quadratic_spline(x, params[:K], params[K : 2 * K], params[2 * K :], B)
    assert y[0] == -B and y[-1] == B and (y.diff() > 0).all()


def twins(features: int = 5, seed: int = 0):
    """nflows' layer and ours with the same weights, float64."""
    kwargs = {"features": features, "hidden_features": 16, "num_bins": K, "tails": "linear", "tail_bound": B}
    torch.manual_seed(seed)
    reference = MaskedPiecewiseRationalQuadraticAutoregressiveTransform(**kwargs).double()
    layer = MaskedSplineAutoregressiveTransform(**kwargs).double()
    layer.load_state_dict(reference.state_dict())
    with torch.no_grad():  # a trained MADE's last layer is far from nflows' near-zero init: sharpen it
        for net in (reference, layer):
            net.autoregressive_net.final_layer.weight.mul_(10.0)
    return reference, layer


def test_the_layer_is_nflows_layer_forward_gradients_and_inverse():
    reference, layer = twins()
    z = torch.randn(400, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    out_ref, log_det_ref = reference(z)
    out, log_det = layer(z)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, log_det_ref, rtol=0, atol=1e-10)
    assert log_det.std() > 5  # the sharpened splines are far from the identity: the test can fail

    # training: the same gradients for every parameter
    (log_det_ref.sum() + out_ref.square().sum()).backward()
    (log_det.sum() + out.square().sum()).backward()
    for (name, p_ref), p in zip(reference.named_parameters(), layer.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-9, msg=name)

    # sampling goes through nflows' inverse, which undoes this forward (to its own precision,
    # 1.8e-6 here)
    with torch.no_grad():
        back, _ = layer.inverse(out)
    torch.testing.assert_close(back, z, rtol=0, atol=1e-5)


def test_only_linear_tails():
    with pytest.raises(ValueError, match="tails must be 'linear', got None"):
        MaskedSplineAutoregressiveTransform(features=2, hidden_features=4, tails=None)
