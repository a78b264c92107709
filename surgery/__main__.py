"""`python -m surgery checkpoint=PATH [split=train] [device=auto] [n_samples=null] [is_samples=5000]`.

Rebuilds the model from the checkpoint's stored config, runs the ELBO surgery, prints
the table and writes surgery.json and the pictures into the checkpoint's run directory
(`<run dir>/checkpoints/best.pt` -> `<run dir>`). Options: conf/surgery_cli.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from surgery.decomposition import SurgeryReport
from surgery.run import SurgeryOptions, check_is_points, run_surgery
from vae import DeviceError, build_model, resolve_device
from vae.cli import one_line_errors
from vae.trainer import load_checkpoint
from vae.trust import check_trusted


# The stored config's nodes that rebuild a model; nothing else in it is instantiated.
MODEL_NODES = ("data", "vae", "prior")


class CheckpointError(ValueError):
    """The checkpoint cannot rebuild a model."""


def load_model(
    checkpoint: str | Path, device: Any = "cpu", allow: Iterable[str] = ()
) -> tuple[Any, Any, DictConfig]:
    """Rebuild (model, data, run config) from a priorlab checkpoint.

    The file is read with `torch.load(weights_only=True)` (via `vae.trainer.load_checkpoint`),
    so it is never unpickled, and its stored config is checked by `vae.trust.check_trusted`
    before anything is instantiated: only priorlab's own classes and dataset factories, nflows
    transforms and torch optimizers, plus the glob patterns in `allow` (`["mypkg.*"]`), may be
    built from it. An untrusted `_target_` raises `UntrustedTargetError` and nothing runs.
    """
    path = Path(checkpoint).expanduser()
    payload = load_checkpoint(path, map_location="cpu")
    config = payload.get("config")
    if not isinstance(config, dict) or not set(MODEL_NODES) <= set(config):
        raise CheckpointError(
            f"{path} holds no run config with data, vae and prior (was it written by priorlab's trainer?)"
        )
    check_trusted({key: config[key] for key in MODEL_NODES}, allow, source=str(path))
    run_cfg = OmegaConf.create(config)
    data = hydra.utils.instantiate(run_cfg.data)
    model = build_model(run_cfg, data)
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the stored weights do not fit the model its config builds: {e}") from e
    return model.to(device), data, run_cfg


#: Keys of conf/surgery_cli.yaml that are the CLI's own, not surgery options.
CLI_KEYS = ("checkpoint", "device", "output_dir", "allow", "logger", "debug")


def surgery_main(cfg: DictConfig) -> tuple[SurgeryReport, dict[str, Path]]:
    """Everything but the printing: check the options, load, decompose, save, log."""
    options = SurgeryOptions.from_config(cfg, ignore=CLI_KEYS)
    device = resolve_device(cfg.device)
    checkpoint = Path(cfg.checkpoint).expanduser()
    model, data, run_cfg = load_model(checkpoint, device, allow=cfg.get("allow") or ())
    check_is_points(options, data)
    out_dir = Path(cfg.output_dir) if cfg.get("output_dir") else checkpoint.resolve().parent.parent
    logger = hydra.utils.instantiate(
        cfg.logger, run_dir=out_dir, run_config=OmegaConf.to_container(cfg, resolve=True), group=cfg.logger.get("group"),
        _recursive_=False,
    )
    try:
        report, files = run_surgery(model, data, options, out_dir, logger=logger, device=device)
    finally:
        logger.finish()
    return report, files


@hydra.main(version_base="1.3", config_path="../conf", config_name="surgery_cli")
def main(cfg: DictConfig) -> None:
    with one_line_errors("surgery", debug=bool(cfg.get("debug"))):
        report, files = surgery_main(cfg)
    print(report.table())
    for path in files.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
