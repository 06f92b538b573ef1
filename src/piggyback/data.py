"""Task data: built-in offline benchmarks, image folders, CSV lists, torchvision and HF sets.

Every item is ``(image, label)``: a float32 ``[3, size, size]`` tensor normalised with the
backbone's `InputSpec`, and an int. Images stay uint8 at their own size until an item is
asked for; resizing one 28x28 image then costs about 45 µs, as much as normalising it, so
nothing is cached at the target size and memory does not grow with it.

Splits are seeded and stratified: each class is shuffled and every split takes its share,
so a seed always gives the same disjoint splits. ``limit`` caps train at ``limit`` items
and val/test at ``max(1, limit // 4)``, taken from the full splits (stratified, seeded),
so a capped test set never holds training images.

Unreadable images: image files (folder and CSV sources) are checked when the task is
loaded; bad ones are left out with one warning (count and first path), or raise
`DataError` with ``strict=True``.
An image that still fails later yields ``None``, counted in ``dataset.skipped`` (per
process), and `make_loader` drops it from its batch, so an epoch never dies halfway.

Example:
    >>> from piggyback.backbones import InputSpec
    >>> spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> task = load_task_data("digits", spec, limit=40)
    >>> task.num_classes, len(task.train), tuple(task.train[0][0].shape)
    (10, 40, (3, 32, 32))
"""

from __future__ import annotations

import csv
import difflib
import gzip
import importlib.util
import inspect
import math
import pickletools
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .backbones import InputSpec
from .errors import ConfigError, DataError

BUILTIN_TASKS = ("fashion_mnist", "animals", "digits")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
# The package names its classes only in its description; this order (label 0..9) was
# checked by looking at the images.
ANIMAL_CLASSES = ["Bear", "Bird", "Cat", "Cow", "Dog",
                  "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"]  # fmt: skip
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")  # fmt: skip
_CSV_HEADER_LABELS = {"label", "labels", "class", "target", "category"}
# Every string a plain numpy ndarray pickle holds; anything else is not the expected file.
_NDARRAY_PICKLE_STRINGS = {"numpy.core.multiarray", "numpy._core.multiarray", "_reconstruct",
                           "numpy", "ndarray", "dtype", "u1", "i8", "<", "|"}  # fmt: skip


@dataclass
class TaskData:
    """The splits of one task and its class names (label i is ``class_names[i]``).

    A split may be empty when its fraction is 0.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class _Source(Protocol):
    """Raw images by index: `read` gives uint8 ``[C, H, W]`` or raises."""

    labels: np.ndarray

    def read(self, index: int) -> torch.Tensor: ...

    def describe(self, index: int) -> str: ...


class _ArraySource:
    """Grey images held in memory as one uint8 ``[N, H, W]`` tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        # A copy: the IDX and pickle bytes are read-only buffers.
        self.images = torch.tensor(images, dtype=torch.uint8)
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, index: int) -> torch.Tensor:
        return self.images[index].unsqueeze(0)

    def describe(self, index: int) -> str:
        return f"item {index}"


class _FileSource:
    """Image files decoded with PIL on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return _to_uint8(image)

    def describe(self, index: int) -> str:
        return str(self.paths[index])


class _ItemSource:
    """Another library's dataset whose items hold the image under `key` (index or name)."""

    def __init__(self, dataset: Any, labels: np.ndarray, key: int | str) -> None:
        self.dataset, self.key = dataset, key
        self.labels = np.asarray(labels, dtype=np.int64)

    def read(self, index: int) -> torch.Tensor:
        return _to_uint8(self.dataset[index][self.key])

    def describe(self, index: int) -> str:
        return f"item {index} of {type(self.dataset).__name__}"


def _to_uint8(image: Any) -> torch.Tensor:
    """PIL image, array or tensor -> uint8 ``[C, H, W]``; grey stays one channel (cheaper)."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    tensor = TF.to_image(image).as_subclass(torch.Tensor)
    return tensor if tensor.dtype == torch.uint8 else TF.to_dtype(tensor, torch.uint8, scale=True)


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Grey (1), grey+alpha (2) or RGBA (4) channels -> 3, as the backbones expect."""
    if image.shape[0] == 3:
        return image
    return image[:3] if image.shape[0] == 4 else image[:1].expand(3, -1, -1)


