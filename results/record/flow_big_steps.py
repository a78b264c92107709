"""Why the 10 x 256 MAF screen diverged: its loss terms at every step of epoch 1 (issue 26, item 4).

    OMP_NUM_THREADS=1 python results/record/flow_big_steps.py > results/record/flow_big_steps.txt
    OMP_NUM_THREADS=1 python results/record/flow_big_steps.py prior=flow_deep > results/record/flow_deep_steps.txt

Trains the screen's configuration (the recipe, seed 0; or the prior the arguments name,
as Hydra overrides) for one epoch through `train.train` in a temporary directory and prints,
for each training step, the batch mean of the reconstruction term and the batch mean and
maximum of the KL term (log q(z|x) - log p(z)), until the epoch ends or the trainer stops it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from vae.model import VAE  # noqa: E402

#: The screen's prior: nflows' MAF layers, 10 x 256, started at random.
SCREEN_PRIOR = ["prior=flow", "prior.num_layers=10", "prior.hidden_features=256"]
RECIPE = [
    "experiment=literature",
    "vae.latent_dim=40",
    "logger=none",
    "seed=0",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "surgery.enabled=false",
    "hydra.mode=RUN",
]


def main() -> None:
    overrides = RECIPE + (sys.argv[1:] or SCREEN_PRIOR)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    original = VAE.elbo_terms
    step = 0

    def printed(self, x, index=None):
        nonlocal step
        terms = original(self, x, index)
        if self.training:
            step += 1
            rec, kl = terms.reconstruction.detach(), terms.kl.detach()
            print(f"step {step:3d}  reconstruction {rec.mean():10.2f}  KL mean {kl.mean():10.4g}", end="")
            print(f"  KL max {kl.max():10.4g}")
        return terms

    VAE.elbo_terms = printed
    print("the overrides: " + " ".join(overrides))
    with tempfile.TemporaryDirectory() as run_dir:
        try:
            metrics = train.train(cfg, run_dir=Path(run_dir))
            print(f"epoch 1 ended: validation ELBO {metrics['val_elbo']:.2f} nats")
        except Exception as e:  # noqa: BLE001 (the stop is the result)
            print(f"stopped: {type(e).__name__}: {' '.join(str(e).split()).replace(run_dir + '/', '')}")


if __name__ == "__main__":
    main()
