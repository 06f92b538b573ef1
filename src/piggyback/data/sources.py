"""Where images come from: the source classes that read one raw image by index, and the
openers for image folders, CSV lists, torchvision datasets and Hugging Face datasets.

Image files (folder and CSV sources) are checked when the task is loaded; bad ones, and
ones past the size budget of `piggyback.images`, are left out with one warning, or raise
`DataError` with ``strict=True``.
"""

from __future__ import annotations

import csv
import difflib
import inspect
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..errors import DataError
from ..images import open_image, readable_images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff",
                    ".webp")  # fmt: skip
_CSV_HEADER_LABELS = {"label", "labels", "class", "target", "category"}
MAX_CLASSES = 100_000  # integer labels are class indices below this


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
        return _to_uint8(open_image(self.paths[index], f"image {self.paths[index]}"))

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


@dataclass
class _Opened:
    """A source as found: its own splits (val/test None when it has none) and class names."""

    class_names: list[str]
    train: _Source
    val: _Source | None = None
    test: _Source | None = None


def _checked_files(paths: list[Path], labels: list[int], strict: bool) -> _FileSource:
    """Leave out files PIL cannot open or that exceed `piggyback.images`' size budget,
    with one warning (or a DataError when strict)."""
    good, bad = readable_images(paths, strict=strict)
    if bad:
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) of {len(paths)}; first: {bad[0]}",
            stacklevel=5,  # the caller of load_task_data
        )
    return _FileSource([paths[i] for i in good], [labels[i] for i in good])


def _scan(root: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root/CLASS/`` (sorted, so the order is the same everywhere)."""
    class_dirs = _class_folders(root)
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
        files = _image_files(class_dir)
        paths += files
        labels += [classes.index(class_dir.name)] * len(files)
    if not paths:
        raise DataError(
            f"{root} holds no images in class folders; expected {root}/CLASS/IMAGE with one "
            f"of the extensions {IMAGE_EXTENSIONS}"
        )
    return paths, labels, classes


def _class_folders(root: Path) -> list[Path]:
    """The folders in `root`, sorted, but hidden ones."""
    _, names, _ = next(os.walk(root, onerror=_unlistable))
    return sorted(root / name for name in names if not name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, sorted. A subfolder that cannot be listed
    is an error: `Path.rglob` would skip it silently, as if the class had no images."""
    found = [
        Path(parent) / name
        for parent, _, names in os.walk(folder, onerror=_unlistable)
        for name in names
    ]
    return sorted(f for f in found if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())


def _unlistable(exc: OSError) -> NoReturn:
    raise DataError(
        f"cannot list the folder {exc.filename} ({exc.strerror}); give this user read "
        f"access to it (chmod -R u+rX {exc.filename}) or move it out of the dataset"
    ) from exc


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
    """Rows ``path,label``; relative paths are relative to the CSV's folder. Labels are
    class names, or class indices when every one is an integer (see `_index_classes`)."""
    rows = _csv_rows(path)
    if rows and len(rows[0][1]) > 1 and rows[0][1][1].strip().lower() in _CSV_HEADER_LABELS:
        rows = rows[1:]
    for line, row in rows:
        if len(row) != 2:
            raise DataError(f"{path}:{line}: expected 2 columns 'path,label', got {row}")
    files = [path.parent / row[0].strip() for _, row in rows]
    raw = [row[1].strip() for _, row in rows]
    if all(re.fullmatch(r"[-+]?\d+", label) for label in raw):
        where = lambda n: f"{path}:{rows[n][0]}"  # noqa: E731
        # past 19 characters no label is a class index (and int() refuses 4,300 digits)
        labels = [int(label) if len(label) <= 19 else _not_an_index(label, where(n))
                  for n, label in enumerate(raw)]  # fmt: skip
        classes = _index_classes(labels, where)
    else:
        classes = sorted(set(raw))
        if len(classes) > MAX_CLASSES:
            raise DataError(
                f"{path} names {len(classes):,} classes; at most {MAX_CLASSES:,} are supported "
                "(piggyback.data.MAX_CLASSES): is the label column the second one?"
            )
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[label] for label in raw]
    return _Opened(classes, _checked_files(files, labels, strict))


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a UTF-8 CSV file (a BOM, as Excel writes, is skipped), with
    their line numbers."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            return [
                (n, row) for n, row in enumerate(csv.reader(file), 1) if any(c.strip() for c in row)
            ]
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from exc
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KB limit
        raise DataError(f"{path} is not a readable CSV of 'path,label' rows: {exc}") from exc


def _not_an_index(label: object, where: str) -> NoReturn:
    shown = str(label) if len(str(label)) <= 40 else f"{str(label)[:40]}..."
    raise DataError(
        f"{where}: label {shown} is not a class index; integer labels must be in "
        f"0..{MAX_CLASSES - 1} (piggyback.data.MAX_CLASSES), or use class names"
    )


def _index_classes(labels: Sequence[int], where: Callable[[int], str]) -> list[str]:
    """Class names "0".."max" for labels that are class indices, each in
    ``[0, MAX_CLASSES)``: a label of 999999 would otherwise ask for a head of a million
    classes (4 GB of weights), and 10**30 for more memory than exists. `where(i)` names
    the i-th label's place in errors."""
    for position, label in enumerate(labels):
        if not 0 <= label < MAX_CLASSES:
            _not_an_index(label, where(position))
    return [str(i) for i in range(max(labels, default=-1) + 1)]


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
        _class_names(getattr(train, "classes", None), labels, source),
        _ItemSource(train, labels, 0),
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


def _class_names(names: Any, labels: np.ndarray, source: str) -> list[str]:
    """The dataset's own class names when they cover its labels, else the indices."""
    if isinstance(names, Sequence) and len(names) > int(labels.max(initial=-1)):
        return [str(n) for n in names]
    return _index_classes(labels.tolist(), lambda n: f"{source} item {n}")


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
    return _Opened(_class_names(names, sources[0].labels, f"hf:{path}"), *sources)
