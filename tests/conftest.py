"""Shared pytest setup, applied to every folder under tests/: the repository root on sys.path,
`--prior`, CUDA skipping, and the real Hydra config composed (the `compose` fixture, the one way
tests compose it) and shrunk for fast CPU tests (`tiny_cfg`). Tests take these as fixtures and
never import this module."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The worktree's packages (and examples/) must shadow any installed copy of priorlab.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--prior",
        action="append",
        default=[],
        metavar="MODULE.CLASS",
        help="also run tests/priors/test_prior_contract.py on this Prior class (built as cls(latent_dim=D)); "
        "repeatable",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def compose(*overrides: str, config: str = "train", hydra: bool = False) -> DictConfig:
    """conf/<config>.yaml composed with `overrides`, as `python train.py` (config="train"),
    `python -m surgery` ("surgery_cli") or `python -m priors.fit` ("fit") would compose it.
    hydra=True keeps the `hydra` node (return_hydra_config=True): launcher, sweeper, run dir."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config, overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture(name="compose", scope="session")
def compose_fixture() -> Callable[..., DictConfig]:
    """The `compose` function above; session-scoped so module-scoped fixtures can use it too."""
    return compose


#: The tiny run every test builds on: the 8x8 digits, CPU, no logger, no progress bar.
TINY = (
    "data=digits",
    "logger=none",
    "device=cpu",
    "vae.latent_dim=4",
    "vae.hidden_dims=[32,32]",
    "trainer.max_epochs=2",
    "trainer.batch_size=100",
    "trainer.progress=false",
)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    """The overrides of `tiny_cfg`, for module-scoped fixtures that add their own."""
    return TINY


@pytest.fixture
def tiny_cfg() -> DictConfig:
    """A few quick epochs on the 8x8 digits, CPU, no logger, no progress bar."""
    return compose(*TINY)
