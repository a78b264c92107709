"""`vae.callbacks`: the hooks the trainer calls (order, arguments), callbacks from the Hydra config,
and the training-set encodings reaching every consumer."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from omegaconf import open_dict
from torch import Tensor, nn

from lab.checkpoint import load_model
from lab.trust import UntrustedTargetError
from train import train
from vae import build_model, instantiate
from vae.callbacks import HOOKS, TrainingSetEncodings, consumers, encode
from vae.data import BinarizedData, digits
from vae.trainer import Trainer, load_checkpoint
from vae.validation import ConfigError

BATCH = 700  # two steps an epoch on the 1,397 training digits


@pytest.fixture(scope="module")
def data() -> BinarizedData:
    return digits()


class Recorder:
    """A user's callback with every hook: records (name, hook, epoch, step, what it was given)."""

    def __init__(self, name: str = "user", log: list | None = None) -> None:
        self.name = name
        self.events: list[tuple[Any, ...]] = [] if log is None else log

    def _note(self, hook: str, trainer: Any, model: Any, data: Any, state: Any, *extra: Any) -> None:
        self.events.append((self.name, hook, state.epoch, state.step, trainer, model, data, *extra))

    def on_fit_start(self, trainer, model, data, state) -> None:
        self._note("on_fit_start", trainer, model, data, state)

    def on_train_epoch_end(self, trainer, model, data, state) -> None:
        self._note("on_train_epoch_end", trainer, model, data, state)

    def on_validation_end(self, trainer, model, data, state, record) -> None:
        self._note("on_validation_end", trainer, model, data, state, record["epoch"])
        record[f"{self.name}_mark"] = float(record["epoch"])  # added numbers reach metrics.jsonl

    def on_fit_end(self, trainer, model, data, state) -> None:
        self._note("on_fit_end", trainer, model, data, state)


class ValidationOnly:
    """A callback with one hook: the trainer calls it and skips the hooks it lacks."""

    def __init__(self, log: list) -> None:
        self.log = log

    def on_validation_end(self, trainer, model, data, state, record) -> None:
        self.log.append(("validation only", "on_validation_end", state.epoch, state.step))


