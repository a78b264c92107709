"""Shared pytest setup: the repository root on sys.path, `--prior`, and CUDA skipping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
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
