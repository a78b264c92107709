"""The experiment configs (elbo_surgery, prior_zoo), the slurm launcher config and the
wandb comparison keys: fast checks by composition, nothing trains here."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig

from train import run_labels

CONF = Path(__file__).resolve().parents[1] / "conf"
ZOO_PRIORS = ["gaussian", "mixture", "vampprior", "flow", "exemplar", "aggregate"]


def sweep_jobs(cfg: DictConfig, *command_line: str) -> list[dict[str, str]]:
    """The jobs Hydra's basic sweeper launches: `hydra.sweeper.params` then the command line,
    one list of values per key (a later override of a key replaces the earlier one in place:
    the command line wins), and their cartesian product in that order. Parsed with the
    public override parser that Hydra's example sweeper plugin uses."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    values: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([*params, *command_line]):
        values[o.get_key_element()] = (
            list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        )
    return [dict(zip(values, job, strict=True)) for job in itertools.product(*values.values())]


def test_literature_is_the_published_recipe(compose) -> None:
    cfg = compose("experiment=literature", hydra=True)
    assert cfg.vae.encoder._target_ == "vae.networks.GatedMLPEncoder" and list(cfg.vae.hidden_dims) == [300, 300]
    assert cfg.trainer.optimizer._target_ == "vae.optim.AdamNormGrad" and cfg.trainer.optimizer.lr == 5e-4
    t = cfg.trainer
    assert (t.batch_size, t.warmup_epochs, t.patience, t.max_epochs, t.resume) == (100, 100, 50, 2000, True)
    assert cfg.surgery.is_samples == 5000 and cfg.surgery.is_points is None and cfg.surgery.is_split == "test"
    assert cfg.data.byte_divisor == 255  # torchvision's grey levels, as the published code read them
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert {(j["prior"], j["vae.latent_dim"]) for j in sweep_jobs(cfg)} == {("gaussian", "40"), ("vampprior", "40")}


def test_elbo_surgery_is_hoffman_johnson_setting_with_the_recipe(compose) -> None:
    cfg = compose("experiment=elbo_surgery", hydra=True)
    recipe = compose("experiment=literature", hydra=True)
    assert cfg.data._target_ == "vae.data.mnist" and cfg.data.dynamic is True  # dynamically binarized MNIST
    assert cfg.data.byte_divisor == 256  # the file's levels, as every Hoffman & Johnson run here used
    assert cfg.prior._target_ == "priors.gaussian.GaussianPrior"
    assert cfg.surgery.enabled is True and cfg.surgery.split == "train"  # N = 50,000
    assert cfg.trainer == recipe.trainer and cfg.vae == recipe.vae
    assert recipe.data.byte_divisor == 255
    assert cfg.hydra.mode == RunMode.MULTIRUN
    jobs = sweep_jobs(cfg)
    assert [(j["prior"], j["vae.latent_dim"]) for j in jobs] == [
        ("gaussian", "2"),
        ("gaussian", "10"),
        ("gaussian", "20"),
    ]
    assert [j["vae.latent_dim"] for j in sweep_jobs(cfg, "vae.latent_dim=10")] == ["10"]


def test_prior_zoo_is_a_sweep_over_priors_sizes_and_seeds(compose) -> None:
    cfg = compose("experiment=prior_zoo", hydra=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `python train.py experiment=prior_zoo` sweeps, no -m needed
    jobs = sweep_jobs(cfg)
    grid = {(j["prior"], int(j["vae.latent_dim"]), int(j["seed"])) for j in jobs}
    assert len(jobs) == len(grid) == 6 * 4 * 3
    assert {p for p, _, _ in grid} == set(ZOO_PRIORS)
    assert {d for _, d, _ in grid} == {2, 10, 20, 40} and {s for _, _, s in grid} == {0, 1, 2}
    assert cfg.trainer.resume is True and cfg.surgery.split == "train"
    narrowed = sweep_jobs(cfg, "prior=gaussian", "seed=0")
    assert {(j["prior"], j["seed"]) for j in narrowed} == {("gaussian", "0")} and len(narrowed) == 4


def test_every_prior_config_is_in_the_zoo() -> None:
    options = {p.stem for p in (CONF / "prior").glob("*.yaml")}
    zoo = set(ZOO_PRIORS)
    # a variant of a zoo prior (flow_spline for flow) may stay out of the default grid
    missing = {o for o in options - zoo if not any(o.startswith(z + "_") for z in zoo)}
    assert not missing, f"conf/prior options not swept by experiment=prior_zoo: {sorted(missing)}"


@pytest.mark.parametrize("prior", ZOO_PRIORS)
def test_every_zoo_prior_has_a_config(compose, prior: str) -> None:
    cfg = compose(f"prior={prior}")
    assert cfg.prior._target_


def test_slurm_launcher_config(compose) -> None:
    cfg = compose("experiment=prior_zoo", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min > 0
    assert launcher.max_num_timeout > 0  # time-outs re-queue (0, the plugin default, never does)
    assert launcher.signal_delay_s > 0
    assert cfg.trainer.resume is True  # a re-queued job continues from last.pt


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local", "slurm"])
def test_launchers_compose(compose, launcher: str) -> None:
    cfg = compose("experiment=elbo_surgery", f"hydra/launcher={launcher}", hydra=True)
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


def test_run_labels_are_flat_comparison_keys(compose) -> None:
    cfg = compose("vae.latent_dim=7", "seed=3")
    assert run_labels(cfg, choices={"prior": "gaussian"}) == {"prior_name": "gaussian", "latent_dim": 7, "seed": 3}
    # outside Hydra (no choices), the class name stands in for the option name
    assert run_labels(cfg, choices={})["prior_name"] == "GaussianPrior"
