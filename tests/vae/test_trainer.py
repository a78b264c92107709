"""`vae.trainer.Trainer` on a tiny model built in-process: the loop, resumes, stops, frozen parts, failed writes.

The unit tests build the tiny digits model (conftest's `tiny_cfg`) and call `Trainer(...).fit`
directly, at two steps an epoch (batch 700 of the 1,397 digits). The few end-to-end tests
through `train.py` are marked slow.
"""

from __future__ import annotations

import errno
import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from priors.gaussian import GaussianPrior
from priors.mixture import MixturePrior
from train import train
from vae import build_model
from vae.checkpoint import RunDirError
from vae.data import BinarizedData, digits
from vae.model import VAE
from vae.trainer import (
    DEFAULT_CALLBACKS,
    CheckpointWriteError,
    NonFiniteLossError,
    Trainer,
    TrainState,
    evaluate,
    flushes_denormals,
    load_checkpoint,
)
from vae.validation import ConfigError

BATCH = 700  # two steps an epoch: 700 and 697 of the 1,397 training digits


@pytest.fixture(scope="module")
def data() -> BinarizedData:
    return digits()


def _model(cfg: DictConfig, data: BinarizedData, seed: int = 0) -> VAE:
    """The tiny model as train.py builds it: the global RNG seeded with the run's seed first."""
    torch.manual_seed(seed)
    return build_model(cfg, data)


def _trainer(run_dir: Path, **options: Any) -> Trainer:
    return Trainer(**{"batch_size": BATCH, "max_epochs": 2, "progress": False, "run_dir": run_dir, **options})


def _fit(cfg: DictConfig, data: BinarizedData, run_dir: Path, **options: Any) -> tuple[VAE, TrainState]:
    """A fresh tiny model (seed 0) trained by a trainer with `options`; (model, final state)."""
    model = _model(cfg, data)
    state = _trainer(run_dir, **options).fit(model, data, run_config=OmegaConf.to_container(cfg, resolve=True))
    return model, state


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


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _epochs(run_dir: Path) -> list[int]:
    return [line["epoch"] for line in _lines(run_dir)]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- the loop ----------------------------------------------------------------------------------


def test_a_few_steps_lower_the_loss_and_write_metrics_and_checkpoints(tiny_cfg, data, tmp_path) -> None:
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=4, optimizer=partial(torch.optim.Adam, lr=0.02))
    lines = _lines(tmp_path)
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4] and [line["step"] for line in lines] == [2, 4, 6, 8]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"] - 2
    assert lines[-1]["val_elbo"] > lines[0]["val_elbo"]
    assert state.best_val_elbo == max(line["val_elbo"] for line in lines) and state.step == 8 and state.epoch == 4
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(tmp_path / "checkpoints" / name)
        assert ckpt["config"]["prior"]["_target_"] == "priors.gaussian.GaussianPrior"
        assert {"model", "optimizer", "state", "rng_cpu"} <= ckpt.keys()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("split", ["end_of_epoch", "mid_epoch"])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tiny_cfg, data, tmp_path, split) -> None:
    _fit(tiny_cfg, data, tmp_path / "straight", max_epochs=3, warmup_epochs=2)
    # Stop early (after one epoch, or after 3 of 6 steps), then resume to the same end with a fresh model.
    stop = {"max_epochs": 1} if split == "end_of_epoch" else {"max_steps": 3}
    _fit(tiny_cfg, data, tmp_path / "resumed", warmup_epochs=2, **{"max_epochs": 3, **stop})
    _fit(tiny_cfg, data, tmp_path / "resumed", max_epochs=3, warmup_epochs=2, resume=True)
    _assert_same(
        _params(tmp_path / "straight" / "checkpoints" / "last.pt"),
        _params(tmp_path / "resumed" / "checkpoints" / "last.pt"),
    )
    steps = [line["step"] for line in _lines(tmp_path / "resumed")]  # continued, not restarted
    assert steps[-1] == 6 and steps == sorted(steps)


def test_resume_true_without_a_checkpoint_starts_fresh(tiny_cfg, data, tmp_path) -> None:
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=1, resume=True)
    assert state.step == 2


