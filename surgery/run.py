"""Run the surgery on a model and save it: surgery.json, the pictures, the logger's summary and table.

Shared by `python -m surgery` and `train.py`. This is the part with side effects;
`surgery.decomposition` stays pure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from surgery.decomposition import SurgeryReport, decompose, encode

# q(z) beside p(z) for 2-D latents; surgery.report collects these across runs.
DENSITY_PICTURE = "surgery_aggregate_posterior"

DECOMPOSE_KEYS = (
    "split", "n_samples", "dimwise_samples", "is_samples", "is_points", "is_split", "seed",
    "batch_size", "chunk_size", "block_size", "is_batch_elements",
)


def decompose_kwargs(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The `decompose` arguments held in a surgery config node (conf/surgery/default.yaml)."""
    return {k: cfg[k] for k in DECOMPOSE_KEYS if k in cfg}


def surgery_json_name(split: str) -> str:
    return "surgery.json" if split == "train" else f"surgery_{split}.json"


def log_px_name(split: str) -> str:
    """Per-point importance-sampled log p(x) of a split's first points, float64 (numpy .npy)."""
    return f"log_px_{split}.npy"


def write_log_px(values: torch.Tensor, path: str | Path) -> Path:
    """Write the per-point log-likelihoods atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, values.double().numpy())
    os.replace(tmp, path)
    return path


def write_json(report: SurgeryReport, path: str | Path) -> Path:
    """Write the report atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def run_surgery(
    model: Any,
    data: Any,
    cfg: DictConfig | dict[str, Any],
    out_dir: str | Path,
    logger: Any = None,
    device: torch.device | None = None,
) -> tuple[SurgeryReport, dict[str, Path]]:
    """Decompose, then write `surgery.json` (and the pictures if `cfg.plots`) into `out_dir` and log them.

    Returns:
        The report and the written files by name ("json", "log_px", "decomposition", "aggregate_posterior").
    """
    out_dir = Path(out_dir)
    report = decompose(model, data, device=device, **decompose_kwargs(cfg))
    files = {"json": write_json(report, out_dir / surgery_json_name(report.split))}
    if report.log_likelihood_per_point is not None:
        files["log_px"] = write_log_px(report.log_likelihood_per_point, out_dir / log_px_name(report.log_likelihood_split))
    if cfg.get("plots", True):
        from surgery.plots import plot_aggregate_posterior_2d, plot_decomposition

        suffix = "" if report.split == "train" else f"_{report.split}"
        files["decomposition"] = plot_decomposition(report, out_dir / f"surgery_decomposition{suffix}.png")
        if report.latent_dim == 2:
            mu, logvar = encode(model, data.split(report.split), cfg.get("batch_size", 1000), device)
            files["aggregate_posterior"] = plot_aggregate_posterior_2d(
                mu, logvar, model.prior, out_dir / f"{DENSITY_PICTURE}{suffix}.png",
                grid=int(cfg.get("plot_grid", 120)), seed=int(cfg.get("seed", 0)),
            )
    if logger is not None:
        logger.summary(report.metrics())
        logger.table("surgery/decomposition", ["term", "nats", "stderr"], report.rows())
        for name, path in files.items():
            if path.suffix == ".png":
                logger.image(f"surgery/{name}", path)
    return report, files
