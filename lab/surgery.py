"""`python -m lab.surgery checkpoint=PATH [split=train] [device=auto] [is_samples=5000]`, and the
surgery of a model saved with its side effects: surgery.json, the pictures, the logger's summary.

`run_surgery` is shared with `train.py`; `surgery.decomposition` stays pure. The command
rebuilds the model from the checkpoint's stored config (`lab.checkpoint.load_model`: what a
checkpoint may build, and what it may not choose, is in docs/checkpoints.md), runs the ELBO
surgery, prints the table and writes surgery.json and the pictures into the checkpoint's run
directory (`<run dir>/checkpoints/best.pt` -> `<run dir>`), or into `output_dir`, which a
checkpoint outside a priorlab run directory needs. Options: conf/surgery_cli.yaml.
`python -m surgery` is the same command under its old name.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lab.checkpoint import checkpoint_option, load_model, output_dir_option
from lab.cli import CONF_DIR, one_line_errors
from lab.progress import PassProgress
from lab.run_dir import CONFIG_FILE, write_config
from surgery.decomposition import ImportanceState, SurgeryReport, decompose, encode
from surgery.text import format_table, table_rows
from vae import resolve_device
from vae.data import SPLITS
from vae.files import WriteError, write_atomically
from vae.validation import ConfigError, check_bool, check_choice, check_int

# q(z) beside p(z) for 2-D latents; surgery.report collects these across runs.
DENSITY_PICTURE = "surgery_aggregate_posterior"
# Written by `python -m priors.fit` into the run dir of a prior fitted after training.
FIT_JSON = "fit.json"
#: Seconds between two saves of a log p(x) pass's progress (`PartialLogLikelihood`).
PARTIAL_EVERY_S = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SurgeryOptions:
    """The surgery config group, typed and checked when it is built.

    conf/surgery/default.yaml holds the defaults and describes every field. `from_config`
    refuses unknown keys and bad values with one line, before any training or loading starts.
    """

    enabled: bool
    split: str
    n_samples: int | None
    dimwise_samples: int | None
    is_samples: int | None
    is_points: int | None
    is_split: str
    seed: int
    batch_size: int
    chunk_size: int
    block_size: int
    is_batch_elements: int
    plots: bool
    plot_grid: int

    def __post_init__(self) -> None:
        check_bool("surgery.enabled", self.enabled)
        check_choice("surgery.split", self.split, SPLITS)
        check_choice("surgery.is_split", self.is_split, SPLITS)
        check_int("surgery.n_samples", self.n_samples, 1, allow_none=True)
        check_int("surgery.dimwise_samples", self.dimwise_samples, 1, allow_none=True)
        if self.is_samples is not None and not (isinstance(self.is_samples, int) and self.is_samples > 0):
            raise ConfigError(
                f"surgery.is_samples must be a positive integer, or null to skip log p(x); got {self.is_samples!r}"
            )
        check_int("surgery.is_points", self.is_points, 1, allow_none=True)
        check_int("surgery.seed", self.seed, 0)
        for name in ("batch_size", "chunk_size", "block_size", "is_batch_elements"):
            check_int(f"surgery.{name}", getattr(self, name), 1)
        check_bool("surgery.plots", self.plots)
        check_int("surgery.plot_grid", self.plot_grid, 10)

    @classmethod
    def from_config(cls, node: DictConfig | dict[str, Any], ignore: Iterable[str] = ()) -> SurgeryOptions:
        """Build from a config node; keys in `ignore` belong to someone else (the CLI's own)."""
        values = dict(node.items()) if isinstance(node, dict) else OmegaConf.to_container(node, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - set(ignore))
        if unknown:
            raise ConfigError(
                f"unknown surgery option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def decompose_kwargs(self) -> dict[str, Any]:
        """The arguments of `surgery.decomposition.decompose`, with priorlab's progress report."""
        return {
            "split": self.split,
            "n_samples": self.n_samples,
            "dimwise_samples": self.dimwise_samples,
            "is_samples": self.is_samples,
            "is_points": self.is_points,
            "is_split": self.is_split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "chunk_size": self.chunk_size,
            "block_size": self.block_size,
            "is_batch_elements": self.is_batch_elements,
            "progress": PassProgress,
        }


def check_is_points(options: SurgeryOptions, data: Any) -> None:
    """Refuse `is_points` beyond the size of its split (it would silently use fewer)."""
    if options.is_samples and options.is_points is not None:
        n = len(data.split(options.is_split))
        if options.is_points > n:
            raise ConfigError(
                f"surgery.is_points={options.is_points} but the {options.is_split} split has {n} points; "
                "use at most that, or null for all"
            )


def split_file_name(stem: str, split: str, extension: str) -> str:
    """`<stem>.<extension>` for the training split, `<stem>_<split>.<extension>` for another."""
    return f"{stem}.{extension}" if split == "train" else f"{stem}_{split}.{extension}"


def surgery_json_name(split: str) -> str:
    return split_file_name("surgery", split, "json")


def log_px_name(split: str) -> str:
    """Per-point importance-sampled log p(x) of a split's first points, float64 (numpy .npy)."""
    return f"log_px_{split}.npy"


def partial_log_px_name(split: str) -> str:
    """The progress of a log p(x) pass still running or stopped (`PartialLogLikelihood`)."""
    return f"log_px_{split}.partial.pt"


class PartialLogLikelihood:
    """A log p(x) pass's progress in a file, so that a stopped evaluation continues where it was.

    The importance pass (`surgery.decomposition.importance_log_likelihood`) saves its state
    here at most every `every_s` seconds: the values so far and the random stream after them,
    under a key of everything they depend on (weights, points, K, seed). The next evaluation
    of the same model and points continues from it to the values an unstopped pass returns,
    bit for bit; a state of another key, or a file that does not load, is set aside with a
    warning and the pass starts over. `run_surgery` removes the file once log p(x) is written.
    Loaded with `weights_only=True`: tensors, strings and numbers only, no code.
    """

    def __init__(self, path: str | Path, every_s: float = PARTIAL_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.every_s = float(every_s)
        self.clock = clock
        self.last = clock()

    def load(self, key: str) -> ImportanceState | None:
        if not self.path.exists():
            return None
        try:
            content = torch.load(self.path, map_location="cpu", weights_only=True)
            state = ImportanceState(content["key"], content["values"], content["generator_state"])
            ok = (
                isinstance(state.key, str)
                and isinstance(state.values, torch.Tensor)
                and state.values.dtype == torch.float64
                and state.values.dim() == 1
                and isinstance(state.generator_state, torch.Tensor)
                and state.generator_state.dtype == torch.uint8
            )
        except Exception as e:  # any unreadable file: the pass starts over, it never fails on it
            log.warning(
                "log p(x): %s does not load (%s); the pass starts over", self.path.name, " ".join(str(e).split())
            )
            return None
        if not ok:
            log.warning("log p(x): %s is not a saved pass; the pass starts over", self.path.name)
            return None
        if state.key != key:
            log.warning(
                "log p(x): %s is the progress of another pass (the weights, points, K or seed differ); "
                "the pass starts over",
                self.path.name,
            )
            return None
        log.info("log p(x): continuing from %s, %s points done", self.path.name, f"{state.done:,}")
        return state

    def due(self) -> bool:
        return self.clock() - self.last >= self.every_s

    def save(self, state: ImportanceState) -> None:
        content = {"key": state.key, "values": state.values, "generator_state": state.generator_state}
        try:
            write_atomically(self.path, lambda f: torch.save(content, f))
        except WriteError as e:  # the pass goes on; only its continuation after a stop is lost
            log.warning("log p(x): progress not saved: %s", e)
        self.last = self.clock()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def write_log_px(values: torch.Tensor, path: str | Path) -> Path:
    """Write the per-point log-likelihoods atomically."""
    return write_atomically(path, lambda f: np.save(f, values.double().numpy()))


def write_json(report: SurgeryReport, path: str | Path) -> Path:
    """Write the report atomically (a temporary file, then a rename)."""
    return write_json_dict(report.to_dict(), path)


def write_json_dict(content: dict[str, Any], path: str | Path) -> Path:
    """Write a JSON file atomically."""
    return write_atomically(path, lambda f: f.write((json.dumps(content, indent=2) + "\n").encode()))


def decompose_into(
    model: Any, data: Any, options: SurgeryOptions, out_dir: str | Path, device: torch.device | None = None
) -> tuple[SurgeryReport, dict[str, Path]]:
    """Decompose and write `surgery[_<split>].json` and the per-point log p(x) into `out_dir`.

    The log p(x) pass keeps its progress in `out_dir` (`PartialLogLikelihood`) and continues
    it when run again after a stop; the progress file goes once log p(x) is written.
    `read_surgery` reads the two files back.

    Returns:
        The report and the written files by name ("json", and "log_px" when log p(x) was computed).
    """
    out_dir = Path(out_dir)
    partial = PartialLogLikelihood(out_dir / partial_log_px_name(options.is_split))
    report = decompose(model, data, device=device, is_checkpoint=partial, **options.decompose_kwargs())
    files = {}
    if report.log_likelihood_per_point is not None:
        files["log_px"] = write_log_px(
            report.log_likelihood_per_point, out_dir / log_px_name(report.log_likelihood_split)
        )
    # The report last: its file says the surgery finished (`read_surgery` then finds both).
    files["json"] = write_json(report, out_dir / surgery_json_name(report.split))
    partial.remove()
    return report, files


def read_surgery(out_dir: str | Path, split: str) -> SurgeryReport:
    """The report `decompose_into` wrote for `split` into `out_dir`, with its per-point log p(x)."""
    out_dir = Path(out_dir)
    report = SurgeryReport.from_dict(json.loads((out_dir / surgery_json_name(split)).read_text()))
    if report.log_likelihood_split is not None:
        values = np.load(out_dir / log_px_name(report.log_likelihood_split), allow_pickle=False)
        report.log_likelihood_per_point = torch.from_numpy(values).double()
    return report


def run_surgery(
    model: Any,
    data: Any,
    options: SurgeryOptions,
    out_dir: str | Path,
    logger: Any = None,
    device: torch.device | None = None,
) -> tuple[SurgeryReport, dict[str, Path]]:
    """Decompose, then write `surgery.json` (and the pictures if `options.plots`) into `out_dir` and log them.

    The log p(x) pass keeps its progress in `out_dir` (`PartialLogLikelihood`): run again after
    a stop, the surgery continues that pass instead of starting it over.

    Returns:
        The report and the written files by name ("json", "log_px", "decomposition", "aggregate_posterior").
    """
    out_dir = Path(out_dir)
    report, files = decompose_into(model, data, options, out_dir, device)
    if options.plots:
        from surgery.plots import plot_aggregate_posterior_2d, plot_decomposition

        files["decomposition"] = plot_decomposition(
            report, out_dir / split_file_name("surgery_decomposition", report.split, "png")
        )
        if report.latent_dim == 2:
            mu, logvar = encode(model, data.split(report.split), options.batch_size, device)
            files["aggregate_posterior"] = plot_aggregate_posterior_2d(
                mu,
                logvar,
                model.prior,
                out_dir / split_file_name(DENSITY_PICTURE, report.split, "png"),
                grid=options.plot_grid,
                seed=options.seed,
            )
    if logger is not None:
        logger.summary(report.metrics())
        logger.table("surgery/decomposition", ["term", "nats", "stderr"], table_rows(report))
        for name, path in files.items():
            if path.suffix == ".png":
                logger.image(f"surgery/{name}", path)
    return report, files


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="surgery_cli")
def main(cfg: DictConfig) -> None:
    with one_line_errors("surgery", debug=cfg.get("debug") is True):  # debug=maybe: refused in one line
        report, files = surgery_main(cfg)
    print(format_table(report))
    for path in files.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
