"""lab/cli.py: an error inside a command is one line on stderr, exit code 2 for what the user can fix and 1
for anything else; debug=true keeps the traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import InstantiationException

from lab.cli import CONF_DIR, USER_ERRORS, one_line_errors, root_cause
from lab.trust import UntrustedTargetError
from priors.base import PriorShapeError
from vae.checkpoint import RunDirError
from vae.data import DataError
from vae.validation import ConfigError


def run(error: BaseException, debug: bool = False) -> int:
    with pytest.raises(SystemExit) as exit_info, one_line_errors("lab.thing", debug=debug):
        raise error
    return exit_info.value.code


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("seed must be an integer >= 0, got -1"),
        DataError("seed must be an integer >= 0, got -1"),
        RunDirError("seed must be an integer >= 0, got -1"),
        UntrustedTargetError("seed must be an integer >= 0, got -1"),
        PriorShapeError("seed must be an integer >= 0, got -1"),
        FileNotFoundError("seed must be an integer >= 0, got -1"),
        ValueError("seed must be an integer >= 0, got -1"),
        FloatingPointError("seed must be an integer >= 0, got -1"),
    ],
    ids=type,
)
def test_an_error_the_user_can_fix_is_its_message_and_exit_2(error: Exception, capsys) -> None:
    assert run(error) == 2
    assert capsys.readouterr().err == "lab.thing: error: seed must be an integer >= 0, got -1\n"


def test_any_other_error_names_its_type_and_exits_1(capsys) -> None:
    assert run(RuntimeError("the kernel\n  failed   here")) == 1
    assert capsys.readouterr().err == (
        "lab.thing: error: RuntimeError: the kernel failed here (debug=true shows the traceback)\n"
    )
    assert run(KeyError()) == 1  # no message: the type stands in for it
    assert capsys.readouterr().err == "lab.thing: error: KeyError: KeyError (debug=true shows the traceback)\n"


def test_a_multi_line_message_is_one_line(capsys) -> None:
    assert run(ConfigError("first line\nsecond line\n\n  third")) == 2
    assert capsys.readouterr().err == "lab.thing: error: first line second line third\n"


def test_hydras_instantiation_wrapper_is_looked_through(capsys) -> None:
    try:
        try:
            raise ConfigError("prior.num_components must be a positive integer, got 0")
        except ConfigError as inner:
            raise InstantiationException("Error in call to target 'priors.mixture.MixturePrior':\n...") from inner
    except InstantiationException as e:
        wrapped = e
    assert root_cause(wrapped) is wrapped.__cause__
    assert run(wrapped) == 2
    assert capsys.readouterr().err == "lab.thing: error: prior.num_components must be a positive integer, got 0\n"
    bare = InstantiationException("no cause")
    assert root_cause(bare) is bare


def test_debug_true_raises_the_error_itself_and_no_error_prints_nothing(capsys) -> None:
    with pytest.raises(ConfigError, match="bad"), one_line_errors("lab.thing", debug=True):
        raise ConfigError("bad")
    with one_line_errors("lab.thing"):
        pass
    assert capsys.readouterr().err == ""


def test_an_interrupt_is_not_an_error_line(capsys) -> None:
    with pytest.raises(KeyboardInterrupt), one_line_errors("lab.thing"):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_the_user_errors_and_the_config_directory() -> None:
    assert OSError in USER_ERRORS and RuntimeError not in USER_ERRORS
    # absolute: `python -m surgery` (an alias) resolves it from another package
    assert Path(CONF_DIR).is_absolute() and (Path(CONF_DIR) / "train.yaml").is_file()
