"""A task's splits: `load_task_data` opens a source and splits it into `TaskDataset`s,
and `image_transform` turns images into model inputs (`piggyback.data.loaders` batches
them).

Splits are seeded and stratified: each class is shuffled and every split takes its share,
so a seed always gives the same disjoint splits. ``limit`` caps train at ``limit`` items
and val/test at ``max(1, limit // 4)``, taken from the full splits (stratified, seeded),
so a capped test set never holds training images.

Unreadable images: image files (folder and CSV sources) are checked when the task is
loaded; bad ones are left out with one warning (count and first path), or raise
`DataError` with ``strict=True``.
An image that still fails later yields ``None``, counted in ``dataset.skipped`` (per
process), and `make_loader` drops it from its batch, so an epoch never dies halfway.

Images held in memory (the built-in tasks) are resized to the training size once, when
the task is loaded, for each split that then takes at most `RESIZE_ONCE_BYTES` and whose
transform is not random: every epoch, and each norm pass, then skips the resize (about
as long as the rest of the transform). The pixels are those a resize per item gives.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..backbones import InputSpec
from ..errors import ConfigError, DataError
from ..images import unreadable
from .builtin import BUILTIN_TASKS, _animals, _digits, _fashion_mnist
from .sources import (
    _ArraySource,
    _csv,
    _folder,
    _huggingface,
    _Opened,
    _Source,
    _to_uint8,
    _torchvision,
)

RESIZE_ONCE_BYTES = 512 * 2**20  # the most a split's images may take once resized and kept


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


def _to_rgb(image: torch.Tensor) -> torch.Tensor:
    """Grey (1), grey+alpha (2) or RGBA (4) channels -> 3, as the backbones expect."""
    if image.shape[0] == 3:
        return image
    return image[:3] if image.shape[0] == 4 else image[:1].expand(3, -1, -1)


class TaskDataset(Dataset):
    """The items of one split: `indices` into a source, decoded and transformed on access.

    `resized`, when given, holds the split's images already at the training size (uint8
    ``[N, C, H, W]`` in the order of `indices`): `transform` then starts from those.
    """

    def __init__(
        self,
        source: _Source,
        indices: np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        strict: bool,
        resized: torch.Tensor | None = None,
    ) -> None:
        self.source, self.indices, self.transform, self.strict = source, indices, transform, strict
        self.resized = resized
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int] | None:
        index = int(self.indices[item])
        if self.resized is not None:
            return self.transform(self.resized[item]), int(self.source.labels[index])
        try:
            image = self.source.read(index)
        except Exception as exc:
            where = self.source.describe(index)
            # File sources say what is wrong themselves (`piggyback.images`).
            reason = exc if isinstance(exc, DataError) else f"cannot read image {where} ({exc})"
            if self.strict:
                raise unreadable(reason) from exc
            self.skipped += 1
            if self.skipped == 1:
                warnings.warn(
                    f"skipping unreadable image: {reason} (later ones are skipped without a "
                    "warning and counted in dataset.skipped)",
                    stacklevel=2,
                )
            return None
        return self.transform(image), int(self.source.labels[index])


def image_transform(spec: InputSpec, *, augment: bool = False) -> v2.Compose:
    """PIL image, array or uint8 tensor -> normalised float ``[3, size, size]``.

    Training, prediction and exports share it, so all see images the same way: the
    shorter side is resized to ``floor(spec.size / spec.crop_pct)`` and the centre cut to
    ``spec.size`` (the whole of a square image at `crop_pct` 1.0, what `input_spec` gives).
    `augment` swaps the resize for a RandomResizedCrop of 80-100% of the area; no flips,
    since digits and many silhouettes are orientation-sensitive.
    """
    return v2.Compose([_to_uint8, *_geometry(spec, augment), *_to_input(spec)])


def _geometry(spec: InputSpec, augment: bool) -> list[Any]:
    """uint8 image -> uint8 image at the training size."""
    mode = v2.InterpolationMode(spec.interpolation)
    if augment:
        return [
            v2.RandomResizedCrop(spec.size, scale=(0.8, 1.0), interpolation=mode, antialias=True)
        ]
    return [
        v2.Resize(math.floor(spec.size / spec.crop_pct), interpolation=mode, antialias=True),
        v2.CenterCrop(spec.size),
    ]


def _to_input(spec: InputSpec) -> list[Any]:
    """uint8 image at the training size -> the normalised float input."""
    return [_to_rgb, v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]


def _resized_once(source: _Source, indices: np.ndarray, spec: InputSpec) -> torch.Tensor | None:
    """The images of a split of an in-memory source at the training size, resized in
    batches (the same pixels as one by one); None for other sources, or past the budget."""
    if not isinstance(source, _ArraySource) or len(indices) * spec.size**2 > RESIZE_ONCE_BYTES:
        return None
    geometry = v2.Compose(_geometry(spec, augment=False))
    chunks = torch.as_tensor(indices, dtype=torch.long).split(1024)
    resized = [geometry(source.images[chunk].unsqueeze(1)) for chunk in chunks]
    return torch.cat(resized) if resized else None


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

    A CSV's labels are class names, or class indices when all are integers: then each
    must be in ``0..MAX_CLASSES - 1`` and the task has max + 1 classes, with a warning
    when some of them have no training images.
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
    plain, ready = image_transform(spec), v2.Compose(_to_input(spec))
    splits = {}
    for number, (name, (split_source, indices)) in enumerate(pools.items()):
        if limit is not None:
            cap = limit if name == "train" else max(1, limit // 4)
            indices = _cap(
                split_source.labels, indices, cap, np.random.default_rng([seed, 1 + number])
            )
        if augment and name == "train":  # random crops start from the original images
            transform, resized = image_transform(spec, augment=True), None
        else:
            resized = _resized_once(split_source, indices, spec)
            transform = plain if resized is None else ready
        splits[name] = TaskDataset(split_source, indices, transform, strict=strict, resized=resized)
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
    """At least 2 classes with images, every label a valid class index, and a warning
    for classes without training images (their outputs would never be trained)."""
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
    counts = np.bincount(labels, minlength=len(opened.class_names))
    missing = [name for name, count in zip(opened.class_names, counts, strict=True) if not count]
    if missing:
        warnings.warn(
            f"{len(missing)} of the {len(counts)} classes of {source!r} have no training "
            f"images (first: {missing[:5]}); the head still gets an output for each "
            "(integer labels are class indices counted from 0)",
            stacklevel=3,  # the caller of load_task_data
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


def source_path(source: str | Path) -> tuple[str, Path | None]:
    """(prefix, path): the local path a source names, after the prefix `_open` reads: a
    folder or CSV (no prefix), the root of ``torchvision:NAME:ROOT``, the folder of
    ``hf:PATH``; (the name, None) for a built-in task, which names no path."""
    text = str(source)
    if text in BUILTIN_TASKS:
        return text, None
    if text.startswith("hf:"):
        return "hf:", Path(text[3:]) if text[3:] else None
    if text.startswith("torchvision:"):
        name, _, root = text[len("torchvision:") :].partition(":")
        return f"torchvision:{name}:", Path(root) if root else None
    return "", Path(text)


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
