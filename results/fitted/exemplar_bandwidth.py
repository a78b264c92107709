"""How good can a kernel density estimate on the training means be, as a prior fitted after training?

    python results/fitted/exemplar_bandwidth.py [CHECKPOINT]

On a trained model (default: the converged b / 255 z = 40 Gaussian), the exemplar prior with
its encoder frozen is p(z) = 1/N sum_n N(z; mu(x_n), diag(sigma^2)) over the N training
means. For a grid of shared variances sigma^2 (and of variances on the active dimensions only,
the collapsed ones kept at 1), prints the mean log p(z) at one draw z ~ q(z|x) per validation
point, minus the N(0, I) prior's at the same draws, with its paired standard error. It is the
criterion the fit early-stops on (`python -m priors.fit`), scanned directly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lab.checkpoint import load_model  # noqa: E402
from priors.densities import DiagonalGaussianMixture  # noqa: E402
from vae.callbacks import encode  # noqa: E402

DEFAULT = "results/literature/runs/lit_z40_gaussian_byte255/checkpoints/best.pt"


def main() -> None:
    checkpoint = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    model, data, _ = load_model(checkpoint)
    model.eval()
    means, _ = encode(model.encoder, data.split("train"), 1000, torch.device("cpu"))
    with torch.no_grad():
        mu, logvar = model.encoder(data.split("val"))
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
        gauss = (-0.5 * (z.square() + math.log(2 * math.pi))).sum(-1).double()
    print(f"{checkpoint}: {len(means)} training means, {len(z)} validation draws, D = {z.shape[1]}")
    print(f"N(0, I) prior: mean validation log p(z) {gauss.mean().item():.3f}")

    def versus_gaussian(logvar: torch.Tensor) -> str:
        mixture = DiagonalGaussianMixture(means, logvar.expand_as(means).contiguous(), small_components=0)
        with torch.no_grad():
            diff = mixture.log_prob(z, out_dtype=torch.float64) - gauss
        return f"{diff.mean().item():+.3f} +- {diff.std().item() / math.sqrt(len(diff)):.3f}"

    for var in (0.2, 0.4, 0.6, 0.79, 1.0, 1.3, 1.7, 2.2, 3.0):
        print(f"shared sigma^2 = {var:.2f}: minus N(0, I) {versus_gaussian(torch.full((1,), math.log(var)))}")
    spread = means.var(0)
    active = spread > 0.1
    print(
        f"active dimensions (variance of the means > 0.1): {int(active.sum())}, "
        f"{spread[active].min():.3f}-{spread[active].max():.3f}; collapsed: {int((~active).sum())}, "
        f"at most {spread[~active].max():.4f}"
    )
    for var in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8):
        logvar = torch.where(active, math.log(var), 0.0)
        print(f"sigma^2 = {var:.2f} on the active dimensions, 1 elsewhere: minus N(0, I) {versus_gaussian(logvar)}")


if __name__ == "__main__":
    main()
