"""The flow prior's rational-quadratic spline layer, its density computed with the bins first.

nflows' `MaskedPiecewiseRationalQuadraticAutoregressiveTransform` keeps a spline's K bins on
the last axis (`[..., K]`). On a CPU that is slow for K = 8: torch's softmax and reductions
vectorize along the axis they reduce, so a softmax over 8 trailing entries ran ~12x slower
than the same softmax over the leading axis, and it took ~40% of the flow's log_prob; the
points inside the tail bound are also picked out by boolean indexing, a copy each time.

`MaskedSplineAutoregressiveTransform` is that nflows layer, with the same MADE and the same
parameters, whose forward pass (z -> noise: the direction of `log_prob`, so of training and
of every evaluation) is `rational_quadratic_spline`: the bins on the first axis, the tails by
`torch.where` on a clamped copy. Its inverse (sampling) is nflows' own. bench/spline_flow.py
measures the two forward passes against each other; tests/priors/test_splines.py checks
this one against nflows' and against the derivative of its own output.

References:
    Durkan, Bekasov, Murray & Papamakarios, "Neural Spline Flows", 2019 (the spline of
    Gregory & Delbourgo 1982, with linear tails outside [-B, B]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from nflows.transforms import MaskedPiecewiseRationalQuadraticAutoregressiveTransform
from nflows.transforms.splines.rational_quadratic import (
    DEFAULT_MIN_BIN_HEIGHT,
    DEFAULT_MIN_BIN_WIDTH,
    DEFAULT_MIN_DERIVATIVE,
)
from torch import Tensor


def _knots(unnormalized: Tensor, bound: float, min_size: float) -> Tensor:
    """`[K + 1, M]` knot positions from -bound to bound: bins of softmax size, each at least `min_size` of the range."""
    k = unnormalized.shape[0]
    size = min_size + (1 - min_size * k) * torch.softmax(unnormalized, dim=0)
    cumulative = torch.cumsum(size, dim=0)
    knots = torch.cat([torch.zeros_like(cumulative[:1]), cumulative]) * (2 * bound) - bound
    # the ends exactly at the bound, whatever the rounding of the sum
    return torch.cat([torch.full_like(knots[:1], -bound), knots[1:-1], torch.full_like(knots[:1], bound)])


def rational_quadratic_spline(
    x: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    tail_bound: float,
    min_bin_width: float = DEFAULT_MIN_BIN_WIDTH,
    min_bin_height: float = DEFAULT_MIN_BIN_HEIGHT,
    min_derivative: float = DEFAULT_MIN_DERIVATIVE,
) -> tuple[Tensor, Tensor]:
    """A monotone rational-quadratic spline on [-B, B], the identity outside, and log |dy/dx|.

    Args:
        x: `[M]` inputs.
        unnormalized_widths, unnormalized_heights: `[K, M]`, bins first: the bins' widths
            and heights are their softmax over the K bins, each at least the minimum.
        unnormalized_derivatives: `[K - 1, M]`: the derivatives at the inner knots are
            `min_derivative + softplus(.)`; at the outer two knots they are 1, so the
            spline meets the identity tails smoothly.
        tail_bound: B.

    Returns:
        y `[M]` and log |dy/dx| `[M]` (0 outside [-B, B]).
    """
    bound = float(tail_bound)
    xs = _knots(unnormalized_widths, bound, min_bin_width)
    ys = _knots(unnormalized_heights, bound, min_bin_height)
    inner = min_derivative + F.softplus(unnormalized_derivatives)
    one = torch.ones_like(inner[:1])
    slopes = torch.cat([one, inner, one])  # [K + 1, M]

    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)  # outside points computed on the edge, then replaced: no inf or nan
    # the bin: how many inner knots lie at or below x
    bin_index = (xc[None] >= xs[1:-1]).sum(dim=0, keepdim=True)  # [1, M], 0..K-1
    x0, x1 = xs.gather(0, bin_index)[0], xs.gather(0, bin_index + 1)[0]
    y0, y1 = ys.gather(0, bin_index)[0], ys.gather(0, bin_index + 1)[0]
    d0, d1 = slopes.gather(0, bin_index)[0], slopes.gather(0, bin_index + 1)[0]

    width, height = x1 - x0, y1 - y0
    s = height / width
    t = (xc - x0) / width
    t_one_minus_t = t * (1 - t)
    denominator = s + (d0 + d1 - 2 * s) * t_one_minus_t
    y = y0 + height * (s * t.square() + d0 * t_one_minus_t) / denominator
    derivative_numerator = s.square() * (d1 * t.square() + 2 * s * t_one_minus_t + d0 * (1 - t).square())
    log_det = torch.log(derivative_numerator) - 2 * torch.log(denominator)
    return torch.where(inside, y, x), torch.where(inside, log_det, torch.zeros_like(log_det))


class MaskedSplineAutoregressiveTransform(MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    """nflows' masked rational-quadratic autoregressive layer with linear tails, its forward pass
    computed bins-first by `rational_quadratic_spline` (the same density); the inverse is nflows'.

    Built like the nflows class (`features`, `hidden_features`, `num_bins`, `tail_bound`,
    `num_blocks`, ...), with `tails="linear"`, the only tails this layer computes.
    """

    def __init__(self, *args: object, tails: str = "linear", **kwargs: object) -> None:
        if tails != "linear":
            raise ValueError(f"MaskedSplineAutoregressiveTransform: tails must be 'linear', got {tails!r}")
        super().__init__(*args, tails=tails, **kwargs)

    def _elementwise_forward(self, inputs: Tensor, autoregressive_params: Tensor) -> tuple[Tensor, Tensor]:
        batch, features = inputs.shape
        k = self.num_bins
        # [B, D * (3K - 1)], each feature's parameters together -> [3K - 1, B * D], bins first
        params = autoregressive_params.reshape(batch * features, 3 * k - 1).T.contiguous()
        widths, heights = params[:k], params[k : 2 * k]
        net = self.autoregressive_net
        if hasattr(net, "hidden_features"):  # as nflows' layer does (its MADE, nflows 0.14, has no such attribute)
            widths, heights = widths / math.sqrt(net.hidden_features), heights / math.sqrt(net.hidden_features)
        y, log_det = rational_quadratic_spline(
            inputs.reshape(-1),
            widths,
            heights,
            params[2 * k :],
            self.tail_bound,
            self.min_bin_width,
            self.min_bin_height,
            self.min_derivative,
        )
        return y.view(batch, features), log_det.view(batch, features).sum(dim=1)
