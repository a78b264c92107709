"""The fast tier's rules (tests/conftest.py): a test not marked slow starts no process and takes at most
FAST_TIER_MAX_STEPS optimizer steps, its fixtures included; a slow test may do either."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
REFUSED = r"starts a process \({}\): mark it @pytest.mark.slow"


def test_a_fast_test_cannot_start_a_process() -> None:
    with pytest.raises(RuntimeError, match=REFUSED.format(r"subprocess\.Popen")):
        subprocess.run(["true"], check=True)
    with pytest.raises(RuntimeError, match=REFUSED.format(r"subprocess\.Popen")):
        os.popen("true")
    with pytest.raises(RuntimeError, match=REFUSED.format(r"os\.system")):
        os.system("true")
    with pytest.raises(RuntimeError, match=REFUSED.format(r"_posixsubprocess\.fork_exec")):
        multiprocessing.get_context("spawn").Process(target=print).start()
    # Not called: if the rule failed, a forked copy of pytest would run on.
    assert os.fork.__qualname__.endswith("refuse") and os.forkpty.__qualname__.endswith("refuse")


@pytest.fixture(scope="module")
def started_in_a_module_fixture() -> BaseException | None:
    try:
        subprocess.run(["true"], check=True)
    except RuntimeError as e:
        return e
    return None


def test_a_module_fixture_of_a_fast_test_cannot_start_a_process(started_in_a_module_fixture) -> None:
    assert "mark it @pytest.mark.slow" in str(started_in_a_module_fixture)


@pytest.mark.slow  # a pytest session of its own, in this process; its slow test starts a process
def test_the_rules_hold_in_a_session_of_their_own(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_inner="""
import subprocess

import pytest
import torch


def steps(n):
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(n):
        w.grad = torch.ones(1)
        opt.step()


@pytest.fixture(scope="module")
def trained():
    steps(8)


def test_ten_steps_pass():
    steps(10)


def test_eleven_steps_fail():
    steps(11)


def test_a_fixtures_steps_count(trained):
    steps(3)


def test_a_process_fails():
    subprocess.run(["true"], check=True)


@pytest.mark.slow
def test_a_slow_test_may_do_both():
    steps(100)
    subprocess.run(["true"], check=True)
"""
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2, failed=3)
    out = result.stdout.str()
    assert "test_eleven_steps_fail took 11 optimizer steps, more than the fast tier's 10" in out
    assert "test_a_fixtures_steps_count took 11 optimizer steps" in out
    assert "test_a_process_fails starts a process (subprocess.Popen)" in out
