"""Experiment loggers: wandb (offline by default) and a no-op one for tests.

Both expose the same small surface, which the trainer and the surgery evaluator use:
`log(metrics, step)`, `summary(metrics)`, `table(name, columns, rows)`,
`image(name, path)` and `finish()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae.validation import ConfigError


def wandb_settings(overrides: Mapping[str, Any] | None = None) -> Any:
    """`wandb.Settings` of `overrides` (`logger.settings`); wandb's defaults for every other key.

    wandb runs two processes beside the run, measured at ~35 MB (`wandb-core`, the service)
    and ~8 MB (`wandb-symon`, the system monitor) in a default run (docs/resources.md):
    `logger.settings.x_disable_stats=true` leaves the monitor out, `logger.settings.console=off`
    stops the capture of stdout/stderr into the run's output.log.

    Raises:
        ConfigError: a key the installed wandb does not know, or a value it refuses.
    """
    import wandb
    from pydantic import ValidationError

    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"logger.settings must be a mapping of wandb.Settings keys, got {overrides!r}")
    values = dict(overrides or {})
    if values.get("console") is False:
        # YAML 1.1 reads an unquoted `off` as false; wandb's name for it is "off".
        values["console"] = "off"
    try:
        return wandb.Settings(**values)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "?"
        raise ConfigError(
            f"logger.settings.{key}: {first['msg']} (wandb {wandb.__version__}; see wandb.Settings)"
        ) from None


class NullLogger:
    """Logs nothing (`logger=none`)."""

    def __init__(self, **_: Any) -> None:
        pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def image(self, name: str, path: str | Path) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """A wandb run saved under `run_dir/wandb`.

    With `mode="offline"` (the default) nothing leaves the machine; upload later with
    `wandb sync <run_dir>/wandb/offline-run-*`. `mode="online"` needs `wandb login`.

    Args:
        run_dir: the Hydra run directory.
        run_config: the resolved config, stored as the run's config.
        project, entity, name, group, tags: as in `wandb.init`. Runs of one `-m` sweep
            share `group` (train.py sets it to the sweep directory when unset).
        mode: "offline", "online" or "disabled".
        settings: `wandb.Settings` keys (`logger.settings`), checked before the run starts:
            an unknown key or a refused value is a `ConfigError` naming it.
    """

    def __init__(
        self,
        run_dir: str | Path,
        run_config: dict[str, Any] | None = None,
        project: str = "priorlab",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str = "offline",
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        import wandb

        if isinstance(run_config, DictConfig):  # hydra.utils.instantiate hands dict kwargs over as DictConfig
            run_config = OmegaConf.to_container(run_config, resolve=True)
        self._wandb = wandb
        self.settings = wandb_settings(settings)
        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            group=group,
            tags=list(tags) if tags else None,
            config=run_config,
            dir=str(run_dir),
            mode=mode,
            settings=self.settings,
            # One run per job, also when several jobs share a process (joblib workers).
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=columns, data=rows)})

    def image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a nonzero `exit_code` marks it failed (train.py passes 1 on an error)."""
        self.run.finish(exit_code=exit_code)
