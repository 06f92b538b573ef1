"""The built-in offline tasks: Fashion-MNIST (a Debian package), Animal-MNIST (a pip
package, read without running its code) and scikit-learn's digits."""

from __future__ import annotations

import gzip
import importlib.util
import math
import pickletools
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sources import _ArraySource, _Opened

BUILTIN_TASKS = ("fashion_mnist", "animals", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
# The package names its classes only in its description; this order (label 0..9) was
# checked by looking at the images.
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog",
                  "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]  # fmt: skip
# Every string a plain numpy ndarray pickle holds; anything else is not the expected file.
_NDARRAY_PICKLE_STRINGS = {"numpy.core.multiarray", "numpy._core.multiarray", "_reconstruct",
                           "numpy", "ndarray", "dtype", "u1", "i8", "<", "|"}  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) of uint8 values."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 IDX file (header {raw[:4].hex()})")
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    values = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if values.size != math.prod(shape):
        raise DataError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)


def _fashion_mnist() -> _Opened:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]  # fmt: skip
    paths = [FASHION_MNIST_DIR / f"{name}.gz" for name in names]
    if not all(p.is_file() for p in paths):
        raise DataError(
            f"Fashion-MNIST is not installed: {paths[0]} is missing; install it with "
            "`sudo apt-get install dataset-fashion-mnist`"
        )
    images, labels, test_images, test_labels = (_read_idx(p) for p in paths)
    return _Opened(
        class_names=list(FASHION_MNIST_CLASSES),
        train=_ArraySource(images, labels),
        test=_ArraySource(test_images, test_labels),
    )


def _read_pickled_array(path: Path, dtype: str, item_shape: tuple[int, ...]) -> np.ndarray:
    """The bytes of a gzipped, pickled numpy array, read from its opcodes: nothing is
    unpickled, so no code in the file can run."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    strings: list[str] = []
    payload = b""
    for _op, arg, _pos in pickletools.genops(raw):
        if isinstance(arg, str):
            strings.extend(arg.split())
        elif isinstance(arg, bytes) and len(arg) > len(payload):
            payload = arg
    item_bytes = np.dtype(dtype).itemsize * math.prod(item_shape)
    unexpected = set(strings) - _NDARRAY_PICKLE_STRINGS
    if unexpected or dtype.lstrip("<|") not in strings or not payload or len(payload) % item_bytes:
        raise DataError(
            f"{path} is not the pickled {dtype} array of animal-mnist 0.4 (found "
            f"{sorted(set(strings))[:8]}, {len(payload)} bytes); reinstall it with "
            "`pip install --no-deps animal-mnist==0.4`"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(-1, *item_shape)


def _animals() -> _Opened:
    # find_spec locates the package without running it (its modules import TensorFlow).
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "Animal-MNIST is not installed; install it with `pip install --no-deps animal-mnist`"
            " (--no-deps: its declared dependencies pull in TensorFlow, which is not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    images = _read_pickled_array(folder / "animal_data_version_3.gz", "|u1", (28, 28))
    labels = _read_pickled_array(folder / "animal_label_version_3.gz", "<i8", ())
    if len(images) != len(labels):
        raise DataError(f"{folder} holds {len(images)} images but {len(labels)} labels")
    return _Opened(list(ANIMAL_CLASSES), _ArraySource(images, labels))


def _digits() -> _Opened:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "the digits task needs scikit-learn; install it with `pip install scikit-learn`"
        ) from exc
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values are 0..16
    return _Opened([str(d) for d in range(10)], _ArraySource(images, digits.target))
