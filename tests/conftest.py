"""Shared pytest setup: the repository root on sys.path, `--prior`, CUDA skipping, and the real
Hydra config composed and shrunk for fast CPU tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
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
        help="also run tests/test_prior_contract.py on this Prior class (built as cls(latent_dim=D)); repeatable",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def compose_config(*overrides: str) -> DictConfig:
    """Compose conf/train.yaml with `overrides`, as `python train.py` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tiny_cfg() -> DictConfig:
    """A few quick epochs on the 8x8 digits, CPU, no logger, no progress bar."""
    return compose_config(
        "data=digits",
        "logger=none",
        "device=cpu",
        "vae.latent_dim=4",
        "vae.hidden_dims=[32,32]",
        "trainer.max_epochs=2",
        "trainer.batch_size=100",
        "trainer.progress=false",
    )