def test_the_resume_log_names_the_checkpoint_relative_to_the_run(tiny_cfg, data, tmp_path, caplog) -> None:
    # the log is committed with the run, so it names no machine's paths
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="vae.trainer"):
        _fit(tiny_cfg, data, run_dir, max_epochs=1, resume=True)
        _fit(tiny_cfg, data, run_dir, max_epochs=2, resume=True)
    said = [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]
    assert said == [
        f"resume: {Path('checkpoints', 'last.pt')} does not exist yet, starting fresh",
        f"resumed from {Path('checkpoints', 'last.pt')} at epoch 2, step 2",
    ]
    assert not any(str(tmp_path) in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_cfg, data, tmp_path, monkeypatch):
    original = VAE.elbo_terms
    calls = {"n": 0}

    def poisoned(self, x, index=None):
        terms = original(self, x, index)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:  # step 4: the second batch of the second epoch
                terms.reconstruction = terms.reconstruction * float("nan")
        return terms

    monkeypatch.setattr(VAE, "elbo_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 \(epoch 2, batch 2\).*last good checkpoint"):
        _fit(tiny_cfg, data, tmp_path, max_epochs=3, log_every_n_steps=1)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == 2 and ckpt["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_early_stopping_honours_patience(tiny_cfg, data, tmp_path) -> None:
    # lr=0: nothing changes, so no validation after the first is better
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=10, patience=2, optimizer=partial(torch.optim.Adam, lr=0.0))
    assert state.epoch == 3 and state.best_epoch == 1


def test_a_resumed_run_that_stopped_early_trains_nothing_more(tiny_cfg, data, tmp_path) -> None:
    lr0 = partial(torch.optim.Adam, lr=0.0)
    _fit(tiny_cfg, data, tmp_path, max_epochs=10, patience=2, optimizer=lr0)
    lines = len(_lines(tmp_path))
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=10, patience=2, optimizer=lr0, resume=True)
    assert state.epoch == 3 and len(_lines(tmp_path)) == lines  # no epoch trained, none logged
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=10, patience=3, optimizer=lr0, resume=True)
    assert state.epoch == 4  # a larger patience goes on


@pytest.mark.slow
def test_patience_is_held_during_warmup(tiny_cfg, data, tmp_path) -> None:
    # lr=0: no validation after the first is better; the counter starts once the KL weight is 1
    lr0 = partial(torch.optim.Adam, lr=0.0)
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=20, patience=2, warmup_epochs=5, optimizer=lr0)
    # epochs 2-4 end with weight < 1 (held); epoch 5 ends at weight 1 (1st), 6 (2nd): stop
    assert state.epoch == 6 and state.best_epoch == 1


def test_kl_warmup_is_linear(tiny_cfg, data, tmp_path) -> None:
    _fit(tiny_cfg, data, tmp_path, max_epochs=3, warmup_epochs=2)
    # the weight at the last step of each epoch: 2/4, 4/4, then capped at 1
    assert [line["kl_weight"] for line in _lines(tmp_path)] == pytest.approx([0.5, 1.0, 1.0])


def test_evaluate_is_deterministic_and_leaves_the_rng_alone(tiny_cfg, data) -> None:
    model = _model(tiny_cfg, data)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = evaluate(model, data.split("val"), seed=0)
    b = evaluate(model, data.split("val"), seed=0)
    assert a == b
    assert torch.equal(before, torch.get_rng_state())


def test_evaluation_noise_is_not_the_initialization_stream(tiny_cfg, data) -> None:
    # train() seeds torch with cfg.seed, then builds the model. If evaluation reused that
    # seed, its noise would replay the draws that placed the mixture's means, putting the
    # "posterior samples" on the components and making the Monte Carlo KL hugely negative.
    cfg = _set(
        tiny_cfg, **{"prior._target_": "priors.mixture.MixturePrior", "prior.num_components": 200, "vae.latent_dim": 20}
    )
    model = _model(cfg, data, seed=cfg.seed)
    result = evaluate(model, data.split("val"), seed=cfg.seed)
    assert result.kl > 0, result


@pytest.mark.parametrize("flush", [True, False])
def test_denormals_are_flushed_while_training_only(tiny_cfg, data, tmp_path, flush: bool) -> None:
    # The prior sees the CPU's setting inside every training step; after fit it is as before.
    seen = []

    class Probe(GaussianPrior):
        def _kl(self, mu, logvar):
            seen.append(flushes_denormals())
            return super()._kl(mu, logvar)

    model = _model(tiny_cfg, data)
    model.prior = Probe(model.latent_dim)
    before = flushes_denormals()
    _trainer(tmp_path, max_steps=2, max_epochs=1, flush_denormal=flush).fit(model, data)
    assert seen and all(s == flush for s in seen)
    assert flushes_denormals() == before


