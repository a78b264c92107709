"""The training loop shared by every prior.

`Trainer.fit` reads top to bottom: per epoch it draws the epoch's binarization and
order, lets the prior refresh itself, then loops over batches (loss, backward, step),
evaluates on the validation split, appends a line to `metrics.jsonl`, and writes
`checkpoints/last.pt` (and `best.pt` when the validation ELBO improved), each atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vae.data import BinarizedData, derive_seed
from vae.loggers import NullLogger
from vae.model import VAE

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    epoch: int = 0  # the epoch in progress (0-based)
    batch_in_epoch: int = 0  # batches of that epoch already done
    step: int = 0  # optimizer steps taken in all
    best_val_elbo: float = -math.inf
    best_epoch: int = -1
    bad_evals: int = 0  # validations since the last improvement


@dataclass
class EvalResult:
    """Mean per-point terms over a split, in nats."""

    elbo: float
    reconstruction: float
    kl: float


@torch.no_grad()
def evaluate(model: VAE, x: Tensor, batch_size: int = 1000, seed: int = 0) -> EvalResult:
    """One-sample ELBO over all of `x`, with its own seeded noise.

    The noise comes from a forked RNG, so evaluating does not disturb the training
    stream (a resumed run stays bit-identical) and the same model always scores the same.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # A stream of its own: seeding with `seed` itself would replay the draws that
        # initialized the model after `torch.manual_seed(seed)` (a mixture prior's means,
        # say) as evaluation noise.
        torch.manual_seed(derive_seed(seed, 300))
        for start in range(0, len(x), batch_size):
            terms = model.elbo_terms(x[start : start + batch_size].to(device))
            totals += torch.stack([terms.reconstruction.sum(), terms.kl.sum()]).double().cpu()
    model.train(was_training)
    recon, kl = (totals / len(x)).tolist()
    return EvalResult(elbo=recon - kl, reconstruction=recon, kl=kl)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same directory, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a priorlab checkpoint with `weights_only=True`, with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable priorlab checkpoint (truncated or foreign file?): {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a priorlab checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return payload


class Trainer:
    """Adam (or any `_partial_` optimizer) on the negative ELBO, with KL warm-up and early stopping.

    Args:
        optimizer: a callable taking the parameters (a Hydra `_partial_` node).
        batch_size: training batch size.
        max_epochs: epochs to train at most.
        max_steps: optimizer steps at most (None: no limit).
        warmup_epochs: the KL weight rises linearly from 0 to 1 over this many epochs.
        patience: stop after this many validations without a better validation ELBO, counted
            only once the KL warm-up has ended (during it the counter is held at 0).
        eval_batch_size: batch size of the validation pass.
        log_every_n_steps: how often the per-step loss goes to the logger and progress bar.
        resume: False; True to continue from `run_dir/checkpoints/last.pt` (if it
            exists; otherwise training starts fresh, as a preempted job's first try does);
            or a checkpoint path.
        progress: show a progress bar.
        run_dir: where `metrics.jsonl` and `checkpoints/` go.
        device: the torch device to train on.
        logger: a `vae.loggers` logger.
        seed: seeds the per-epoch order of the training set.
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.Adam, lr=1e-3),
        batch_size: int = 100,
        max_epochs: int = 10,
        max_steps: int | None = None,
        warmup_epochs: float = 0,
        patience: int = 10,
        eval_batch_size: int = 1000,
        log_every_n_steps: int = 50,
        resume: bool | str = False,
        progress: bool = True,
        run_dir: str | Path = ".",
        device: torch.device | str = "cpu",
        logger: Any = None,
        seed: int = 0,
    ) -> None:
        if batch_size <= 0 or max_epochs < 0 or patience <= 0 or warmup_epochs < 0:
            raise ValueError(
                f"Trainer: need batch_size > 0, max_epochs >= 0, patience > 0, warmup_epochs >= 0; got "
                f"{batch_size=}, {max_epochs=}, {patience=}, {warmup_epochs=}"
            )
        self.optimizer = optimizer
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.warmup_epochs = warmup_epochs
        self.patience = patience
        self.eval_batch_size = eval_batch_size
        self.log_every_n_steps = log_every_n_steps
        self.resume = resume
        self.progress = progress
        self.run_dir = Path(run_dir)
        self.device = torch.device(device)
        self.logger = logger or NullLogger()
        self.seed = seed
        self.last_path = self.run_dir / "checkpoints" / "last.pt"
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def fit(self, model: VAE, data: BinarizedData, run_config: dict[str, Any] | None = None) -> TrainState:
        """Train `model` on `data`; return the final `TrainState`.

        `run_config` (the resolved config) is stored in every checkpoint, so a checkpoint
        alone rebuilds its model.
        """
        model.to(self.device)
        optimizer = self.optimizer(model.parameters())
        state = self._maybe_resume(model, optimizer)
        n_train = len(data.grey["train"])
        steps_per_epoch = math.ceil(n_train / self.batch_size)
        warmup_steps = self.warmup_epochs * steps_per_epoch
        val_x = data.split("val")
        train_x = data.split("train")  # the training set as evaluation sees it, for on_train_epoch_end

        while state.epoch < self.max_epochs and not self._out_of_steps(state):
            started = time.perf_counter()
            x_epoch = data.train_epoch(state.epoch)
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(derive_seed(self.seed, 200, state.epoch)))
            if state.batch_in_epoch == 0:  # a resumed mid-epoch run restored the prior's state already
                model.prior.on_train_epoch_start(state.epoch, model.encoder, x_epoch)

            model.train()
            sums = torch.zeros(3, dtype=torch.float64)  # loss, reconstruction, kl
            n_seen = 0
            bar = tqdm(
                range(state.batch_in_epoch, steps_per_epoch),
                desc=f"epoch {state.epoch + 1}/{self.max_epochs}",
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            )
            for batch in bar:
                if self._out_of_steps(state):
                    break
                index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
                x = x_epoch[index].to(self.device, non_blocking=True)
                kl_weight = self._kl_weight(state.step + 1, warmup_steps)

                terms = model.elbo_terms(x, index.to(self.device))
                loss = -(terms.reconstruction - kl_weight * terms.kl).mean()
                if not torch.isfinite(loss):
                    bar.close()
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}, batch "
                        f"{batch + 1}); training stopped. The last good checkpoint is kept at {self.last_path}"
                        + ("" if self.last_path.exists() else " (none was written yet)")
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                state.step += 1
                state.batch_in_epoch = batch + 1
                sums += torch.stack([loss.detach() * len(x), terms.reconstruction.detach().sum(), terms.kl.detach().sum()]).double().cpu()
                n_seen += len(x)
                if state.step % self.log_every_n_steps == 0:
                    elbo = (sums[1] - sums[2]).item() / n_seen
                    bar.set_postfix(loss=f"{sums[0].item() / n_seen:.2f}", elbo=f"{elbo:.2f}")
                    self.logger.log({"train/loss": loss.item(), "train/kl_weight": kl_weight}, step=state.step)
            bar.close()

            epoch_done = state.batch_in_epoch == steps_per_epoch
            if epoch_done:  # a mid-epoch stop keeps the epoch's state, so a resumed run continues it exactly
                model.prior.on_train_epoch_end(state.epoch, model.encoder, train_x)
            val = evaluate(model, val_x, self.eval_batch_size, seed=self.seed)
            improved = val.elbo > state.best_val_elbo
            if improved:
                state.best_val_elbo, state.best_epoch, state.bad_evals = val.elbo, state.epoch + 1, 0
            elif self._kl_weight(state.step, warmup_steps) < 1.0:  # the objective still moves: patience waits
                state.bad_evals = 0
            else:
                state.bad_evals += 1
            record = {
                "epoch": state.epoch + 1,
                "step": state.step,
                "complete_epoch": epoch_done,
                "train_loss": sums[0].item() / max(n_seen, 1),
                "train_elbo": (sums[1] - sums[2]).item() / max(n_seen, 1),
                "train_reconstruction": sums[1].item() / max(n_seen, 1),
                "train_kl": sums[2].item() / max(n_seen, 1),
                "val_elbo": val.elbo,
                "val_reconstruction": val.reconstruction,
                "val_kl": val.kl,
                "kl_weight": kl_weight if n_seen else None,
                "seconds": time.perf_counter() - started,
            }
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            self._append_metrics(record)
            self.logger.log({f"epoch/{k}": v for k, v in record.items() if isinstance(v, (int, float))}, step=state.step)
            log.info(
                "epoch %d: train ELBO %.2f, val ELBO %.2f%s (%.1fs)",
                record["epoch"], record["train_elbo"], val.elbo, " (best)" if improved else "", record["seconds"],
            )

            payload = self._checkpoint(model, optimizer, state, run_config or {})
            if improved:
                save_checkpoint(self.best_path, payload)
            save_checkpoint(self.last_path, payload)
            if state.bad_evals >= self.patience:
                log.info("early stopping: no better validation ELBO for %d epochs", self.patience)
                break
        return state

    # ---- pieces of the loop --------------------------------------------------------

    @staticmethod
    def _kl_weight(step: int, warmup_steps: float) -> float:
        """The KL weight of optimizer step `step` (1-based): linear from 0 to 1 over the warm-up."""
        return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0

    def _out_of_steps(self, state: TrainState) -> bool:
        return self.max_steps is not None and state.step >= self.max_steps

    def _checkpoint(
        self, model: VAE, optimizer: torch.optim.Optimizer, state: TrainState, run_config: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),  # encoder, decoder and the prior's state under "prior."
            "optimizer": optimizer.state_dict(),
            "state": asdict(state),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "config": run_config,
        }

    def _maybe_resume(self, model: VAE, optimizer: torch.optim.Optimizer) -> TrainState:
        if self.resume is False or self.resume is None:
            return TrainState()
        path = self.last_path if self.resume is True else Path(self.resume)
        if self.resume is True and not path.exists():
            log.info("resume: %s does not exist yet, starting fresh", path)
            return TrainState()
        payload = load_checkpoint(path, map_location=self.device)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng_cpu"].cpu())
        if payload["rng_cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(payload["rng_cuda"].cpu(), self.device)
        state = TrainState(**payload["state"])
        self._drop_metrics_after(state.step)
        log.info("resumed from %s at epoch %d, step %d", path, state.epoch + 1, state.step)
        return state

    def _drop_metrics_after(self, step: int) -> None:
        """Keep only the metrics lines the checkpoint has seen.

        Lines are appended before `last.pt` is written, so a kill between the two leaves a
        line for an epoch the resumed run trains again; it is dropped here (atomically), so
        metrics.jsonl never holds an epoch twice. A torn last line is dropped as well.
        """
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
