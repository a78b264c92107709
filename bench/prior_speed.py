"""Seconds per training epoch of each prior through the real Trainer, and the ratio to the Gaussian.

    python bench/prior_speed.py                                   # all six, full epochs
    python bench/prior_speed.py --max-steps 50                    # partial epochs, extrapolated
    python bench/prior_speed.py --priors gaussian aggregate --max-steps 20
    python bench/prior_speed.py --priors gaussian exemplar aggregate --repeats 3   # median of 3 rounds

Binarized MNIST (50,000 training points), z = 40, batch 100, the 784-300-300 MLP VAE
(`conf/vae/mlp.yaml`), CPU unless --device says otherwise. Each prior gets a fresh
model and one `Trainer.fit` of `--epochs` epochs (or `--max-steps` optimizer steps).
An epoch's time is its binarization + its training steps + the trainer's epoch-end
callback (`vae.callbacks.TrainingSetEncodings`: one encoding pass of the 50,000 training
points, for the aggregate and exemplar priors) + the validation pass. With --max-steps the
training steps' time is scaled to a full epoch (500 steps) and the binarization, callback
and validation are counted once, each measured on its own; the output says when it extrapolated
(work a prior does once per epoch inside its first step, such as the exemplar prior's
neighbour table, is then scaled up with the steps: time full epochs for that prior).
Ratios are to the Gaussian prior measured in the same run (so always include it). With
--repeats R every prior is timed once per round, R rounds in turn, and each ratio is the
median of the R rounds' ratios (a shared machine's noise moves single rounds by 10% or more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from vae import build_model  # noqa: E402
from vae.callbacks import TrainingSetEncodings  # noqa: E402
from vae.trainer import evaluate  # noqa: E402

TARGETS = {"mixture": 1.5, "flow": 2.5, "vampprior": 4.0, "exemplar": 4.0, "aggregate": 8.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--priors", nargs="+", default=["gaussian", "mixture", "flow", "vampprior", "exemplar", "aggregate"]
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="rounds; ratios are the median over rounds")
    parser.add_argument("--max-steps", type=int, default=None, help="time this many steps and extrapolate to an epoch")
    parser.add_argument("--data", default="binarized_mnist")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. prior.num_components=100")
    args = parser.parse_args()
    if "gaussian" not in args.priors:
        args.priors.insert(0, "gaussian")

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        base = [
            "logger=none",
            f"data={args.data}",
            "vae.latent_dim=40",
            "vae.hidden_dims=[300,300]",
            "trainer.batch_size=100",
            "trainer.progress=false",
            f"trainer.max_epochs={args.epochs}",
            f"trainer.max_steps={args.max_steps if args.max_steps else 'null'}",
            f"device={args.device}",
        ]
        cfgs = {p: compose("train", overrides=[*base, f"prior={p}", *args.overrides]) for p in args.priors}
    data = hydra.utils.instantiate(cfgs["gaussian"].data)
    n_train = len(data.grey["train"])
    steps_per_epoch = -(-n_train // 100)
    print(
        f"{args.data}: N={n_train}, z=40, batch 100, MLP 300-300, torch threads={torch.get_num_threads()}, "
        f"device={args.device}"
    )
    if args.max_steps:
        print(
            f"partial epochs: {args.max_steps} training steps timed and scaled to {steps_per_epoch} per epoch "
            f"(binarization, epoch-end callback and validation counted once, measured separately)"
        )

    # Untimed warm-up: the first fit in a process pays for thread pools and allocator growth.
    warm = build_model(cfgs["gaussian"], data)
    with tempfile.TemporaryDirectory() as run_dir:
        hydra.utils.instantiate(
            cfgs["gaussian"].trainer, run_dir=run_dir, device=torch.device(args.device), max_steps=3, max_epochs=1
        ).fit(warm, data)

    rounds = [{} for _ in range(args.repeats)]
    for results in rounds:
        for name, cfg in cfgs.items():
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, data)
            with tempfile.TemporaryDirectory() as run_dir:
                trainer = hydra.utils.instantiate(cfg.trainer, run_dir=run_dir, device=torch.device(args.device))
                trainer.fit(model, data)
                records = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
            # The binarization, the epoch-end callback and the validation pass, timed on their own
            # (a complete epoch's record holds them; a partial one holds the binarization and validation).
            t0 = time.perf_counter()
            data.train_epoch(0)
            binarize = time.perf_counter() - t0
            t0 = time.perf_counter()
            TrainingSetEncodings(trainer.eval_batch_size).refresh(model, data.split("train"), torch.device(args.device))
            hook = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluate(model, data.split("val"), trainer.eval_batch_size)
            val = time.perf_counter() - t0
            per_epoch, prev_step = [], 0
            for r in records:
                steps, prev_step = r["step"] - prev_step, r["step"]
                fixed = binarize + val + (hook if r["complete_epoch"] else 0.0)
                train_time = max(r["seconds"] - fixed, 0.0)
                per_epoch.append(binarize + hook + val + train_time * steps_per_epoch / steps)
            results[name] = sum(per_epoch) / len(per_epoch)
            print(
                f"  {name:10s} {results[name]:8.1f} s/epoch   (binarization {binarize:.1f} s, epoch-end callback "
                f"{hook:.1f} s, validation {val:.1f} s)",
                flush=True,
            )

    ratios = {name: [r[name] / r["gaussian"] for r in rounds] for name in cfgs}
    median = {name: statistics.median(values) for name, values in ratios.items()}
    heading = "ratio to the Gaussian prior (same run)"
    if args.repeats > 1:
        heading = f"ratio to the Gaussian prior, median of {args.repeats} rounds (each round's ratio in brackets)"
    print(f"\n{heading}:")
    for name in cfgs:
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  target <= {target}x: {'met' if median[name] <= target else 'NOT met'}"
        each = "" if args.repeats == 1 else "  (" + ", ".join(f"{v:.2f}" for v in ratios[name]) + ")"
        print(f"  {name:10s} {median[name]:6.2f}x{each}{verdict}")


if __name__ == "__main__":
    main()
