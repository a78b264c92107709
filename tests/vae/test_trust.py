"""A checkpoint's stored config never instantiates an untrusted `_target_`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from train import train
from vae.checkpoint import load_model
from vae.trust import UntrustedTargetError, check_trusted, is_trusted

ROOT = Path(__file__).resolve().parents[2]


def writes_file(marker: Path) -> dict:
    """A config node that, instantiated, writes `marker`: the attack in the issue."""
    return {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"],
    }


def test_the_crafted_node_really_writes_a_file_when_instantiated(tmp_path):
    # The control: without the check, this node is harmful, so the tests below can fail.
    marker = tmp_path / "control"
    hydra.utils.instantiate(OmegaConf.create(writes_file(marker)))
    assert marker.read_text() == "pwned"


def train_tiny(compose, run_dir: Path, *overrides: str) -> Path:
    cfg = compose(
        "data=digits",
        "logger=none",
        "device=cpu",
        "vae.latent_dim=2",
        "vae.hidden_dims=[16]",
        "trainer.max_steps=2",
        "trainer.progress=false",
        "surgery.enabled=false",
        *overrides,
    )
    train(cfg, run_dir=run_dir)
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def checkpoint(compose, tmp_path_factory) -> Path:
    return train_tiny(compose, tmp_path_factory.mktemp("run"))


def tampered(checkpoint: Path, out: Path, edit) -> Path:
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload["config"])
    torch.save(payload, out)
    return out


@pytest.mark.parametrize("node", ["data", "prior", "vae.encoder"])
def test_a_crafted_checkpoint_never_writes_its_file(checkpoint, tmp_path, node):
    marker = tmp_path / "pwned"

    def edit(config):
        parent, _, key = node.rpartition(".")
        target = config
        for part in filter(None, parent.split(".")):
            target = target[part]
        target[key] = writes_file(marker)

    evil = tampered(checkpoint, tmp_path / "evil.pt", edit)
    with pytest.raises(UntrustedTargetError, match="pathlib.Path.write_text"):
        load_model(evil)
    assert not marker.exists()


def test_a_nested_target_is_checked_too(checkpoint, tmp_path):
    marker = tmp_path / "pwned"

    def edit(config):
        config["prior"]["layer"] = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}

    with pytest.raises(UntrustedTargetError, match="builtins.open.*prior.layer"):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))
    assert not marker.exists()


def test_an_interpolation_that_could_build_a_target_is_refused(checkpoint, tmp_path):
    def edit(config):
        config["data"] = "${oc.decode:'{_target_: os.system, _args_: [true]}'}"

    with pytest.raises(UntrustedTargetError, match="interpolation at data"):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))


def test_an_honest_checkpoint_loads(checkpoint):
    model, data, cfg = load_model(checkpoint)
    assert cfg.prior._target_ == "priors.gaussian.GaussianPrior" and data.data_dim == 64


def test_a_users_class_needs_allow(compose, tmp_path):
    user = train_tiny(compose, tmp_path, "prior._target_=examples.student_t_prior.StudentTPrior")
    with pytest.raises(UntrustedTargetError, match=r"allow=\[examples\.\*\]"):
        load_model(user)
    model, _, _ = load_model(user, allow=["examples.*"])
    assert type(model.prior).__name__ == "StudentTPrior"


@pytest.mark.parametrize(
    ("target", "trusted"),
    [
        ("priors.gaussian.GaussianPrior", True),
        ("vae.data.mnist", True),
        ("torch.optim.Adam", True),
        ("nflows.transforms.MaskedAffineAutoregressiveTransform", True),
        ("surgery.run.write_json", False),  # priorlab's own, but a function that writes a file
        ("vae.trainer.save_checkpoint", False),
        ("torch.load", False),
        ("os.system", False),
        ("priors.no_such_module.Thing", False),
    ],
)
def test_is_trusted(target, trusted):
    assert is_trusted(target) is trusted


def test_check_trusted_names_the_path_of_the_bad_node():
    with pytest.raises(UntrustedTargetError, match=r"'os.system' at vae.layers\[1\]"):
        check_trusted({"vae": {"layers": [{"_target_": "torch.optim.SGD"}, {"_target_": "os.system"}]}})


@pytest.mark.slow
def test_cli_refuses_in_one_line_and_allow_lets_it_through(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = tampered(checkpoint, tmp_path / "evil.pt", lambda c: c.__setitem__("data", writes_file(marker)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgery",
            f"checkpoint={evil}",
            "device=cpu",
            "is_samples=5",
            "is_points=5",
            f"output_dir={tmp_path}",
            "plots=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and not marker.exists()
    assert done.stderr.strip().count("\n") == 0 and "pathlib.Path.write_text" in done.stderr
    assert not (tmp_path / "surgery.json").exists()
