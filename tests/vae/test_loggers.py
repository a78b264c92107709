"""`vae.loggers`: the no-op logger takes every call the trainer and the surgery make; the wandb
logger writes an offline run under the run directory, with the run's config and what was logged."""

from __future__ import annotations

from pathlib import Path

import pytest

from vae.loggers import NullLogger, WandbLogger


def test_the_null_logger_takes_every_call_and_keeps_nothing(tmp_path: Path) -> None:
    logger = NullLogger(run_dir=tmp_path, run_config={"a": 1}, project="p", mode="offline")
    logger.log({"train/loss": 1.0}, step=1)
    logger.summary({"val_elbo": -90.0})
    logger.table("t", ["term", "nats"], [["elbo", -90.0]])
    logger.image("pictures/samples", tmp_path / "missing.png")
    logger.finish(exit_code=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # wandb starts its service process
def test_the_wandb_logger_writes_an_offline_run_in_the_run_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(run_dir=tmp_path, run_config={"prior": {"_target_": "x.Y"}, "seed": 3}, name="unit")
    for step in (1, 2):
        logger.log({"train/loss": 10.0 / step}, step=step)
    logger.summary({"val_elbo": -90.5})
    assert logger.run.config["seed"] == 3 and logger.run.config["prior"]["_target_"] == "x.Y"
    assert logger.run.summary["val_elbo"] == -90.5
    logger.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))  # the offline run's records, for `wandb sync`
    assert len(records) == 1 and records[0].stat().st_size > 0


@pytest.mark.slow
def test_wandb_settings_pass_keys_through_and_name_a_bad_one() -> None:
    from omegaconf import OmegaConf

    from vae.loggers import wandb_settings
    from vae.validation import ConfigError

    assert wandb_settings(OmegaConf.create({"x_disable_stats": True})).x_disable_stats is True
    assert wandb_settings({"console": False}).console == "off"  # YAML 1.1 reads `off` as false
    assert wandb_settings(None).x_disable_stats is False  # wandb's own default
    with pytest.raises(ConfigError, match=r"logger\.settings\.no_such_key"):
        wandb_settings({"no_such_key": 1})
    with pytest.raises(ConfigError, match="logger.settings must be a mapping"):
        wandb_settings(["console"])