class TaskDataset(Dataset):
    """The items of one split: `indices` into a source, decoded and transformed on access."""

    def __init__(
        self,
        source: _Source,
        indices: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        strict: bool,
    ) -> None:
        self.source, self.indices, self.transform, self.strict = source, indices, transform, strict
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | None:
        index = int(self.indices[item])
        try:
            image = self.source.read(index)
        except Exception as exc:
            where = self.source.describe(index)
            if self.strict:
                raise DataError(
                    f"cannot read image {where} ({exc}); fix or remove it, or pass "
                    "strict=False to skip unreadable images"
                ) from exc
            self.skipped += 1
            if self.skipped == 1:
                warnings.warn(
                    f"skipping unreadable image {where} ({exc}); dataset.skipped counts "
                    "the later ones",
                    stacklevel=2,
                )
            return None
        return self.transform(image), int(self.source.labels[index])


def image_transform(spec: InputSpec, *, augment: bool = False) -> v2.Compose:
    """PIL image, array or uint8 tensor -> normalised float ``[3, size, size]``.

    Training and prediction share it, so both see images the same way: the shorter side
    is resized to ``spec.size`` and the longer one centre-cropped, keeping the whole of a
    square image. `spec.crop_pct` (ImageNet's evaluation habit) is not applied: in the
    new tasks the object reaches the image's edges (digits, silhouettes, clothing).
    `augment` swaps the resize for a RandomResizedCrop of 80-100% of the area; no flips,
    since digits and many silhouettes are orientation-sensitive.
    """
    mode = v2.InterpolationMode(spec.interpolation)
    if augment:
        geometry: list[Any] = [
            v2.RandomResizedCrop(spec.size, scale=(0.8, 1.0), interpolation=mode, antialias=True)
        ]
    else:
        geometry = [
            v2.Resize(spec.size, interpolation=mode, antialias=True),
            v2.CenterCrop(spec.size),
        ]
    return v2.Compose(
        [
            _to_uint8,
            *geometry,
            _to_rgb,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


@dataclass
class _Opened:
    """A source as found: its own splits (val/test None when it has none) and class names."""

    class_names: list[str]
    train: _Source
    val: _Source | None = None
    test: _Source | None = None


def load_task_data(
    source: str | Path,
    spec: InputSpec,
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    limit: int | None = None,
    augment: bool = False,
    strict: bool = False,
) -> TaskData:
    """Open a task's data and split it: val/test are carved from train where the source
    has none (Fashion-MNIST brings its own test split, so `test_fraction` is unused there).

    `source` is a name in `BUILTIN_TASKS`, a folder (``CLASS/IMAGE`` or ``train/``,
    ``val/``, ``test/`` of those), a ``.csv`` of ``path,label`` rows,
    ``torchvision:NAME:ROOT`` (a torchvision dataset already on disk at ROOT) or
    ``hf:PATH`` (a Hugging Face dataset saved with ``save_to_disk``).
    """
    _check_settings(seed, val_fraction, test_fraction, limit)
    opened = _open(source, strict)
    _check_labels(opened, str(source))
    val_idx, test_idx, train_idx = _carve(
        opened.train.labels,
        [
            val_fraction if opened.val is None else 0.0,
            test_fraction if opened.test is None else 0.0,
        ],
        np.random.default_rng([seed, 0]),
    )
    pools = {
        "train": (opened.train, train_idx),
        "val": (opened.train, val_idx) if opened.val is None else _whole(opened.val),
        "test": (opened.train, test_idx) if opened.test is None else _whole(opened.test),
    }
    plain = image_transform(spec)
    splits = {}
    for number, (name, (split_source, indices)) in enumerate(pools.items()):
        if limit is not None:
            cap = limit if name == "train" else max(1, limit // 4)
            indices = _cap(
                split_source.labels, indices, cap, np.random.default_rng([seed, 1 + number])
            )
        transform = image_transform(spec, augment=True) if augment and name == "train" else plain
        splits[name] = TaskDataset(split_source, indices, transform, strict=strict)
    return TaskData(class_names=opened.class_names, **splits)


def _check_settings(
    seed: int, val_fraction: float, test_fraction: float, limit: int | None
) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing "
            "to train on; their sum must be below 1"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive int or None, got {limit!r}")


def _check_labels(opened: _Opened, source: str) -> None:
    """At least 2 classes with images, and every label a valid class index."""
    labels = opened.train.labels
    if len(labels) == 0:
        raise DataError(f"data source {source!r} holds no images")
    present = len(np.unique(labels))
    if len(opened.class_names) < 2 or present < 2:
        raise DataError(
            f"data source {source!r} has {present} class(es) with images (names: "
            f"{opened.class_names[:5]}); a classification task needs at least 2"
        )
    for split in (opened.train, opened.val, opened.test):
        if split is None or len(split.labels) == 0:
            continue
        if split.labels.min() < 0 or split.labels.max() >= len(opened.class_names):
            raise DataError(
                f"labels of {source!r} span {split.labels.min()}..{split.labels.max()}; "
                f"expected 0..{len(opened.class_names) - 1} for its classes"
            )


def _whole(source: _Source) -> tuple[_Source, np.ndarray]:
    return source, np.arange(len(source.labels))


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation in which every prefix holds each class in proportion."""
    perm = rng.permutation(len(labels))
    shuffled = labels[perm]
    counts = np.bincount(shuffled)
    by_class = np.argsort(shuffled, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(labels))
    rank[by_class] = np.arange(len(labels)) - starts[shuffled[by_class]]
    return perm[np.argsort((rank + 0.5) / counts[shuffled], kind="stable")]


def _carve(
    labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Split all items: one part per fraction (at least 1 item when > 0), then the rest."""
    order = _stratified_order(labels, rng)
    parts, start = [], 0
    for fraction in fractions:
        count = 0 if fraction == 0 else max(1, round(len(order) * fraction))
        parts.append(np.sort(order[start : start + count]))
        start += count
    if start >= len(order):
        raise DataError(
            f"{len(order)} images are too few to carve val/test fractions {list(fractions)} "
            "and keep some for training; add images or lower the fractions"
        )
    return [*parts, np.sort(order[start:])]


def _cap(labels: np.ndarray, indices: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    if len(indices) <= cap:
        return indices
    return np.sort(indices[_stratified_order(labels[indices], rng)[:cap]])


def _open(source: str | Path, strict: bool) -> _Opened:
    """Dispatch on the kind of source; the message lists every accepted kind."""
    text = str(source)
    if isinstance(source, str):
        if source in BUILTIN_TASKS:
            opener = {"fashion_mnist": _fashion_mnist, "animals": _animals, "digits": _digits}
            return opener[source]()
        if source.startswith("torchvision:"):
            return _torchvision(source)
        if source.startswith("hf:"):
            return _huggingface(source[3:])
    path = Path(source)
    if path.is_dir():
        return _folder(path, strict)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _csv(path, strict)
    close = difflib.get_close_matches(text, BUILTIN_TASKS, n=1)
    raise DataError(
        f"data source {text!r} is {'not a folder or .csv file' if path.exists() else 'not found'}"
        f"{f' (did you mean {close[0]!r}?)' if close else ''}; expected a built-in task "
        f"{BUILTIN_TASKS}, a folder of class folders, a .csv of path,label rows, "
        "'torchvision:NAME:ROOT' or 'hf:PATH'"
    )


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


def _checked_files(paths: list[Path], labels: list[int], strict: bool) -> _FileSource:
    """Leave out files PIL cannot open, with one warning (or a DataError when strict)."""
    good_paths, good_labels, bad = [], [], []
    for path, label in zip(paths, labels, strict=True):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            if strict:
                raise DataError(
                    f"cannot read image {path} ({exc}); fix or remove it, or pass strict=False "
                    "to skip unreadable images"
                ) from exc
            bad.append((path, exc))
            continue
        good_paths.append(path)
        good_labels.append(label)
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) of {len(paths)}; first: {bad[0][0]} "
            f"({bad[0][1]})",
            stacklevel=5,  # the caller of load_task_data
        )
    return _FileSource(good_paths, good_labels)


def _scan(root: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root/CLASS/`` (sorted, so the order is the same everywhere)."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = [p.name for p in class_dirs]
    if classes is None:
        classes = names
    elif set(names) - set(classes):
        raise DataError(
            f"{root} has class folders {sorted(set(names) - set(classes))} that the train "
            f"split lacks; its classes are {classes}"
        )
    paths, labels = [], []
    for class_dir in class_dirs:
        files = sorted(
            f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths += files
        labels += [classes.index(class_dir.name)] * len(files)
    if not paths:
        raise DataError(
            f"{root} holds no images in class folders; expected {root}/CLASS/IMAGE with one "
            f"of the extensions {IMAGE_EXTENSIONS}"
        )
    return paths, labels, classes


def _folder(root: Path, strict: bool) -> _Opened:
    if not (root / "train").is_dir():
        paths, labels, classes = _scan(root, None)
        return _Opened(classes, _checked_files(paths, labels, strict))
    paths, labels, classes = _scan(root / "train", None)
    opened = _Opened(classes, _checked_files(paths, labels, strict))
    for split, folder_names in (("val", ("val", "validation")), ("test", ("test",))):
        folder = next((root / n for n in folder_names if (root / n).is_dir()), None)
        if folder is not None:
            paths, labels, _ = _scan(folder, classes)
            setattr(opened, split, _checked_files(paths, labels, strict))
    return opened


def _csv(path: Path, strict: bool) -> _Opened:
    """Rows ``path,label``; relative paths are relative to the CSV's folder."""
    with path.open(newline="") as file:
        rows = [
            (n, row) for n, row in enumerate(csv.reader(file), 1) if any(c.strip() for c in row)
        ]
    if rows and len(rows[0][1]) > 1 and rows[0][1][1].strip().lower() in _CSV_HEADER_LABELS:
        rows = rows[1:]
    for line, row in rows:
        if len(row) != 2:
            raise DataError(f"{path}:{line}: expected 2 columns 'path,label', got {row}")
    files = [path.parent / row[0].strip() for _, row in rows]
    raw = [row[1].strip() for _, row in rows]
    if all(re.fullmatch(r"\d+", label) for label in raw):
        labels = [int(label) for label in raw]
        classes = [str(i) for i in range(max(labels, default=-1) + 1)]
    else:
        classes = sorted(set(raw))
        labels = [classes.index(label) for label in raw]
    return _Opened(classes, _checked_files(files, labels, strict))


def _torchvision(source: str) -> _Opened:
    """``torchvision:NAME:ROOT``: the dataset class's train split, and its test split if any."""
    _, name, root = [*source.split(":", 2), ""][:3]
    cls = getattr(torchvision.datasets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        close = difflib.get_close_matches(name, torchvision.datasets.__all__, n=3)
        raise DataError(
            f"{name!r} in {source!r} is not a dataset class of torchvision.datasets"
            f"{f' (close matches: {close})' if close else ''}; expected 'torchvision:NAME:ROOT'"
        )
    if not root:
        raise DataError(f"{source!r} names no folder; expected 'torchvision:{name}:ROOT'")
    params = inspect.signature(cls).parameters
    kwargs = {"download": False} if "download" in params else {}

    def make(split: str) -> Any:
        if "train" in params:
            return cls(root, train=split == "train", **kwargs)
        if "split" in params:
            return cls(root, split=split, **kwargs)
        if split != "train":
            raise ValueError("no test split")
        return cls(root, **kwargs)

    try:
        train = make("train")
    except Exception as exc:
        raise DataError(
            f"torchvision dataset {name} is not on disk under {root!r} ({exc}); put its files "
            "there (nothing is downloaded)"
        ) from exc
    try:
        test = make("test")
    except Exception:  # no test split, or not on disk: carve one from train
        test = None
    labels = _targets(train)
    opened = _Opened(
        _class_names(getattr(train, "classes", None), labels), _ItemSource(train, labels, 0)
    )
    if test is not None:
        opened.test = _ItemSource(test, _targets(test), 0)
    return opened


def _targets(dataset: Any) -> np.ndarray:
    """Labels without decoding images where the dataset keeps them in a list."""
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            return np.asarray(values, dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def _class_names(names: Any, labels: np.ndarray) -> list[str]:
    if isinstance(names, Sequence) and len(names) > int(labels.max(initial=-1)):
        return [str(n) for n in names]
    return [str(i) for i in range(int(labels.max(initial=-1)) + 1)]


def _huggingface(path: str) -> _Opened:
    """A dataset saved with ``save_to_disk``: image column "image"/"img", label "label"/"labels"."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"'hf:{path}' needs the datasets package; install it with `pip install datasets`"
        ) from exc
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(f"cannot load a Hugging Face dataset from {path!r} ({exc})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path!r} has splits {list(loaded)}; expected one named 'train'")
        splits = [loaded["train"], loaded.get("validation", loaded.get("val")), loaded.get("test")]
    else:
        splits = [loaded, None, None]
    columns = splits[0].column_names
    image_col = next((c for c in ("image", "img") if c in columns), None)
    label_col = next((c for c in ("label", "labels") if c in columns), None)
    if image_col is None or label_col is None:
        raise DataError(
            f"{path!r} has columns {columns}; expected an image column 'image' or 'img' and "
            "a label column 'label' or 'labels'"
        )
    sources = [
        None if s is None else _ItemSource(s, np.asarray(list(s[label_col])), image_col)
        for s in splits
    ]
    names = getattr(splits[0].features[label_col], "names", None)
    return _Opened(_class_names(names, sources[0].labels), *sources)


def _collate_present(batch: list[Any]) -> Any:
    """Collate the items that could be read; None when none could."""
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None


class _SkipEmptyLoader(DataLoader):
    """A DataLoader that never yields an empty batch (one whose every image failed)."""

    def __iter__(self) -> Any:
        for batch in super().__iter__():
            if batch is not None:
                yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling is seeded (same seed, same order of batches) and which
    drops unreadable (None) items instead of failing the epoch. A `sampler` (e.g. a
    DistributedSampler) sets the order instead of `shuffle`; `seed` still seeds workers."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return _SkipEmptyLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=_collate_present,
        drop_last=False,
    )
