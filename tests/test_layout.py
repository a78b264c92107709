"""The package layout of docs/layout.md holds: imports run only downward, and every module has its test file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Lower packages first: a module may import its own package and those before it.
LAYERS = ("priors", "vae", "surgery", "lab")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """The top-level priorlab packages `path` imports, anywhere in the module (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in LAYERS)
    return found


@pytest.mark.parametrize("package", LAYERS)
def test_imports_run_only_downward(package):
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    upward = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - allowed)
        for path in modules(package)
        # `python -m surgery` and friends: old command names kept as entry points, not imported
        if path.name != "__main__.py"
    }
    assert {k: v for k, v in upward.items() if v} == {}


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lab.export import export\n")
    assert imported_packages(module) == {"lab"}


@pytest.mark.parametrize("package", LAYERS)
def test_every_module_has_its_test_file(package):
    missing = [
        str(path.relative_to(ROOT))
        for path in modules(package)
        if path.name not in ("__init__.py", "__main__.py")
        and not (ROOT / "tests" / package / f"test_{path.stem}.py").exists()
    ]
    assert missing == []
