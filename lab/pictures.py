"""Pictures of a trained VAE: samples from its prior and reconstructions of test images.

`train.py` saves both into every run directory whose data are images (`save_run_pictures`),
with the surgery on or off; `python -m lab.fit` does the same for a refitted prior, and
`lab.report` puts the samples of every run side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from surgery.plots import new_figure

SAMPLES_PICTURE = "samples.png"
RECONSTRUCTIONS_PICTURE = "reconstructions.png"


def _image_grid(images: Tensor, rows: int, cols: int, shape: tuple[int, int]) -> Tensor:
    """`[rows * cols, P]` images in [0, 1] tiled into one `[rows * (h + 1), cols * (w + 1)]` picture."""
    h, w = shape
    canvas = torch.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 0.3)  # light grey lines between images
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img.reshape(h, w)
    return canvas


def _save_picture(canvas: Tensor, path: Path, title: str) -> Path:
    fig = new_figure(max(3.0, canvas.shape[1] / 28), max(3.0, canvas.shape[0] / 28) + 0.4)
    ax = fig.subplots()
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


@torch.inference_mode()
def plot_samples(model, image_shape: tuple[int, int], path: str | Path, n: int = 64, seed: int = 0) -> Path:
    """`n` draws z ~ p(z) decoded to Bernoulli means, in a square grid."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        z = model.prior.sample(n)
    images = torch.sigmoid(model.decode(z.to(device))).float().cpu()
    model.train(was_training)
    cols = math.ceil(math.sqrt(n))
    return _save_picture(
        _image_grid(images, math.ceil(n / cols), cols, image_shape),
        Path(path),
        f"{n} samples from the prior ({type(model.prior).__name__}), Bernoulli means",
    )


@torch.inference_mode()
def plot_reconstructions(model, x: Tensor, image_shape: tuple[int, int], path: str | Path) -> Path:
    """Inputs (odd rows) above the Bernoulli means decoded from their posterior means (even rows)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mu, _ = model.encode(x.to(device))
    recon = torch.sigmoid(model.decode(mu)).float().cpu()
    model.train(was_training)
    cols = 8
    rows = math.ceil(len(x) / cols)
    pairs = []
    for r in range(rows):
        pairs += [x[r * cols : (r + 1) * cols].float().cpu(), recon[r * cols : (r + 1) * cols]]
    stacked = torch.cat([torch.cat([p, torch.zeros(cols - len(p), p.shape[1])]) for p in pairs])
    return _save_picture(
        _image_grid(stacked, 2 * rows, cols, image_shape),
        Path(path),
        "test images (rows 1, 3, ...) and their reconstructions (rows 2, 4, ...)",
    )


def save_run_pictures(model: Any, data: Any, out_dir: str | Path, logger: Any = None, seed: int = 0) -> dict[str, Path]:
    """`samples.png` (64 draws from the prior, decoded) and `reconstructions.png` (the first 32
    test images and their reconstructions) into `out_dir`, and to the logger as images.
    Nothing for data that are not images (`data.image_shape` None)."""
    if getattr(data, "image_shape", None) is None:
        return {}
    out_dir = Path(out_dir)
    files = {
        "samples": plot_samples(model, data.image_shape, out_dir / SAMPLES_PICTURE, seed=seed),
        "reconstructions": plot_reconstructions(
            model, data.split("test")[:32], data.image_shape, out_dir / RECONSTRUCTIONS_PICTURE
        ),
    }
    if logger is not None:
        for name, path in files.items():
            logger.image(f"pictures/{name}", path)
    return files
