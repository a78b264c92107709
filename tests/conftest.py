"""Shared pytest setup, applied to every folder under tests/: the repository root on sys.path,
`--prior`, CUDA skipping, the fast tier's rules (no process, a few optimizer steps), and the real
Hydra config composed (the `compose` fixture, the one way tests compose it) and shrunk for fast CPU
tests (`tiny_cfg`, `short_run`). Tests take these as fixtures and never import this module."""

from __future__ import annotations

import _posixsubprocess
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig
from torch.optim.optimizer import register_optimizer_step_post_hook

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


# ---- the fast tier's rules: no process, a few optimizer steps ---------------------------------

#: Every way a test could start a process, as (owner, attribute, what the message calls it):
#: subprocess (and os.popen) ends in Popen._execute_child, which calls subprocess's own alias of
#: fork_exec or os.posix_spawn; multiprocessing's spawn and forkserver call _posixsubprocess.fork_exec;
#: its fork start method, os.spawn* and pty call os.fork or os.forkpty; os.system is a C call.
PROCESS_STARTERS = (
    (subprocess.Popen, "_execute_child", "subprocess.Popen"),
    (subprocess, "_fork_exec", "subprocess.Popen"),
    (_posixsubprocess, "fork_exec", "_posixsubprocess.fork_exec"),
    (os, "fork", "os.fork"),
    (os, "forkpty", "os.forkpty"),
    (os, "posix_spawn", "os.posix_spawn"),
    (os, "posix_spawnp", "os.posix_spawnp"),
    (os, "system", "os.system"),
)
#: The most optimizer steps (any torch optimizer's `step`) a test outside the slow tier may take,
#: counting the fixtures it sets up.
FAST_TIER_MAX_STEPS = 10
_STEPS = pytest.StashKey[int]()


class ProcessInFastTestError(RuntimeError):
    """A test outside the slow tier tried to start a process."""


class TrainingInFastTestError(RuntimeError):
    """A test outside the slow tier took more than FAST_TIER_MAX_STEPS optimizer steps."""


def _refuse(nodeid: str, name: str) -> Callable[..., None]:
    def refuse(*args, **kwargs) -> None:
        raise ProcessInFastTestError(
            f"{nodeid} starts a process ({name}): mark it @pytest.mark.slow; the fast tier "
            '(pytest -m "not slow") starts none'
        )

    return refuse


@contextlib.contextmanager
def _fast_tier_rules(item: pytest.Item) -> Iterator[None]:
    """For a test not marked slow: every process starter of PROCESS_STARTERS raises
    ProcessInFastTestError, more than FAST_TIER_MAX_STEPS optimizer steps fail the test with
    TrainingInFastTestError, and torch computes on one thread, through the test, its fixtures of
    every scope and their teardown.
    Hook wrappers rather than an autouse fixture, which module-scoped fixtures would run before."""
    if item.get_closest_marker("slow") is not None:
        yield
        return

    def count(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        item.stash[_STEPS] = item.stash.get(_STEPS, 0) + 1

    before = item.stash.get(_STEPS, 0)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for owner, name, shown in PROCESS_STARTERS:
            if hasattr(owner, name):
                patch.setattr(owner, name, _refuse(item.nodeid, shown))
        counting = register_optimizer_step_post_hook(count)
        # Its tensors are small: a second thread costs CPU (OpenMP's waiting) and saves no time.
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            counting.remove()
    steps = item.stash.get(_STEPS, 0)
    if steps > FAST_TIER_MAX_STEPS >= before:  # once, in the phase (setup, call, teardown) that went past
        raise TrainingInFastTestError(
            f"{item.nodeid} took {steps} optimizer steps, more than the fast tier's {FAST_TIER_MAX_STEPS}: "
            "mark it @pytest.mark.slow, or train fewer steps (trainer.max_steps=...)"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _fast_tier_rules(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _fast_tier_rules(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    with _fast_tier_rules(item):
        return (yield)


# ---- composing the config -----------------------------------------------------------------------


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
#: The smallest model on the digits, with the surgery off: tests of the run machinery, where
#: what is trained does not matter (test_reliability, test_trust, test_data).
MINIMAL = (
    "data=digits",
    "logger=none",
    "device=cpu",
    "vae.latent_dim=2",
    "vae.hidden_dims=[16]",
    "trainer.progress=false",
    "surgery.enabled=false",
)

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


#: The run `short_run` trains: two optimizer steps, a 2-D latent space, the surgery on a budget.
SHORT_RUN = (
    "data=digits",
    "logger=none",
    "device=cpu",
    "vae.latent_dim=2",
    "vae.hidden_dims=[32]",
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "trainer.progress=false",
    "surgery.is_samples=20",
    "surgery.is_points=50",
    "surgery.plot_grid=30",
)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(run directory, train's metrics) of a run of two steps made by `train` as `python train.py` makes
    it: checkpoints, metrics, surgery.json and pictures, for the commands that read a run directory.
    Shared by the whole session: copy what a test changes."""
    from train import train

    run_dir = tmp_path_factory.mktemp("short_run")
    return run_dir, train(compose(*SHORT_RUN), run_dir=run_dir)
