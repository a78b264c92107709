"""`python -m lab.export RUN_DIR [--to DEST] [--prune]`: keep what a finished run's result needs.

Writes `checkpoints/model.pt`, a weights-only file made from the run's `best.pt`: the model's
state and the config that rebuilds it, no optimizer or RNG state (about a third of the
training checkpoint's size). It loads wherever a checkpoint does (`python -m surgery
checkpoint=.../model.pt`), but cannot resume training.

* `--to DEST` copies the run's results (metrics, surgery, pictures, log, `.hydra/`; not its
  `.pt` files, lock or wandb folder) into DEST first, and exports there: how a run trained
  outside the work tree (`../runs/...`) enters `results/`. The copy of `.hydra/hydra.yaml`
  leaves out the machine's paths, as train.py now writes it (`lab.run_dir.MACHINE_KEYS`).
* `--prune` then deletes the training checkpoints (`best.pt`, `last.pt`) where the export
  was written.

When the export lies inside the repository, its line is written into the manifest
(`lab.manifest`), replacing the lines of any training checkpoint it pruned; `*.pt` is
ignored by git, so the command prints the `git add -f` that commits the file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from lab import manifest
from lab.run_dir import HYDRA_FILE, write_hydra_record
from vae.checkpoint import load_checkpoint
from vae.files import write_atomically

ROOT = manifest.ROOT
WEIGHTS_NAME = "model.pt"
TRAINING_NAMES = ("best.pt", "last.pt")
#: Not copied by `--to`: the training checkpoints, the run's lock and wandb's local files.
NOT_COPIED = ("checkpoints", ".lock", "wandb")


class ExportError(ValueError):
    """The run cannot be exported."""


def weights_only(payload: dict[str, Any]) -> dict[str, Any]:
    """The weights-only form of a training checkpoint's payload (same format, no optimizer or RNG)."""
    for name, tensor in payload["model"].items():
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            raise ExportError(f"the checkpoint's weight {name} is not finite; nothing to export")
    return {
        "format": payload["format"],
        "model": payload["model"],
        "optimizer": None,
        "state": payload.get("state"),  # where training stood (best epoch and its validation ELBO): a few numbers
        "rng_cpu": None,
        "rng_cuda": None,
        "config": payload["config"],
    }


def copy_results(run_dir: Path, dest: Path) -> None:
    """Copy everything of `run_dir` but `NOT_COPIED` into `dest`; Hydra's record without the machine's paths."""
    shutil.copytree(
        run_dir, dest, dirs_exist_ok=True, ignore=lambda folder, _: NOT_COPIED if folder == str(run_dir) else ()
    )
    if (dest / HYDRA_FILE).is_file():
        write_hydra_record(dest, OmegaConf.load(dest / HYDRA_FILE))


def export(run_dir: Path, dest: Path | None = None, prune: bool = False, root: Path = ROOT) -> Path:
    """Export `run_dir`'s best checkpoint as weights only; return the written file.

    Args:
        run_dir: a run directory holding `checkpoints/best.pt`.
        dest: copy the results there first and export there (default: in place).
        prune: delete the training checkpoints where the export was written.
        root: the repository whose manifest lists exports inside it.
    """
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        raise ExportError(f"{best} does not exist: export a run directory with checkpoints/best.pt")
    payload = weights_only(load_checkpoint(best))
    out_dir = run_dir
    if dest is not None:
        copy_results(run_dir, dest)
        out_dir = dest
    target = out_dir / "checkpoints" / WEIGHTS_NAME
    write_atomically(target, lambda f: torch.save(payload, f))
    reloaded = load_checkpoint(target)["model"]
    if reloaded.keys() != payload["model"].keys() or any(
        not torch.equal(reloaded[k], payload["model"][k]) for k in reloaded
    ):
        raise ExportError(f"{target} does not read back as written")
    pruned = []
    if prune:
        for name in TRAINING_NAMES:
            path = out_dir / "checkpoints" / name
            if path.exists():
                path.unlink()
                pruned.append(path)
    if target.resolve().is_relative_to(root.resolve()):
        entry = manifest.describe(target, root, "weights")
        drop = tuple(p.resolve().relative_to(root.resolve()).as_posix() for p in pruned)
        manifest.write(root, manifest.upsert(root, entry, drop))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding checkpoints/best.pt")
    parser.add_argument("--to", type=Path, default=None, help="copy the run's results there and export there")
    parser.add_argument("--prune", action="store_true", help="delete best.pt and last.pt once exported")
    args = parser.parse_args(argv)
    try:
        target = export(args.run_dir, args.to, args.prune)
    except (ExportError, ValueError, OSError) as e:
        print(f"lab.export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB)")
    if target.resolve().is_relative_to(ROOT.resolve()):
        print(f"git add -f {target} {manifest.MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
