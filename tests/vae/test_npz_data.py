"""`data=npz`: your own data set from a .npz file, its splits, value conventions and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from vae.data import DataError, npz
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def digits_uint8() -> np.ndarray:
    """The 8x8 digits as [n, 8, 8] uint8 images, 0-255."""
    return (load_digits().images * (255 / 16)).round().astype(np.uint8)


def test_a_lone_train_array_of_uint8_images_is_split_and_scaled(tmp_path):
    images = digits_uint8()
    np.savez(tmp_path / "d.npz", train=images)
    data = npz(str(tmp_path / "d.npz"), val_fraction=0.1, test_fraction=0.2, seed=3)
    sizes = {s: len(data.grey[s]) for s in ("train", "val", "test")}
    assert sizes == {"val": 180, "test": 359, "train": 1797 - 180 - 359}
    assert data.image_shape == (8, 8) and data.data_dim == 64 and data.dynamic
    everything = torch.cat([data.grey[s] for s in ("train", "val", "test")])
    expected = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)

    # a permutation of the rows: the same multiset of images
    def rows(x):
        return sorted(map(tuple, (x * 255).round().to(torch.int64).tolist()))

    assert rows(everything) == rows(expected) and everything.max() <= 1
    again = npz(str(tmp_path / "d.npz"), val_fraction=0.1, test_fraction=0.2, seed=3)
    assert torch.equal(again.grey["val"], data.grey["val"])  # a fixed seed


def test_three_splits_of_flat_binary_rows(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {s: (rng.random((n, 12)) > 0.5) for s, n in (("train", 30), ("val", 5), ("test", 6))}
    np.savez(tmp_path / "b.npz", **arrays)
    data = npz(str(tmp_path / "b.npz"), binarize="none", image_shape=[3, 4])
    assert data.image_shape == (3, 4) and not data.dynamic
    for s, a in arrays.items():
        assert torch.equal(data.split(s), torch.from_numpy(a.astype(np.float32)))  # binary data stay as they are


@pytest.mark.parametrize(
    ("arrays", "options", "message"),
    [
        ({"train": np.full((10, 4), np.nan)}, {}, "holds NaN or infinite values"),
        ({"train": np.full((10, 4), 1.5)}, {}, "holds floats outside \\[0, 1\\]"),
        ({"train": np.full((10, 4), 300, dtype=np.int32)}, {}, "integers outside 0-255"),
        ({"train": np.zeros((10, 4)), "val": np.zeros((3, 4))}, {}, "not \\['test'\\]"),
        ({"val": np.zeros((3, 4))}, {}, "it needs a 'train' array"),
        ({"train": np.zeros((10, 4)), "val": np.zeros((3, 5)), "test": np.zeros((3, 4))}, {}, "pixel shapes differ"),
        (
            {"train": np.zeros((10, 4)), "val": np.zeros((1, 4)), "test": np.zeros((3, 4))},
            {},
            "split 'val' has 1 point",
        ),
        ({"train": np.zeros((5, 4))}, {}, "cannot be split"),
        ({"train": np.full((30, 4), 0.5)}, {"binarize": "none"}, "needs binary data"),
        ({"train": np.zeros((10, 4))}, {"image_shape": [3, 3]}, "does not hold 4 pixels"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, arrays, options, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises((DataError, ConfigError), match=message):
        npz(str(tmp_path / "bad.npz"), **options)


def test_a_pickled_object_array_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", train=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(DataError, match="not a readable .npz file of plain arrays"):
        npz(str(tmp_path / "obj.npz"))


def test_trains_on_a_generated_file_through_train_py(tmp_path):
    np.savez(tmp_path / "digits.npz", train=digits_uint8())
    done = subprocess.run(
        [
            sys.executable,
            "train.py",
            "data=npz",
            f"data.path={tmp_path / 'digits.npz'}",
            "logger=none",
            "device=cpu",
            "vae.latent_dim=2",
            "vae.hidden_dims=[16]",
            "trainer.max_epochs=2",
            "trainer.progress=false",
            "surgery.is_samples=10",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test ELBO" in done.stdout
    for name in ("samples.png", "reconstructions.png", "surgery.json"):
        assert (tmp_path / "run" / name).is_file(), name

    # The data file moved (another machine, say): the checkpoint loads with data_path.
    from vae.checkpoint import load_model

    moved = tmp_path / "elsewhere.npz"
    (tmp_path / "digits.npz").rename(moved)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(DataError, match="digits.npz.*pass data_path="):
        load_model(best)
    model, data, run_cfg = load_model(best, data_path=moved)
    assert run_cfg.data.path == str(moved) and data.split("test").shape[1] == 64
    stored = torch.load(best, weights_only=True)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
