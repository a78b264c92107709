"""One training step of the published recipe (gated 784-300-300, z = 40, batch 100, Adam on the
normalized gradient) per prior: Adam's update as one fused kernel against torch's loop over the
parameters, and optionally the step compiled.

Each prior's model is built as `python train.py experiment=literature prior=P vae.latent_dim=40`
builds it; the variants start from the same weights, train on the same batch and alternate
round by round, so drift on a shared machine hits them alike. Prints the median milliseconds
a step and each variant's ratio to the loop.

    python bench/recipe_step.py [--priors gaussian flow ...] [--steps 40] [--rounds 3]
                                [--threads 1] [--compile] [--check-compile]

`--check-compile` times nothing: it trains six steps eager and compiled (fused Adam, the
same start, batch and noise) and prints the largest relative difference of their losses.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from vae import build_model  # noqa: E402
from vae.callbacks import TrainingSetEncodings  # noqa: E402
from vae.optim import AdamNormGrad  # noqa: E402
from vae.trainer import batch_loss  # noqa: E402


def make(prior: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["experiment=literature", f"prior={prior}", "vae.latent_dim=40", "hydra.mode=RUN"])
    data = instantiate(cfg.data).with_stream_seed(0)
    torch.manual_seed(0)
    model = build_model(cfg, data)
    # What the trainer does before the first step: the exemplar prior's cached means (a no-op for the others).
    TrainingSetEncodings().refresh(model, data.split("train"), torch.device("cpu"))
    return model.train(), data.train_epoch(0)[:100]


def make_step(model, x, *, fused: bool, compiled: bool, kl_weight: float):
    """A step (loss, backward, update) on a copy of `model` with a fresh optimizer; returns the loss."""
    torch._dynamo.reset()
    model = copy.deepcopy(model)
    opt = AdamNormGrad(model.parameters(), lr=5e-4, fused=fused)
    step_loss = torch.compile(batch_loss, dynamic=False, options={"fallback_random": True}) if compiled else batch_loss
    index, weight = torch.arange(len(x)), torch.tensor(kl_weight)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = step_loss(model, x, index, weight)[0]
        loss.backward()
        opt.step()
        return loss

    return step


def timed(model, x, *, fused: bool, compiled: bool, steps: int) -> float:
    """Milliseconds a step after three warm-up steps."""
    step = make_step(model, x, fused=fused, compiled=compiled, kl_weight=1.0)
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def losses(model, x, *, compiled: bool, steps: int = 6) -> list[float]:
    """The losses of `steps` fused-Adam steps from `model`'s weights, with the same noise every call."""
    step = make_step(model, x, fused=True, compiled=compiled, kl_weight=0.3)
    torch.manual_seed(1)
    return [step().item() for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--priors", nargs="+", default=["gaussian", "mixture", "vampprior", "flow", "flow_spline_vampprior"]
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also the fused step compiled")
    parser.add_argument("--check-compile", action="store_true", help="compare compiled and eager losses instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_compile:
        for prior in args.priors:
            model, x = make(prior)
            eager, compiled = losses(model, x, compiled=False), losses(model, x, compiled=True)
            worst = max(abs(c - e) / abs(e) for c, e in zip(compiled, eager, strict=True))
            print(
                f"{prior}: six steps, eager {eager[0]:.4f} -> {eager[-1]:.4f}, compiled {compiled[0]:.4f} -> "
                f"{compiled[-1]:.4f}; largest relative difference {worst:.1e}"
            )
        return
    variants = {"loop": dict(fused=False, compiled=False), "fused": dict(fused=True, compiled=False)}
    if args.compile:
        variants["fused+compile"] = dict(fused=True, compiled=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds")
    print(
        f"{'prior':<24}"
        + "".join(f"{name + ' ms':>18}" for name in variants)
        + "".join(f"{name + ' / loop':>22}" for name in list(variants)[1:])
    )
    for prior in args.priors:
        model, x = make(prior)
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, options in variants.items():
                times[name].append(timed(model, x, steps=args.steps, **options))
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"{prior:<24}"
            + "".join(f"{med[n]:18.1f}" for n in variants)
            + "".join(f"{med[n] / med['loop']:22.2f}" for n in list(variants)[1:])
        )


if __name__ == "__main__":
    main()
