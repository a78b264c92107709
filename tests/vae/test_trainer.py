from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from priors.gaussian import GaussianPrior
from train import train
from vae import build_model
from vae.data import digits
from vae.model import VAE
from vae.trainer import NonFiniteLossError, Trainer, evaluate, flushes_denormals, load_checkpoint
from vae.validation import ConfigError


def _set(cfg: DictConfig, **values) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            node, *path = key.split(".")
            target = cfg[node]
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = value
    return cfg


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_a_few_epochs_lower_the_loss(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    metrics = train(_set(tiny_cfg, **{"trainer.max_epochs": 4}), run_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] - 2
    assert lines[-1]["val_elbo"] > lines[0]["val_elbo"]
    assert metrics["val_elbo"] == max(line["val_elbo"] for line in lines)
    assert metrics["test_elbo"] < 0 and metrics["steps"] == 4 * 14
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "checkpoints" / name)
        assert ckpt["config"]["prior"]["_target_"] == "priors.gaussian.GaussianPrior"
        assert {"model", "optimizer", "state", "rng_cpu"} <= ckpt.keys()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("split", ["end_of_epoch", "mid_epoch"])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tiny_cfg: DictConfig, tmp_path: Path, split: str) -> None:
    cfg = _set(tiny_cfg, **{"trainer.max_epochs": 3, "trainer.warmup_epochs": 2})
    train(cfg, run_dir=tmp_path / "straight")

    # Stop early (after one epoch, or after 20 of 42 steps), then resume to the same end.
    stop = {"trainer.max_epochs": 1} if split == "end_of_epoch" else {"trainer.max_steps": 20}
    train(_set(cfg, **stop), run_dir=tmp_path / "resumed")
    train(_set(cfg, **{"trainer.resume": True}), run_dir=tmp_path / "resumed")

    a = _params(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _params(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed run continued its metrics file rather than restarting it
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 42 and steps == sorted(steps)


def test_resume_true_without_a_checkpoint_starts_fresh(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    metrics = train(_set(tiny_cfg, **{"trainer.resume": True, "trainer.max_epochs": 1}), run_dir=tmp_path)
    assert metrics["steps"] == 14


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tiny_cfg: DictConfig, tmp_path: Path, monkeypatch
) -> None:
    cfg = _set(tiny_cfg, **{"trainer.max_epochs": 3})
    original = VAE.elbo_terms
    calls = {"n": 0}

    def poisoned(self, x, index=None):
        terms = original(self, x, index)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 20:  # step 20, in the second epoch (14 steps an epoch)
                terms.reconstruction = terms.reconstruction * float("nan")
        return terms

    monkeypatch.setattr(VAE, "elbo_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 20 \(epoch 2, batch 6\).*last good checkpoint"):
        train(cfg, run_dir=tmp_path)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 14 and ckpt["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_early_stopping_honours_patience(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    # lr=0: nothing changes, so no validation after the first is better
    cfg = _set(tiny_cfg, **{"trainer.max_epochs": 10, "trainer.patience": 2, "trainer.optimizer.lr": 0.0})
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["epochs"] == 3 and metrics["best_epoch"] == 1


def test_kl_warmup_is_linear(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    train(_set(tiny_cfg, **{"trainer.max_epochs": 3, "trainer.warmup_epochs": 2}), run_dir=tmp_path)
    weights = [json.loads(line)["kl_weight"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # weight at the last step of each epoch: 14/28, 28/28, then capped at 1
    assert weights == pytest.approx([0.5, 1.0, 1.0])


def test_evaluate_is_deterministic_and_leaves_the_rng_alone(tiny_cfg: DictConfig) -> None:
    data = digits()
    model = build_model(tiny_cfg, data)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = evaluate(model, data.split("val"), seed=0)
    b = evaluate(model, data.split("val"), seed=0)
    assert a == b
    assert torch.equal(before, torch.get_rng_state())


def test_bad_trainer_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.batch_size must be a positive integer, got 0"):
        Trainer(batch_size=0, run_dir=tmp_path)


def test_loading_a_missing_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="is not a priorlab checkpoint"):
        load_checkpoint(foreign)
    truncated = tmp_path / "truncated.pt"
    torch.save({"format": 1, "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated or foreign"):
        load_checkpoint(truncated)


def test_evaluation_noise_is_not_the_initialization_stream(tiny_cfg: DictConfig) -> None:
    # train() seeds torch with cfg.seed, then builds the model. If evaluation reused that
    # seed, its noise would replay the draws that placed the mixture's means, putting the
    # "posterior samples" on the components and making the Monte Carlo KL hugely negative.
    cfg = _set(
        tiny_cfg, **{"prior._target_": "priors.mixture.MixturePrior", "prior.num_components": 200, "vae.latent_dim": 20}
    )
    data = digits()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data)
    result = evaluate(model, data.split("val"), seed=cfg.seed)
    assert result.kl > 0, result


def test_aggregate_prior_is_the_surgerys_q_after_training(compose, tmp_path: Path) -> None:
    # After each epoch the aggregate prior re-encodes the training set the surgery decomposes,
    # with the final encoder: the checkpoint's prior is then exactly q(z), and the marginal
    # KL vanishes (2e-7 nats here). Without on_train_epoch_end it holds the epoch start's
    # encodings of that epoch's own binarization, and the marginal KL here is 0.035 nats.
    cfg = compose(
        "data=digits",
        "logger=none",
        "device=cpu",
        "prior=aggregate",
        "vae.latent_dim=4",
        "vae.hidden_dims=[32,32]",
        "trainer.max_epochs=2",
        "trainer.progress=false",
        "surgery.is_samples=10",
        "surgery.is_points=20",
        "surgery.plots=false",
    )
    metrics = train(cfg, run_dir=tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    model.load_state_dict(best)
    with torch.no_grad():
        mu, logvar = model.encoder(data.split("train"))
    torch.testing.assert_close(best["prior.mu"], mu)
    torch.testing.assert_close(best["prior.logvar"], logvar)
    assert abs(metrics["surgery"]["marginal_kl"]) < 1e-5


def test_patience_is_held_during_warmup(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    # lr=0: no validation after the first is better; the counter starts once the KL weight is 1
    cfg = _set(
        tiny_cfg,
        **{"trainer.max_epochs": 20, "trainer.patience": 2, "trainer.warmup_epochs": 5, "trainer.optimizer.lr": 0.0},
    )
    metrics = train(cfg, run_dir=tmp_path)
    # epochs 2-4 end with weight < 1 (held); epoch 5 ends at weight 1 (1st), 6 (2nd): stop
    assert metrics["epochs"] == 6 and metrics["best_epoch"] == 1


def test_a_kill_between_metrics_and_checkpoint_leaves_no_duplicate_epoch(tiny_cfg: DictConfig, tmp_path: Path) -> None:
    cfg = _set(tiny_cfg, **{"trainer.max_epochs": 2})
    train(cfg, run_dir=tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # As if killed after epoch 3's line was appended but before last.pt was replaced,
    # with a torn fourth line.
    epoch3 = {**json.loads(lines[-1]), "epoch": 3, "step": 42}
    metrics.write_text("\n".join([*lines, json.dumps(epoch3), '{"epoch": 4, "st']) + "\n")
    train(_set(cfg, **{"trainer.max_epochs": 3, "trainer.resume": True}), run_dir=tmp_path)
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize("flush", [True, False])
def test_denormals_are_flushed_while_training_only(tiny_cfg: DictConfig, tmp_path: Path, flush: bool) -> None:
    # The prior sees the CPU's setting inside every training step; after fit it is as before.
    seen = []

    class Probe(GaussianPrior):
        def _kl(self, mu, logvar):
            seen.append(flushes_denormals())
            return super()._kl(mu, logvar)

    data = instantiate(tiny_cfg.data)
    model = build_model(tiny_cfg, data)
    model.prior = Probe(model.latent_dim)
    before = flushes_denormals()
    Trainer(max_steps=3, max_epochs=1, progress=False, run_dir=tmp_path, flush_denormal=flush).fit(model, data)
    assert seen and all(s == flush for s in seen)
    assert flushes_denormals() == before
