"""vae/optim.py: AdamNormGrad is Adam on each parameter's gradient divided by its own L2 norm."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vae.optim import AdamNormGrad, load_optimizer_state


def hand_adam_normgrad(
    params: list[list[float]],
    grads: list[list[list[float]]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    norm_eps: float = 1e-7,
    weight_decay: float = 0.0,
) -> list[list[float]]:
    """The update written out in Python floats: per parameter g / (||g|| + norm_eps), then weight decay
    and Adam's bias-corrected moments, for the gradients `grads[step][parameter]`."""
    params = [list(p) for p in params]
    m = [[0.0] * len(p) for p in params]
    v = [[0.0] * len(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            norm = math.sqrt(sum(x * x for x in g))
            for j, x in enumerate(g):
                gj = x / (norm + norm_eps) + weight_decay * params[i][j]
                m[i][j] = betas[0] * m[i][j] + (1 - betas[0]) * gj
                v[i][j] = betas[1] * v[i][j] + (1 - betas[1]) * gj * gj
                m_hat = m[i][j] / (1 - betas[0] ** t)
                v_hat = v[i][j] / (1 - betas[1] ** t)
                params[i][j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return params


@pytest.mark.parametrize("fused", [False, True], ids=["for-loop", "fused"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_three_steps_match_a_hand_computation_in_float64(weight_decay: float, fused: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
    start = [a.detach().flatten().tolist(), b.detach().flatten().tolist()]
    opt = AdamNormGrad([a, b], lr=0.1, betas=(0.8, 0.99), weight_decay=weight_decay, fused=fused)
    grads = []
    for step in range(3):
        scale = 10.0**step  # the raw gradient's size must not matter
        ga = torch.randn(5, generator=g, dtype=torch.float64) * scale
        gb = torch.randn(3, 2, generator=g, dtype=torch.float64) * scale
        grads.append([ga.flatten().tolist(), gb.flatten().tolist()])
        a.grad, b.grad = ga, gb
        opt.step()
    want = hand_adam_normgrad(start, grads, lr=0.1, betas=(0.8, 0.99), weight_decay=weight_decay)
    torch.testing.assert_close(a.detach().flatten(), torch.tensor(want[0], dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(b.detach().flatten(), torch.tensor(want[1], dtype=torch.float64), rtol=0, atol=1e-12)


def test_steps_as_torch_adam_on_the_normalized_gradient() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))
    a_ref, b_ref = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    opt = AdamNormGrad([a, b], lr=0.1)
    ref = torch.optim.Adam([a_ref, b_ref], lr=0.1)
    for step in range(3):
        scale = 10.0**step
        ga, gb = torch.randn(5) * scale, torch.randn(3, 2) * scale
        a.grad, b.grad = ga.clone(), gb.clone()
        a_ref.grad, b_ref.grad = ga / (ga.norm() + 1e-7), gb / (gb.norm() + 1e-7)
        opt.step()
        ref.step()
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)


def test_the_gradient_is_normalized_in_place_and_a_zero_or_missing_one_moves_nothing() -> None:
    a = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    zero = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    untouched = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdamNormGrad([a, zero, untouched], lr=0.5, norm_eps=1e-7)
    a.grad, zero.grad = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8], dtype=torch.float64) * (5 / (5 + 1e-7)))
    # Adam's first step moves each entry by lr in the sign of its gradient (up to eps).
    torch.testing.assert_close(a.detach(), torch.tensor([2.5, 3.5], dtype=torch.float64), rtol=0, atol=1e-6)
    assert zero.detach().tolist() == [1.0, -1.0] and zero.grad.tolist() == [0.0, 0.0]
    assert untouched.item() == 2.0 and untouched.grad is None


def test_a_closure_is_evaluated_and_its_loss_returned() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = AdamNormGrad([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert (w.detach() < torch.tensor([1.0, 2.0])).all()


@pytest.mark.parametrize("norm_eps", [-1.0, float("nan")])
def test_a_negative_or_nan_norm_eps_is_refused(norm_eps: float) -> None:
    with pytest.raises(ValueError, match="AdamNormGrad: norm_eps must be >= 0"):
        AdamNormGrad([torch.nn.Parameter(torch.zeros(1))], norm_eps=norm_eps)


@pytest.mark.parametrize("first, then", [(False, True), (True, False)], ids=["loop->fused", "fused->loop"])
def test_a_loaded_state_keeps_the_optimizers_own_kernel_and_steps_on_alike(first: bool, then: bool) -> None:
    def steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            (params[0].sum(0) * params[1]).pow(2).sum().backward()
            opt.step()

    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = AdamNormGrad(params, lr=0.01, fused=first)
    steps(opt, params, 2)
    saved, midway = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    steps(opt, params, 1)  # straight on, with the first kernel

    resumed = [torch.nn.Parameter(p.clone()) for p in midway]
    other = AdamNormGrad(resumed, lr=0.01, fused=then)
    load_optimizer_state(other, copy.deepcopy(saved))
    assert [bool(g["fused"]) for g in other.param_groups] == [then]  # torch's load_state_dict gives `first`
    steps(other, resumed, 1)
    for a, b in zip(params, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
