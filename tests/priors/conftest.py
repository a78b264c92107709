"""The contract suite's 2-D grids (about 25 s of CPU over every prior) run in the full suite; the
fast tier checks every prior on the 1-D grids."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name == "test_prior_contract.py" and getattr(item, "callspec", None) is not None:
            if item.callspec.params.get("dim") == 2:
                item.add_marker(pytest.mark.slow)
