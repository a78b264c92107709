"""`python -m surgery.by_size checkpoint=PATH [split=train] [sizes=[...]]`: the surgery against the data set's size.

For each M, the mutual information and the marginal KL of the aggregate posterior of the
first M points of the split (`surgery.decomposition.terms_by_size`). While the posteriors
barely overlap, the mutual information sits at log M and a fixed prior's marginal KL falls
by one nat each time M grows e-fold, in the total correlation: that much of the marginal KL
measures the data set's size, not the prior, and no prior fitted to other points can win it
back on these. Writes `by_size[_<split>].json` and `by_size[_<split>].png` into the
checkpoint's run directory (or `output_dir`, which a checkpoint outside a priorlab run
directory needs) and prints a table. The checkpoint is loaded as `python -m surgery` loads it
(docs/checkpoints.md). Options: conf/by_size.yaml.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from lab.checkpoint import checkpoint_option, load_model, output_dir_option
from lab.cli import CONF_DIR, one_line_errors
from lab.surgery import split_file_name, write_json_dict
from surgery.decomposition import encode, terms_by_size
from vae import resolve_device
from vae.data import SPLITS
from vae.validation import ConfigError, check_bool, check_choice, check_int

#: The terms of each row, each with its standard error.
TERMS = ("mutual_info", "marginal_kl", "avg_kl_mc", "total_correlation", "prior_mismatch_remainder")


def default_sizes(n: int) -> list[int]:
    """100, 300, 1000, 3000, ... below n, then n itself."""
    below = [f * 10**k for k in range(2, 10) for f in (1, 3) if f * 10**k < n]
    return [*below, n]


def by_size_main(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Path]]:
    """Check the options, load, compute, save; return the JSON content and the written files."""
    check_bool("debug", cfg.get("debug", False))
    checkpoint = checkpoint_option(cfg)
    check_choice("split", cfg.split, SPLITS)
    check_int("seed", cfg.seed, 0)
    check_int("batch_size", cfg.batch_size, 1)
    check_int("dimwise_samples", cfg.dimwise_samples, 1, allow_none=True)
    check_bool("plots", cfg.plots)
    device = resolve_device(cfg.device)
    # Where the outputs go is settled before any work: next to the checkpoint only in a run dir of priorlab's.
    out_dir = output_dir_option(checkpoint, cfg.get("output_dir"))
    model, data, _ = load_model(checkpoint, device, allow=cfg.get("allow"), data_path=cfg.get("data_path"))
    x = data.split(cfg.split)
    sizes = default_sizes(len(x)) if cfg.sizes is None else list(OmegaConf.to_container(cfg.sizes))
    if not sizes or any(not isinstance(m, int) or isinstance(m, bool) for m in sizes):
        raise ConfigError(f"sizes must be a list of integers, or null; got {sizes!r}")
    model.eval()
    with torch.inference_mode():
        mu, logvar = encode(model, x, int(cfg.batch_size), device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    terms = terms_by_size(mu, logvar, model.prior, sizes, generator=generator, dimwise_samples=cfg.dimwise_samples)
    rows = []
    for m, t in zip(sizes, terms, strict=True):
        row: dict[str, Any] = {"m": m, "log_m": math.log(m)}
        for name in TERMS:
            estimate = getattr(t, name)
            row[name], row[f"{name}_stderr"] = estimate.value, estimate.stderr
        rows.append(row)
    content = {
        "checkpoint": str(cfg.checkpoint),  # as given: no machine path in committed results
        "split": cfg.split,
        "n_points": len(x),
        "prior": type(model.prior).__name__,
        "prior_factorized": bool(model.prior.is_factorized),
        "latent_dim": model.latent_dim,
        "seed": int(cfg.seed),
        "dimwise_samples": cfg.dimwise_samples,
        "rows": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": write_json_dict(content, out_dir / split_file_name("by_size", cfg.split, "json"))}
    if cfg.plots:
        from surgery.plots import plot_by_size

        files["plot"] = plot_by_size(content, out_dir / split_file_name("by_size", cfg.split, "png"))
    return content, files


def format_by_size(content: dict[str, Any]) -> str:
    """One line per M: log M, MI, marginal KL, total correlation, and the remainder."""
    third = "dim-wise KL" if content["prior_factorized"] else "remainder"
    lines = [
        f"surgery against size on the {content['split']} split (first M of {content['n_points']:,} points, "
        f"prior {content['prior']}, {content['latent_dim']}-D; nats per point)",
        f"  {'M':>8} {'log M':>7} {'MI':>8} {'marginal KL':>12} {'total corr.':>12} {third:>12} {'avg KL':>8}",
    ]
    for r in content["rows"]:
        lines.append(
            f"  {r['m']:>8,} {r['log_m']:>7.3f} {r['mutual_info']:>8.3f} {r['marginal_kl']:>12.3f} "
            f"{r['total_correlation']:>12.3f} {r['prior_mismatch_remainder']:>12.3f} {r['avg_kl_mc']:>8.3f}"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="by_size")
def main(cfg: DictConfig) -> None:
    with one_line_errors("surgery.by_size", debug=cfg.get("debug") is True):  # debug=maybe: refused in one line
        content, files = by_size_main(cfg)
    print(format_by_size(content))
    for path in files.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
