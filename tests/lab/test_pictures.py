"""lab/pictures.py: the sample and reconstruction grids hold the decoded Bernoulli means where they belong, and
drawing them leaves the model and the random stream as they were."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lab.pictures as pictures
from lab.pictures import (
    RECONSTRUCTIONS_PICTURE,
    SAMPLES_PICTURE,
    plot_reconstructions,
    plot_samples,
    save_run_pictures,
)
from priors.gaussian import GaussianPrior
from vae.model import VAE

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_model() -> VAE:
    torch.manual_seed(0)
    return VAE.mlp(data_dim=6, latent_dim=2, hidden_dims=[5], prior=GaussianPrior(2))


@pytest.fixture
def canvases(monkeypatch) -> list[tuple[torch.Tensor, str]]:
    """The picture each call would draw, and its title, kept instead of rendered (rendering is matplotlib's)."""
    drawn: list[tuple[torch.Tensor, str]] = []

    def keep(canvas: torch.Tensor, path: Path, title: str) -> Path:
        drawn.append((canvas, title))
        return path

    monkeypatch.setattr(pictures, "_save_picture", keep)
    return drawn


def cell(canvas: torch.Tensor, row: int, col: int, shape: tuple[int, int]) -> torch.Tensor:
    h, w = shape
    return canvas[row * (h + 1) : row * (h + 1) + h, col * (w + 1) : col * (w + 1) + w]


def test_samples_are_the_decoded_prior_draws_of_the_seed_in_a_square_grid(canvases, tmp_path: Path) -> None:
    model = tiny_model().train()
    torch.manual_seed(123)
    stream = torch.get_rng_state()
    plot_samples(model, (2, 3), tmp_path / "s.png", n=5, seed=4)
    assert torch.equal(torch.get_rng_state(), stream)  # the caller's random stream is untouched
    assert model.training  # put back in training mode
    torch.manual_seed(4)
    want = torch.sigmoid(model.decode(model.prior.sample(5))).detach()
    ((canvas, title),) = canvases
    assert canvas.shape == (2 * 3 - 1, 3 * 4 - 1)  # 5 images: 2 rows of 3, one-pixel lines between
    for i in range(5):
        torch.testing.assert_close(cell(canvas, i // 3, i % 3, (2, 3)), want[i].reshape(2, 3))
    torch.testing.assert_close(cell(canvas, 1, 2, (2, 3)), torch.full((2, 3), 0.3))  # the empty sixth cell
    assert canvas[2].eq(0.3).all() and canvas[:, 3].eq(0.3).all()  # the grey lines
    assert "5 samples from the prior (GaussianPrior)" in title


def test_reconstructions_alternate_inputs_and_their_decoded_posterior_means(canvases, tmp_path: Path) -> None:
    model = tiny_model().eval()
    x = torch.rand(10, 6, generator=torch.Generator().manual_seed(1)).round()
    plot_reconstructions(model, x, (3, 2), tmp_path / "r.png")
    assert not model.training
    recon = torch.sigmoid(model.decode(model.encode(x)[0])).detach()
    ((canvas, _),) = canvases
    assert canvas.shape == (4 * 4 - 1, 8 * 3 - 1)  # 10 inputs: 2 rows of 8, each above its reconstructions
    for i in range(10):
        row, col = divmod(i, 8)
        torch.testing.assert_close(cell(canvas, 2 * row, col, (3, 2)), x[i].reshape(3, 2))
        torch.testing.assert_close(cell(canvas, 2 * row + 1, col, (3, 2)), recon[i].reshape(3, 2))
    torch.testing.assert_close(cell(canvas, 2, 2, (3, 2)), torch.zeros(3, 2))  # the row's empty places


class Images:
    image_shape = (2, 3)

    def split(self, name: str) -> torch.Tensor:
        assert name == "test"
        return torch.rand(40, 6, generator=torch.Generator().manual_seed(0)).round()


def test_a_run_saves_both_pngs_and_gives_them_to_the_logger(tmp_path: Path) -> None:
    logged = []
    logger = SimpleNamespace(image=lambda key, path: logged.append((key, path)))
    files = save_run_pictures(tiny_model(), Images(), tmp_path, logger=logger)
    assert files == {"samples": tmp_path / SAMPLES_PICTURE, "reconstructions": tmp_path / RECONSTRUCTIONS_PICTURE}
    for path in files.values():
        assert path.read_bytes()[:8] == PNG
    assert logged == [("pictures/samples", files["samples"]), ("pictures/reconstructions", files["reconstructions"])]


def test_data_that_are_not_images_get_no_pictures(tmp_path: Path) -> None:
    assert save_run_pictures(tiny_model(), SimpleNamespace(image_shape=None), tmp_path) == {}
    assert save_run_pictures(tiny_model(), object(), tmp_path) == {}
    assert list(tmp_path.iterdir()) == []
