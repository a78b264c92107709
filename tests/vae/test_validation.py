"""vae/validation.py: each check passes a good value through and refuses a bad one in one line naming the option."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vae.validation import (
    ConfigError,
    check_arguments,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_regular_file,
    check_sizes,
    check_targets,
    check_text,
)


def test_check_int() -> None:
    assert check_int("trainer.max_epochs", 3, 1) == 3
    assert check_int("seed", 0, 0) == 0
    assert check_int("trainer.max_steps", None, 1, allow_none=True) is None
    with pytest.raises(ConfigError, match=r"^trainer.max_epochs must be a positive integer, got 0$"):
        check_int("trainer.max_epochs", 0, 1)
    with pytest.raises(ConfigError, match=r"^seed must be an integer >= 0, got True$"):
        check_int("seed", True, 0)  # a bool is an int to Python, never to a config
    with pytest.raises(ConfigError, match=r"^trainer.max_steps must be a positive integer or null, got 2.0$"):
        check_int("trainer.max_steps", 2.0, 1, allow_none=True)
    with pytest.raises(ConfigError, match="got None"):
        check_int("seed", None, 0)


def test_check_number() -> None:
    assert check_number("lr", 1, 0, strict=True) == 1.0 and isinstance(check_number("lr", 1, 0), float)
    assert check_number("patience", 0, 0) == 0.0
    with pytest.raises(ConfigError, match=r"^lr must be a number > 0, got 0$"):
        check_number("lr", 0, 0, strict=True)
    for bad in (float("nan"), False, "1e-3", -0.5):
        with pytest.raises(ConfigError, match=r"^x must be a number >= 0, got "):
            check_number("x", bad, 0)


def test_check_bool_choice_and_text() -> None:
    assert check_bool("plots", False) is False
    with pytest.raises(ConfigError, match=r"^plots must be true or false, got 'no'$"):
        check_bool("plots", "no")
    with pytest.raises(ConfigError, match=r"^plots must be true or false, got 1$"):
        check_bool("plots", 1)
    assert check_choice("split", "test", ("train", "valid", "test")) == "test"
    with pytest.raises(ConfigError, match=r"^split must be one of train, valid, test; got 'val'$"):
        check_choice("split", "val", iter(["train", "valid", "test"]))
    assert check_text("name", "run") == "run" and check_text("name", None, allow_none=True) is None
    for bad in ("", "   ", 3, None):
        with pytest.raises(ConfigError, match=r"^name must be a non-empty string, got "):
            check_text("name", bad)


def test_check_sizes_takes_any_list_of_positive_integers() -> None:
    assert check_sizes("vae.hidden_dims", [300, 300]) == (300, 300)
    assert check_sizes("vae.hidden_dims", OmegaConf.create([8])) == (8,)  # what Hydra hands over
    assert check_sizes("vae.hidden_dims", (4, 2)) == (4, 2)
    for bad, shown in [([], "[]"), ([3, 0], "[3, 0]"), ([True], "[True]"), ("32", "'32'"), (32, "32"), ({"a": 1}, "")]:
        with pytest.raises(ConfigError, match=r"^vae.hidden_dims must be a non-empty list of positive integers") as e:
            check_sizes("vae.hidden_dims", bad)
        assert str(e.value).endswith(f"got {shown}") or not shown


def test_check_regular_file(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "data.npz"
    f.write_bytes(b"x")
    assert check_regular_file("data.path", str(f)) == f and check_regular_file("data.path", f) == f
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_regular_file("data.path", "~/data.npz") == f
    with pytest.raises(ConfigError, match=rf"^data.path={tmp_path / 'nope'} does not exist; pass a file$"):
        check_regular_file("data.path", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=rf"^data.path={tmp_path} is a directory; pass an .npz file$"):
        check_regular_file("data.path", str(tmp_path), "an .npz file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would never end: refused without being opened
    with pytest.raises(FileNotFoundError, match=r"is not a regular file \(a device, FIFO or socket\)"):
        check_regular_file("data.path", str(fifo), error=FileNotFoundError)
    with pytest.raises(ConfigError, match=r"cannot be read \(File name too long\)"):
        check_regular_file("data.path", str(tmp_path / ("x" * 300)))
    with pytest.raises(ConfigError, match="data.path must be a non-empty string"):
        check_regular_file("data.path", "")


def build(data_dim: int, latent_dim: int, hidden: int, depth: int = 2, *extra, scale: float = 1.0) -> None:
    """A factory as a config node's `_target_`: data_dim and latent_dim come from the caller."""


def test_check_arguments_binds_a_node_and_fills_the_defaults() -> None:
    bound = check_arguments("vae.encoder", build, {"hidden": 8}, given=("data_dim", "latent_dim"))
    assert bound == {"hidden": 8, "depth": 2, "scale": 1.0}
    with pytest.raises(
        ConfigError,
        match=r"^vae.encoder: unknown option\(s\) data_dim, width; build takes hidden, depth, extra, scale$",
    ):
        check_arguments(
            "vae.encoder", build, {"hidden": 8, "width": 3, "data_dim": 5}, given=("data_dim", "latent_dim")
        )
    with pytest.raises(ConfigError, match=r"^vae.encoder: vae.encoder.hidden must be given$"):
        check_arguments("vae.encoder", build, {"depth": 3}, given=("data_dim", "latent_dim"))

    def anything(**options) -> None:
        """A factory taking **kwargs checks its own options: the node passes through."""

    assert check_arguments("prior", anything, {"whatever": 1}) == {"whatever": 1}


def test_check_targets_names_the_key_of_a_target_that_does_not_import() -> None:
    check_targets({"prior": {"_target_": "priors.gaussian.GaussianPrior"}, "seed": 0, "vae": {"encoder": None}})
    with pytest.raises(
        ConfigError, match=r"^vae.encoder._target_=vae.networks.NoSuchEncoder cannot be imported: .*NoSuchEncoder"
    ):
        check_targets({"vae": {"_target_": "vae.build_model", "encoder": {"_target_": "vae.networks.NoSuchEncoder"}}})
    with pytest.raises(ConfigError, match=r"^_target_ must be a non-empty string, got 3$"):
        check_targets({"_target_": 3})
    with pytest.raises(ConfigError, match=r"^prior._target_=no_such_module.Prior cannot be imported"):
        check_targets({"prior": {"_target_": "no_such_module.Prior"}})
