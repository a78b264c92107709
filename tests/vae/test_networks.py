"""Encoders and decoders: the gated architecture against its definition, and a user's own network plugged in."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch

from train import train
from vae import build_model
from vae.data import digits
from vae.networks import GatedDense, GatedMLPDecoder, GatedMLPEncoder


def test_gated_dense_is_the_product_of_a_linear_map_and_a_sigmoid_gate() -> None:
    torch.manual_seed(0)
    layer = GatedDense(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    W1, b1, W2, b2 = (p.detach() for p in (layer.h.weight, layer.h.bias, layer.g.weight, layer.g.bias))
    expected = torch.empty(4, 2, dtype=torch.float64)
    for n in range(4):
        for j in range(2):
            a = sum(W1[j, i] * x[n, i] for i in range(3)) + b1[j]
            g = sum(W2[j, i] * x[n, i] for i in range(3)) + b2[j]
            expected[n, j] = a / (1 + math.exp(-g))
    torch.testing.assert_close(layer(x), expected)


def test_gated_encoder_bounds_logvar_and_decoder_gives_logits() -> None:
    torch.manual_seed(0)
    enc, dec = GatedMLPEncoder(784, 40), GatedMLPDecoder(784, 40)
    mu, logvar = enc(torch.rand(500, 784) * 50)  # large inputs push logvar to its bounds
    assert mu.shape == logvar.shape == (500, 40)
    assert logvar.min() >= -6 and logvar.max() <= 2
    assert (logvar == 2).any() or (logvar == -6).any()
    assert dec(torch.randn(3, 7, 40)).shape == (3, 7, 784)
    # 784-300-300 gated: two linear maps per gated layer
    assert [tuple(m.weight.shape) for m in enc.body.modules() if isinstance(m, torch.nn.Linear)] == [
        (300, 784),
        (300, 784),
        (300, 300),
        (300, 300),
    ]


def test_weights_are_he_initialized() -> None:
    torch.manual_seed(0)
    enc = GatedMLPEncoder(784, 40)
    w = enc.body[0].h.weight  # 235,200 draws of N(0, 2/784)
    assert w.mean().abs() < 1e-3
    assert w.std().item() == pytest.approx(math.sqrt(2 / 784), rel=0.01)
    assert enc.mu.weight.std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.05)


OUTSIDE_ENCODER = '''
import torch
from torch import nn


class ConvEncoder(nn.Module):
    """A small convolutional encoder for square images, from outside priorlab's packages."""

    def __init__(self, data_dim, latent_dim, hidden_dims=(), channels=4):
        super().__init__()
        self.side = int(round(data_dim ** 0.5))
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(channels * data_dim, 2 * latent_dim)

    def forward(self, x):
        h = self.conv(x.reshape(-1, 1, self.side, self.side))
        mu, logvar = self.head(h).chunk(2, dim=-1)
        return mu, logvar
'''


@pytest.fixture
def outside_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(OUTSIDE_ENCODER))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mynets"
    sys.modules.pop("mynets", None)


@pytest.mark.slow
def test_an_encoder_from_outside_the_packages_plugs_in(compose, outside_package, tmp_path) -> None:
    cfg = compose(
        "data=digits",
        "logger=none",
        "device=cpu",
        "vae.latent_dim=3",
        "trainer.max_epochs=2",
        "trainer.batch_size=700",  # two steps an epoch
        "trainer.progress=false",
        "surgery.enabled=false",
        f"vae.encoder._target_={outside_package}.ConvEncoder",
        "+vae.encoder.channels=2",
    )
    model = build_model(cfg, digits())
    assert type(model.encoder).__name__ == "ConvEncoder" and model.encoder.conv[0].out_channels == 2
    metrics = train(cfg, run_dir=tmp_path)
    assert math.isfinite(metrics["test_elbo"]) and metrics["epochs"] == 2 and metrics["steps"] == 4
