"""Optimizers the published VAE recipes use that torch does not ship."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Adam, Optimizer

#: How a torch optimizer runs its update (one fused kernel, batched kernels or a loop over the
#: parameters), not what the update is: the same steps to floating-point rounding.
IMPLEMENTATION_OPTIONS = ("fused", "foreach")


def load_optimizer_state(optimizer: Optimizer, saved: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(saved)`, keeping the optimizer's own `IMPLEMENTATION_OPTIONS`.

    torch's `load_state_dict` restores every option of each parameter group from the saved
    state, so an optimizer built with `fused=True` would go on with the loop its checkpoint was
    written with. The options are set in the saved groups before loading, so that torch places
    each loaded state (Adam's `step` on the parameter's device, for a fused kernel) for the
    kernel that will run.
    """
    chosen = {key: optimizer.defaults[key] for key in IMPLEMENTATION_OPTIONS if key in optimizer.defaults}
    groups = [{**group, **chosen} for group in saved["param_groups"]]
    optimizer.load_state_dict({**saved, "param_groups": groups})


class AdamNormGrad(Adam):
    """Adam on each parameter's gradient divided by its own L2 norm: g / (||g||_2 + norm_eps).

    This is the optimizer of the VampPrior and Exemplar VAE authors' code. Every parameter
    tensor's update direction keeps its shape but loses its scale before Adam's moments
    see it. The division is done in place on `.grad` (the trainer zeroes the gradients
    before every backward pass); everything else is `torch.optim.Adam`, so its options
    (`lr`, `betas`, `eps`, `weight_decay`) work as there.

    Args:
        params: parameters or parameter groups.
        norm_eps: added to each gradient's norm, so a zero gradient stays zero.
        **adam: passed to `torch.optim.Adam`.

    References:
        Tomczak & Welling, "VAE with a VampPrior", 2018 (their released code).
    """

    def __init__(self, params, norm_eps: float = 1e-7, **adam) -> None:
        if not norm_eps >= 0:
            raise ValueError(f"AdamNormGrad: norm_eps must be >= 0, got {norm_eps!r}")
        super().__init__(params, **adam)
        self.norm_eps = norm_eps

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:  # three batched kernels rather than two per parameter (what a GPU step pays for)
            norms = torch._foreach_norm(grads)
            torch._foreach_add_(norms, self.norm_eps)
            torch._foreach_div_(grads, norms)
        super().step()
        return loss
