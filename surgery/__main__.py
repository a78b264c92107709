"""`python -m surgery checkpoint=PATH [split=train] [device=auto] [n_samples=null] [is_samples=5000]`.

Rebuilds the model from the checkpoint's stored config (`vae.checkpoint.load_model`: what a
checkpoint may build, and what it may not choose, is in docs/checkpoints.md), runs the ELBO
surgery, prints the table and writes surgery.json and the pictures into the checkpoint's run
directory (`<run dir>/checkpoints/best.pt` -> `<run dir>`), or into `output_dir`, which a
checkpoint outside a priorlab run directory needs. Options: conf/surgery_cli.yaml.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from surgery.decomposition import SurgeryReport
from surgery.run import SurgeryOptions, check_is_points, run_surgery
from surgery.text import format_table
from vae import resolve_device
from vae.checkpoint import checkpoint_option, load_model, output_dir_option
from vae.cli import one_line_errors
from vae.run_dir import CONFIG_FILE, write_config
from vae.validation import check_bool

#: Keys of conf/surgery_cli.yaml that are the CLI's own, not surgery options.
CLI_KEYS = ("checkpoint", "device", "output_dir", "data_path", "allow", "logger", "debug")


def surgery_main(cfg: DictConfig) -> tuple[SurgeryReport, dict[str, Path]]:
    """Everything but the printing: check the options, load, decompose, save, log."""
    check_bool("debug", cfg.get("debug", False))
    checkpoint = checkpoint_option(cfg)
    options = SurgeryOptions.from_config(cfg, ignore=CLI_KEYS)
    device = resolve_device(cfg.device)
    # Where the outputs go is settled before any work: next to the checkpoint only in a run dir of priorlab's.
    out_dir = output_dir_option(checkpoint, cfg.get("output_dir"))
    model, data, run_cfg = load_model(checkpoint, device, allow=cfg.get("allow"), data_path=cfg.get("data_path"))
    check_is_points(options, data)
    if not (out_dir / CONFIG_FILE).exists():
        # An output directory of its own: the checkpoint's config makes it a run dir that
        # `python -m surgery.report` reads (a checkpoint evaluated apart from its run).
        write_config(out_dir, run_cfg)
    logger = hydra.utils.instantiate(
        cfg.logger,
        run_dir=out_dir,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        group=cfg.logger.get("group"),
        _recursive_=False,
    )
    try:
        report, files = run_surgery(model, data, options, out_dir, logger=logger, device=device)
    finally:
        logger.finish()
    return report, files


@hydra.main(version_base="1.3", config_path="../conf", config_name="surgery_cli")
def main(cfg: DictConfig) -> None:
    with one_line_errors("surgery", debug=cfg.get("debug") is True):  # debug=maybe: refused in one line
        report, files = surgery_main(cfg)
    print(format_table(report))
    for path in files.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
