"""Shared fixtures: the real Hydra config, composed and shrunk for fast CPU tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(*overrides: str) -> DictConfig:
    """Compose conf/train.yaml with `overrides`, as `python train.py` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> DictConfig:
    """A few quick epochs on the 8x8 digits, CPU, no logger, no progress bar."""
    cfg = compose_config(
        "data=digits",
        "logger=none",
        "device=cpu",
        "vae.latent_dim=4",
        "vae.hidden_dims=[32,32]",
        "trainer.max_epochs=2",
        "trainer.batch_size=100",
        "trainer.progress=false",
    )
    return cfg


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Bitwise comparisons between runs need the same reduction order.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