# ---- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "trainer.batch_size must be a positive integer, got 0"),
        ({"max_seconds": 0}, "trainer.max_seconds must be a number > 0, got 0"),
        ({"freeze": "encoder"}, r"trainer.freeze must be a list .* write trainer.freeze=\[encoder\]"),
        ({"freeze": ["encoder", ""]}, "trainer.freeze must hold names of the model's parts"),
        ({"callbacks": "vae.callbacks.TrainingSetEncodings"}, "trainer.callbacks must be a list"),
    ],
)
def test_bad_trainer_arguments_are_refused(tmp_path, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(run_dir=tmp_path, **options)


def test_the_default_callbacks_are_the_configs(compose) -> None:
    # Equal to the resolved trainer.callbacks, so a run from before the option resumes (lab.run_dir.resume_changes).
    node = OmegaConf.to_container(compose().trainer, resolve=True)
    assert node["callbacks"] == DEFAULT_CALLBACKS
    assert (node["freeze"], node["max_seconds"]) == (None, None)  # the class defaults too
    assert [type(c).__name__ for c in Trainer().callbacks] == ["TrainingSetEncodings"]
    assert Trainer(callbacks=[]).callbacks == [] and Trainer(callbacks=None).callbacks == []


def test_max_seconds_stops_after_the_first_step_that_spends_it(tiny_cfg, data, tmp_path) -> None:
    _, state = _fit(tiny_cfg, data, tmp_path, max_epochs=50, max_seconds=1e-9)
    assert state.step == 1 and state.epoch == 0 and state.batch_in_epoch == 1  # at least one step, then stop
    (line,) = _lines(tmp_path)
    assert line["complete_epoch"] is False and line["step"] == 1  # validated and checkpointed as at max_steps
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["state"]["step"] == 1
    _, state = _fit(tiny_cfg, data, tmp_path / "ample", max_epochs=2, max_seconds=1e6)
    assert state.step == 4


def test_frozen_parts_keep_their_parameters_and_the_optimizer_never_sees_them(tiny_cfg, data, tmp_path) -> None:
    cfg = _set(tiny_cfg, **{"prior._target_": "priors.mixture.MixturePrior", "prior.num_components": 5})
    model = _model(cfg, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = []
    original = VAE.elbo_terms

    def watching(self, x, index=None):
        modes.append((self.training, self.encoder.training, self.decoder.training, self.prior.training))
        return original(self, x, index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VAE, "elbo_terms", watching)
        state = _trainer(tmp_path, freeze=["encoder", "decoder"], max_epochs=1).fit(model, data)
    after = model.state_dict()
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same if not key.startswith("prior.") else not same, key
    assert (True, False, False, True) in modes  # a training step: the frozen parts in eval mode
    assert all(p.requires_grad for p in model.parameters())  # as they were before fit
    optimizer = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["optimizer"]
    assert len(optimizer["state"]) == len(list(model.prior.parameters())) and state.step == 2


def test_freeze_names_parts_the_model_has_and_leaves_something_to_train(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data)  # the Gaussian prior has no parameters
    with pytest.raises(ConfigError, match=r"trainer.freeze names 'encoer'.*its parts: encoder, decoder, prior"):
        _trainer(tmp_path, freeze=["encoer"]).fit(model, data)
    with pytest.raises(ConfigError, match=r"trainer.freeze=\['encoder', 'decoder'\] leaves no parameter to train"):
        _trainer(tmp_path, freeze=["encoder", "decoder"]).fit(model, data)
    assert all(p.requires_grad for p in model.parameters()) and not (tmp_path / "metrics.jsonl").exists()


def test_a_dotted_part_is_frozen_alone(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data)
    model.prior = MixturePrior(model.latent_dim, num_components=3)
    means = model.prior.means.detach().clone()
    _trainer(tmp_path, freeze=["prior"], max_epochs=1).fit(model, data)
    assert torch.equal(model.prior.means, means)


# ---- resume never starts over silently; a failed checkpoint write loses nothing ----------


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _temporaries(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob(".*.tmp"))


def test_resume_true_in_a_run_without_last_pt_is_refused_and_names_the_choices(tiny_cfg, data, tmp_path) -> None:
    # The layout of committed results: best.pt and metrics.jsonl, no last.pt.
    _fit(tiny_cfg, data, tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    best = tmp_path / "checkpoints" / "best.pt"
    with pytest.raises(RunDirError) as info:
        _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=True)
    message = str(info.value)
    assert "checkpoints/best.pt, metrics.jsonl" in message and "no checkpoints/last.pt" in message
    assert f"trainer.resume={best}" in message and "hydra.run.dir=" in message

    # The choice it names works: continue from the best state, without a duplicated epoch.
    best_step = load_checkpoint(best)["state"]["step"]
    _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=str(best))
    steps = [line["step"] for line in _lines(tmp_path)]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and best_step in steps


def test_resume_true_with_metrics_but_no_checkpoint_says_there_is_nothing_to_continue(tiny_cfg, data, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 2}\n')
    with pytest.raises(RunDirError, match=r"holds a run \(metrics.jsonl\).*no checkpoint to continue from"):
        _fit(tiny_cfg, data, tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


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


def test_a_kill_between_metrics_and_checkpoint_leaves_no_duplicate_epoch(tiny_cfg, data, tmp_path) -> None:
    _fit(tiny_cfg, data, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # As if killed after epoch 3's line was appended but before last.pt was replaced, with a torn fourth line.
    epoch3 = {**json.loads(lines[-1]), "epoch": 3, "step": 6}
    metrics.write_text("\n".join([*lines, json.dumps(epoch3), '{"epoch": 4, "st']) + "\n")
    _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=True)
    assert _epochs(tmp_path) == [1, 2, 3]
    # the dropped line is kept apart, not lost; the torn one is gone
    assert (tmp_path / "metrics_superseded.jsonl").read_text() == json.dumps(epoch3) + "\n"


class _FullDisk:
    """A file whose writes fail with ENOSPC after `budget` bytes, as on a full disk (the bytes
    before that reach the file, so a temporary file is left to clean up)."""

    def __init__(self, file: Any, budget: int = 1000) -> None:
        self._file, self._budget = file, budget

    def write(self, data: bytes) -> int:
        if len(data) > self._budget:
            self._file.write(bytes(data)[: self._budget])
            self._budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= len(data)
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()


def _fill_disk(monkeypatch, module: Any, name: str, nth: int, budget: int = 1000) -> None:
    """Make the `nth` (1-based) write of a file called `name` through `module`'s `open` hit a full disk."""
    real_open = open
    calls = {"n": 0}

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if ("w" in mode or "a" in mode) and (Path(file).name == name or Path(file).name.startswith(f".{name}.")):
            calls["n"] += 1
            if calls["n"] == nth:
                return _FullDisk(f, budget)
        return f

    monkeypatch.setattr(module, "open", opening, raising=False)


def _straight(tiny_cfg: DictConfig, data: BinarizedData, tmp_path: Path, epochs: int) -> dict[str, torch.Tensor]:
    _fit(tiny_cfg, data, tmp_path / "straight", max_epochs=epochs)
    return _params(tmp_path / "straight" / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_disk_full_writing_last_pt_says_so_and_its_advice_resumes_without_a_duplicate_epoch(
    tiny_cfg, data, tmp_path, monkeypatch
) -> None:
    import vae.files

    run = tmp_path / "run"
    _fill_disk(monkeypatch, vae.files, "last.pt", nth=2)  # epoch 2's last.pt
    with pytest.raises(CheckpointWriteError) as info:
        _fit(tiny_cfg, data, run, max_epochs=3)
    message = str(info.value)
    last = run / "checkpoints" / "last.pt"
    assert message.startswith(f"disk full: could not write {last}") and "\n" not in message
    assert f"trainer.resume=true hydra.run.dir={run}" in message and "trains epoch 2 again" in message
    assert info.value.errno == errno.ENOSPC
    assert _temporaries(run) == []
    assert _epochs(run) == [1]  # epoch 2's line went with its checkpoint
    assert load_checkpoint(last)["state"]["epoch"] == 1

    monkeypatch.undo()
    _fit(tiny_cfg, data, run, max_epochs=3, resume=True)  # the advice, followed
    assert _epochs(run) == [1, 2, 3]
    _assert_same(_params(last), _straight(tiny_cfg, data, tmp_path, 3))  # nothing lost, nothing trained twice


def test_disk_full_before_any_checkpoint_leaves_a_directory_the_advice_starts_over(
    tiny_cfg, data, tmp_path, monkeypatch
) -> None:
    import vae.files

    _fill_disk(monkeypatch, vae.files, "last.pt", nth=1)
    with pytest.raises(
        CheckpointWriteError, match=r"disk full: .*no checkpoint was written yet: it starts the run over"
    ):
        _fit(tiny_cfg, data, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() and not list((tmp_path / "checkpoints").glob("*"))
    monkeypatch.undo()
    _fit(tiny_cfg, data, tmp_path, resume=True)
    assert _epochs(tmp_path) == [1, 2]


@pytest.mark.slow
def test_disk_full_writing_best_pt_is_mended_by_the_resume_it_advises(tiny_cfg, data, tmp_path, monkeypatch) -> None:
    import vae.files

    run = tmp_path / "run"
    _fill_disk(monkeypatch, vae.files, "best.pt", nth=2)  # epoch 2 improves; its last.pt is written first
    with pytest.raises(CheckpointWriteError, match=r"disk full: could not write .*best.pt.*trainer.resume=true"):
        _fit(tiny_cfg, data, run, max_epochs=3)
    assert _temporaries(run) == [] and _epochs(run) == [1, 2]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["state"]["best_epoch"] == 1  # the write failed
    monkeypatch.undo()
    _, state = _fit(tiny_cfg, data, run, max_epochs=3, resume=True)  # best.pt is rewritten from last.pt
    assert _epochs(run) == [1, 2, 3] and state.best_epoch == 3
    assert load_checkpoint(run / "checkpoints" / "best.pt")["state"]["best_epoch"] == 3
    _assert_same(_params(run / "checkpoints" / "last.pt"), _straight(tiny_cfg, data, tmp_path, 3))


def test_disk_full_appending_metrics_leaves_no_torn_line(tiny_cfg, data, tmp_path, monkeypatch) -> None:
    import vae.trainer

    _fill_disk(monkeypatch, vae.trainer, "metrics.jsonl", nth=2, budget=20)
    with pytest.raises(CheckpointWriteError, match=r"disk full: could not write .*metrics.jsonl.*trains epoch 2 again"):
        _fit(tiny_cfg, data, tmp_path, max_epochs=3)
    assert _epochs(tmp_path) == [1]  # the 20 bytes of epoch 2's line were cut off again
    monkeypatch.undo()
    _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=True)
    assert _epochs(tmp_path) == [1, 2, 3]


def test_disk_full_after_a_resume_from_best_pt_advises_that_checkpoint_again(
    tiny_cfg, data, tmp_path, monkeypatch
) -> None:
    import vae.files

    _fit(tiny_cfg, data, tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()  # best.pt and metrics.jsonl only
    best = tmp_path / "checkpoints" / "best.pt"
    _fill_disk(monkeypatch, vae.files, "last.pt", nth=1)
    with pytest.raises(CheckpointWriteError, match=rf"continue with trainer.resume={best} "):
        _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=str(best))
    monkeypatch.undo()
    _fit(tiny_cfg, data, tmp_path, max_epochs=3, resume=str(best))
    assert _epochs(tmp_path) == [1, 2, 3]


def test_a_failed_atomic_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    import vae.files
    from vae.files import WriteError, write_atomically

    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    _fill_disk(monkeypatch, vae.files, "file.bin", nth=1, budget=3)
    with pytest.raises(WriteError, match=rf"^disk full: could not write {target}, [0-9.]+ MiB free there$"):
        write_atomically(target, lambda f: f.write(b"new content"))
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]

    def broken(f: Any) -> None:
        raise ValueError("the payload cannot be serialized")

    with pytest.raises(WriteError, match=rf"could not write {target}: the payload cannot be serialized"):
        write_atomically(target, broken)
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_killed_runs_temporary_checkpoint_is_removed_when_the_run_resumes(tiny_cfg, data, tmp_path) -> None:
    _fit(tiny_cfg, data, tmp_path, max_epochs=1)
    stale = tmp_path / "checkpoints" / ".last.pt.99999.tmp"
    stale.write_bytes(b"half a checkpoint")
    _fit(tiny_cfg, data, tmp_path, resume=True)
    assert not stale.exists() and _epochs(tmp_path) == [1, 2]


# ---- end to end, through train.py --------------------------------------------------------------


def _quick(cfg: DictConfig, **values) -> DictConfig:
    """`cfg` at two steps an epoch, no surgery, with `values` set."""
    return _set(cfg, **{"trainer.batch_size": BATCH, "surgery.enabled": False, **values})


@pytest.mark.slow
def test_train_py_trains_evaluates_and_resumes_through_the_trainer(tiny_cfg, tmp_path) -> None:
    cfg = _set(tiny_cfg, **{"trainer.max_epochs": 4})
    metrics = train(cfg, run_dir=tmp_path / "straight")
    lines = _lines(tmp_path / "straight")
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4] and metrics["steps"] == 4 * 14
    assert metrics["val_elbo"] == max(line["val_elbo"] for line in lines) and metrics["test_elbo"] < 0
    stored = load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["config"]["trainer"]
    assert stored["callbacks"] == DEFAULT_CALLBACKS  # recorded with the run

    train(_set(cfg, **{"trainer.max_steps": 20}), run_dir=tmp_path / "resumed")
    train(_set(cfg, **{"trainer.resume": True}), run_dir=tmp_path / "resumed")
    _assert_same(
        _params(tmp_path / "straight" / "checkpoints" / "last.pt"),
        _params(tmp_path / "resumed" / "checkpoints" / "last.pt"),
    )


@pytest.mark.slow
def test_a_resume_runs_the_optimizer_kernel_its_config_names(tiny_cfg, tmp_path) -> None:
    """A run written with Adam's loop resumes with the fused kernel, as its config asks, and the
    other way round; torch's load_state_dict alone would keep the checkpoint's choice."""
    for first, then in ((False, True), (True, False)):
        run_dir = tmp_path / f"from_{first}"
        train(_quick(tiny_cfg, **{"trainer.max_epochs": 1, "trainer.optimizer.fused": first}), run_dir=run_dir)
        resumed = {"trainer.max_epochs": 2, "trainer.resume": True, "trainer.optimizer.fused": then}
        train(_quick(tiny_cfg, **resumed), run_dir=run_dir)
        groups = load_checkpoint(run_dir / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
        assert [bool(group["fused"]) for group in groups] == [then] * len(groups)
        (line,) = [json.loads(x) for x in (run_dir / "resumes.jsonl").read_text().splitlines()]
        assert line["changed"] == {"trainer.max_epochs": [1, 2], "trainer.optimizer.fused": [first, then]}


@pytest.mark.slow
def test_a_refused_resume_writes_not_a_byte(tiny_cfg, tmp_path) -> None:
    train(_quick(tiny_cfg, **{"trainer.max_epochs": 2}), run_dir=tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    (tmp_path / ".lock").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(RunDirError, match="no checkpoints/last.pt"):
        train(_quick(tiny_cfg, **{"trainer.max_epochs": 3, "trainer.resume": True}), run_dir=tmp_path)
    assert _snapshot(tmp_path) == before  # not a byte written, not even the lock file


@pytest.mark.slow
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


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_compile_takes_auto_true_or_false(value: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.compile must be auto, true or false"):
        _trainer(tmp_path, compile=value)


def test_compile_auto_compiles_on_cuda_only(tmp_path: Path) -> None:
    assert not _trainer(tmp_path, compile="auto", device="cpu").compiles
    assert _trainer(tmp_path, compile="auto", device="cuda").compiles  # the device is only named, not used
    assert _trainer(tmp_path, compile=True, device="cpu").compiles
    assert not _trainer(tmp_path, compile=False, device="cuda").compiles


@pytest.mark.slow  # compiling the step takes tens of seconds on a CPU
def test_the_compiled_step_matches_the_eager_one(tiny_cfg, data, tmp_path) -> None:
    """Two epochs through the warm-up (a new KL weight every step), compiled and eager, from the
    same start: the same weights and metrics to float32 rounding."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model, state = _fit(tiny_cfg, data, tmp_path / str(compiled), compile=compiled, warmup_epochs=2)
        lines = [json.loads(line) for line in open(tmp_path / str(compiled) / "metrics.jsonl")]
        runs[compiled] = (model.state_dict(), lines, state)
    (eager, eager_lines, eager_state), (comp, comp_lines, comp_state) = runs[False], runs[True]
    assert comp_state.step == eager_state.step == 4
    for name, value in eager.items():
        torch.testing.assert_close(comp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(eager_lines, comp_lines, strict=True):
        for key in ("train_loss", "train_elbo", "val_elbo"):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