class Consumer(nn.Module):
    """An encoding consumer that is not a prior: counts what `TrainingSetEncodings` gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[Tensor, Tensor]] = []

    @property
    def needs_encodings(self) -> bool:
        return not self.received

    def update_encodings(self, mu: Tensor, logvar: Tensor) -> None:
        self.received.append((mu.clone(), logvar.clone()))


def _model(tiny_cfg: Any, data: BinarizedData, **prior: Any) -> Any:
    torch.manual_seed(0)
    cfg = tiny_cfg.copy()
    with open_dict(cfg):
        cfg.prior.update(prior)
    return build_model(cfg, data)


def test_hooks_are_called_in_order_with_their_arguments(tiny_cfg, data, tmp_path) -> None:
    log: list = []
    first, only = Recorder("first", log), ValidationOnly(log)
    model = _model(tiny_cfg, data)
    trainer = Trainer(batch_size=BATCH, max_epochs=2, progress=False, run_dir=tmp_path, callbacks=[first, only])
    trainer.fit(model, data)
    assert [e[:4] for e in log] == [
        ("first", "on_fit_start", 0, 0),
        ("first", "on_train_epoch_end", 0, 2),  # state.epoch: the epoch just trained, 0-based
        ("first", "on_validation_end", 0, 2),
        ("validation only", "on_validation_end", 0, 2),  # in the order given
        ("first", "on_train_epoch_end", 1, 4),
        ("first", "on_validation_end", 1, 4),
        ("validation only", "on_validation_end", 1, 4),
        ("first", "on_fit_end", 2, 4),
    ]
    mine = [e for e in log if e[0] == "first"]
    assert all(e[4] is trainer and e[5] is model and e[6] is data for e in mine)
    assert [e[7] for e in mine if e[1] == "on_validation_end"] == [1, 2]  # record["epoch"], 1-based
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["first_mark"] for line in lines] == [1.0, 2.0]


def test_a_stop_mid_epoch_validates_without_ending_the_epoch(tiny_cfg, data, tmp_path) -> None:
    recorder = Recorder()
    trainer = Trainer(
        batch_size=BATCH, max_steps=3, max_epochs=5, progress=False, run_dir=tmp_path, callbacks=[recorder]
    )
    trainer.fit(_model(tiny_cfg, data), data)
    hooks = [(e[1], e[2], e[3]) for e in recorder.events]
    assert hooks == [
        ("on_fit_start", 0, 0),
        ("on_train_epoch_end", 0, 2),
        ("on_validation_end", 0, 2),
        ("on_validation_end", 1, 3),  # epoch 2 stopped after its first step: no epoch end
        ("on_fit_end", 1, 3),
    ]


@pytest.mark.parametrize(
    ("callback", "message"),
    [
        (object(), r"trainer.callbacks\[0\] \(object\) has none of the trainer's hooks"),
        (type("Typo", (), {"on_epoch_end": lambda self, *a: None})(), r"\(Typo\) has on_epoch_end, which the trainer"),
        ({"batch_size": 10}, r"trainer.callbacks\[0\] must be a _target_ node or a callback"),
    ],
)
def test_a_callback_without_a_hook_or_with_a_misspelled_one_is_refused(tmp_path, callback, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(run_dir=tmp_path, callbacks=[callback])


@pytest.mark.slow
def test_a_users_callback_from_the_hydra_config_is_called_and_recorded(compose, tiny_overrides, tmp_path) -> None:
    callbacks = f"[{{_target_:vae.callbacks.TrainingSetEncodings}},{{_target_:{__name__}.Recorder,name:mine}}]"
    cfg = compose(*tiny_overrides, "trainer.batch_size=700", "surgery.enabled=false", f"trainer.callbacks={callbacks}")
    trainer = instantiate(cfg.trainer, run_dir=tmp_path / "direct", device="cpu", seed=0)
    encodings, mine = trainer.callbacks
    assert isinstance(encodings, TrainingSetEncodings) and isinstance(mine, Recorder) and mine.name == "mine"

    train(cfg, run_dir=tmp_path / "run")  # through train.py: its metrics lines carry the callback's numbers
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["mine_mark"] for line in lines] == [1.0, 2.0]
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["config"]["trainer"]["callbacks"][1]["_target_"] == f"{__name__}.Recorder"
    # The checkpoint records it, and the lab commands' loader refuses what is not priorlab's default callback.
    with pytest.raises(UntrustedTargetError, match=rf"'{__name__}.Recorder' at trainer.callbacks\[1\]"):
        load_model(best)


def test_the_encodings_reach_every_consumer_at_the_start_and_after_each_epoch(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data, _target_="priors.aggregate.AggregatePosteriorPrior")
    model.probe = Consumer()
    assert len(consumers(model)) == 2 and model.prior.needs_encodings
    Trainer(batch_size=BATCH, max_epochs=2, progress=False, run_dir=tmp_path).fit(model, data)
    assert len(model.probe.received) == 3  # at the start (it had none), then after each of two epochs
    mu, logvar = encode(model.encoder.eval(), data.split("train"), 1000, torch.device("cpu"))
    torch.testing.assert_close(model.probe.received[-1][0], mu, rtol=0, atol=0)
    torch.testing.assert_close(model.probe.received[-1][1], logvar, rtol=0, atol=0)
    torch.testing.assert_close(model.prior.mu, mu, rtol=0, atol=0)  # the final encoder's q(z)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    assert torch.equal(best["prior.mu"], mu)  # before validation and the checkpoint


def test_the_exemplar_prior_is_built_on_the_grey_levels_and_cached_from_them(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data, _target_="priors.exemplar.ExemplarPrior", _partial_=True, k=3)
    model.probe = Consumer()
    assert torch.equal(model.prior.encoding_inputs, data.grey["train"])  # the paper's exemplars, not a binarization
    assert not torch.equal(data.grey["train"], data.split("train"))
    Trainer(batch_size=BATCH, max_epochs=1, progress=False, run_dir=tmp_path).fit(model, data)
    encoder = model.encoder.eval()
    grey, _ = encode(encoder, data.grey["train"], 1000, torch.device("cpu"))
    binary = encode(encoder, data.split("train"), 1000, torch.device("cpu"))
    torch.testing.assert_close(model.prior.cache_mu, grey, rtol=0, atol=0)  # its own inputs' means
    torch.testing.assert_close(model.probe.received[-1][0], binary[0], rtol=0, atol=0)  # the others' unchanged
    assert not torch.allclose(grey, binary[0])


def test_each_distinct_input_set_is_encoded_once(data) -> None:
    sizes: list[int] = []
    model = nn.Module()
    model.encoder = _Sizes(nn.Linear(data.data_dim, 4), sizes)
    model.a, model.b, model.own = Consumer(), Consumer(), Consumer()
    model.own.encoding_inputs = data.grey["train"][:100]
    TrainingSetEncodings(batch_size=2000).refresh(model, data.split("train"), torch.device("cpu"))
    assert sorted(sizes) == [100, len(data.split("train"))]  # a and b share one pass; own gets its own
    assert torch.equal(model.a.received[0][0], model.b.received[0][0]) and len(model.own.received[0][0]) == 100


def test_with_the_encoder_frozen_the_encodings_are_given_once(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data, _target_="priors.mixture.MixturePrior", num_components=3)
    model.probe = Consumer()
    trainer = Trainer(batch_size=BATCH, max_epochs=2, progress=False, run_dir=tmp_path, freeze=["encoder"])
    trainer.fit(model, data)
    assert len(model.probe.received) == 1  # the frozen encoder's encodings cannot change


def test_the_callback_encodes_with_its_own_batch_size_or_the_trainers(data) -> None:
    sizes: list[int] = []
    model = nn.Module()
    model.encoder = _Sizes(nn.Linear(data.data_dim, 4), sizes)
    model.probe = Consumer()
    TrainingSetEncodings().refresh(model, data.split("train"), torch.device("cpu"), batch_size=500)
    TrainingSetEncodings(batch_size=1000).refresh(model, data.split("train"), torch.device("cpu"), batch_size=500)
    assert sizes == [500, 500, 397, 1000, 397] and len(model.probe.received) == 2
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainingSetEncodings(batch_size=0)
    assert set(HOOKS) >= {"on_fit_start", "on_train_epoch_end"}


class _Sizes(nn.Module):
    def __init__(self, encoder: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.encoder, self.sizes = encoder, sizes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.sizes.append(len(x))
        return self.encoder(x), torch.zeros(len(x), 4)


def test_a_resumed_run_whose_consumers_have_encodings_is_not_encoded_at_the_start(tiny_cfg, data, tmp_path) -> None:
    model = _model(tiny_cfg, data, _target_="priors.aggregate.AggregatePosteriorPrior")
    Trainer(batch_size=BATCH, max_epochs=1, progress=False, run_dir=tmp_path).fit(model, data)
    resumed = _model(tiny_cfg, data, _target_="priors.aggregate.AggregatePosteriorPrior")
    recorder = Recorder()
    calls: list[int] = []
    original = TrainingSetEncodings.refresh

    def counting(self, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrainingSetEncodings, "refresh", counting)
        trainer = Trainer(
            batch_size=BATCH,
            max_epochs=2,
            progress=False,
            run_dir=tmp_path,
            resume=True,
            callbacks=[TrainingSetEncodings(), recorder],
        )
        trainer.fit(resumed, data)
    assert len(calls) == 1  # after epoch 2 only: the checkpoint restored the prior's encodings
    assert recorder.events[0][1:4] == ("on_fit_start", 1, 2)  # after the resume restored the state
