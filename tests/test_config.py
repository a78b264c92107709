"""Every option of every config group composes and instantiates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf

from priors.base import Prior
from vae import DeviceError, build_model, resolve_device
from vae.data import digits
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _leaves(node: DictConfig, prefix: str = "") -> dict[str, Any]:
    """The values a config file sets itself, by dotted key: not its defaults list, hydra settings or interpolations."""
    out: dict[str, Any] = {}
    for key in node:
        if key in ("defaults", "hydra") or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return out


def _experiment_settings(name: str) -> dict[str, Any]:
    """What conf/experiment/<name>.yaml sets, read from the files: the options and experiments its
    defaults list picks, then its own values over them (its `_self_` comes last)."""
    node = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    settings: dict[str, Any] = {}
    for item in node.get("defaults", []):
        if isinstance(item, str):
            if item != "_self_":
                settings |= _experiment_settings(item)
            continue
        for key, option in item.items():  # override /group: option
            group = key.removeprefix("override").strip().strip("/")
            picked = _leaves(OmegaConf.load(CONF / group / f"{option}.yaml"))
            settings |= {f"{group.replace('/', '.')}.{k}": v for k, v in picked.items()}
    return settings | _leaves(node)


def test_train_yaml_defaults(compose) -> None:
    cfg = compose()
    assert cfg.seed == 0 and cfg.device == "auto"
    assert cfg.data._target_ == "vae.data.mnist" and cfg.data.dynamic is True
    assert cfg.prior._target_ == "priors.gaussian.GaussianPrior"
    assert cfg.logger._target_ == "vae.loggers.WandbLogger" and cfg.logger.mode == "offline"
    assert cfg.trainer.optimizer._partial_ is True


@pytest.mark.parametrize("option", _options("prior"))
def test_every_prior_option_builds_a_model(compose, option: str) -> None:
    cfg = compose(f"prior={option}", "data=digits", "vae.latent_dim=3", "vae.hidden_dims=[16]")
    model = build_model(cfg, digits())
    assert isinstance(model.prior, Prior) and _class_path(model.prior) == cfg.prior._target_
    assert model.prior.latent_dim == 3


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_option_composes(compose, option: str) -> None:
    cfg = compose(f"data={option}")
    assert cfg.data._target_ in {"vae.data.mnist", "vae.data.digits", "vae.data.npz"}
    if option == "digits":
        assert hydra.utils.instantiate(cfg.data).data_dim == 64
    elif option == "npz":
        assert cfg.data.binarize == "dynamic"  # built in tests/vae/test_data.py, from a generated file
    else:
        assert cfg.data.dynamic is (option != "binarized_mnist_static")
        assert cfg.data.byte_divisor == (255 if option == "binarized_mnist_torchvision" else 256)


@pytest.mark.parametrize("option", _options("trainer"))
def test_every_trainer_option_instantiates(compose, option: str, tmp_path) -> None:
    cfg = compose(f"trainer={option}")
    trainer = hydra.utils.instantiate(cfg.trainer, run_dir=tmp_path, device="cpu")
    assert trainer.optimizer.func.__name__ == "Adam"


@pytest.mark.parametrize("option", _options("trainer/optimizer"))
def test_each_optimizer_takes_the_fused_kernel_unless_told_not_to(compose, option: str) -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = hydra.utils.instantiate(compose(f"trainer/optimizer={option}").trainer.optimizer)
    assert optimizer(params).defaults["fused"] is True
    loop = hydra.utils.instantiate(
        compose(f"trainer/optimizer={option}", "trainer.optimizer.fused=false").trainer.optimizer
    )
    assert not loop(params).defaults["fused"]


@pytest.mark.parametrize(
    "option",
    # wandb starts its service process, even offline
    [pytest.param(o, marks=pytest.mark.slow) if o == "wandb" else o for o in _options("logger")],
)
def test_every_logger_option_instantiates(compose, option: str, tmp_path) -> None:
    cfg = compose(f"logger={option}")
    logger = hydra.utils.instantiate(cfg.logger, run_dir=tmp_path, run_config={"a": 1}, _recursive_=False)
    assert _class_path(logger) == cfg.logger._target_
    logger.log({"x": 1.0}, step=1)
    if option == "wandb":
        assert logger.run.offline and logger.run.config["a"] == 1
    logger.finish()
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == (1 if option == "wandb" else 0), runs


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_composes_with_the_values_it_sets(compose, option: str) -> None:
    cfg = compose(f"experiment={option}")
    expected = _experiment_settings(option)
    got = {key: OmegaConf.select(cfg, key, default="<missing>") for key in expected}
    got = {k: OmegaConf.to_container(v) if isinstance(v, ListConfig) else v for k, v in got.items()}
    assert got == expected


@pytest.mark.parametrize("option", _options("vae"))
def test_every_vae_option_builds(compose, option: str) -> None:
    cfg = compose(f"vae={option}", "data=digits", "vae.latent_dim=3")
    model = build_model(cfg, digits())
    mu, logvar = model.encode(torch.rand(5, 64))
    assert mu.shape == logvar.shape == (5, 3)
    assert model.decode(torch.randn(2, 5, 3)).shape == (2, 5, 64)


def test_unknown_option_lists_the_choices(compose) -> None:
    with pytest.raises(
        MissingConfigException, match=r"(?s)Could not find 'prior/nope'.*Available options in 'prior'.*gaussian"
    ):
        compose("prior=nope")


@pytest.mark.slow  # starts train.py
def test_unknown_option_on_the_command_line_lists_the_choices() -> None:
    proc = subprocess.run([sys.executable, "train.py", "prior=nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Could not find 'prior/nope'" in proc.stderr
    assert "Available options in 'prior'" in proc.stderr and "gaussian" in proc.stderr


def test_cuda_without_gpu_is_a_clear_error(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="device=cuda was asked for, but torch sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_a_target_that_is_not_a_prior_is_refused(compose) -> None:
    cfg = compose("data=digits", "prior._target_=torch.nn.Identity")
    refusal = r"^prior\._target_ built a Identity, which does not subclass priors\.base\.Prior$"
    with pytest.raises(ConfigError, match=refusal):
        build_model(cfg, digits())
