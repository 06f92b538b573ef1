"""Task data: sources, seeded disjoint splits, item format, unreadable files, loaders."""

from __future__ import annotations

import errno
import gzip
import importlib.util
import os
import pickle
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_header
from PIL import Image

from piggyback import data
from piggyback.backbones import InputSpec
from piggyback.data import (
    BUILTIN_TASKS,
    TaskData,
    TaskDataset,
    builtin,
    image_transform,
    load_task_data,
    make_loader,
)
from piggyback.errors import ConfigError, DataError

SPEC = InputSpec(size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
# Class i of the tiny folders is a solid grey of this level: normalised it is (v/255-0.5)/0.25.
LEVELS = {"cat": 0, "dog": 255, "owl": 51}


def _images(root: Path, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            mode = "L" if i % 2 else "RGB"  # grey files must come out with 3 channels too
            colour = LEVELS[name] if mode == "L" else (LEVELS[name],) * 3
            Image.new(mode, (8, 8), colour).save(root / name / f"{i:02d}.png")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _images(tmp_path / "set", {"cat": 10, "dog": 10, "owl": 10})
    return tmp_path / "set"


def _paths(dataset: TaskDataset) -> list[str]:
    return [dataset.source.describe(int(i)) for i in dataset.indices]


def _splits(task: TaskData) -> list[list[str]]:
    return [_paths(task.train), _paths(task.val), _paths(task.test)]


def test_folder_items_are_normalised_rgb(folder: Path) -> None:
    task = load_task_data(folder, SPEC)
    assert task.class_names == ["cat", "dog", "owl"] and task.num_classes == 3
    for image, label in (task.train[i] for i in range(len(task.train))):
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        level = (LEVELS[task.class_names[label]] / 255 - 0.5) / 0.25
        torch.testing.assert_close(image, torch.full_like(image, level))


def test_image_transform_matches_dataset_items(folder: Path) -> None:
    """Prediction uses image_transform on PIL images: it must see what training saw."""
    task = load_task_data(folder, SPEC)
    path = _paths(task.train)[1]
    with Image.open(path) as image:
        torch.testing.assert_close(image_transform(SPEC)(image), task.train[1][0])


def test_image_transform_keeps_aspect_and_crops_the_long_side() -> None:
    image = Image.new("RGB", (48, 16), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 16, 16))  # the left third is cropped away
    out = image_transform(SPEC)(image)
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))


def test_image_transform_applies_crop_pct() -> None:
    """What a spec records is what is applied: crop_pct 0.5 keeps the central half."""
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    image.paste((0, 0, 0), (8, 8, 24, 24))  # a black centre square of half the side
    out = image_transform(replace(SPEC, crop_pct=0.5))(image)
    torch.testing.assert_close(out, torch.full_like(out, -2.0))
    assert image_transform(SPEC)(image).max() > 1.9, "crop_pct 1.0 keeps the white border"


def test_folder_split_is_seeded_disjoint_and_stratified(folder: Path) -> None:
    task = load_task_data(folder, SPEC, seed=3, val_fraction=0.2, test_fraction=0.2)
    train, val, test = _splits(task)
    assert (len(train), len(val), len(test)) == (18, 6, 6)
    assert len(set(train) | set(val) | set(test)) == 30
    for split in (task.val, task.test):
        assert np.bincount(split.labels).tolist() == [2, 2, 2]
    assert _splits(load_task_data(folder, SPEC, seed=3, val_fraction=0.2, test_fraction=0.2)) == [
        train,
        val,
        test,
    ]
    assert _splits(load_task_data(folder, SPEC, seed=4, val_fraction=0.2, test_fraction=0.2)) != [
        train,
        val,
        test,
    ]


def test_zero_fraction_gives_an_empty_split(folder: Path) -> None:
    task = load_task_data(folder, SPEC, val_fraction=0.0, test_fraction=0.5)
    assert (len(task.train), len(task.val), len(task.test)) == (15, 0, 15)


def test_folder_with_train_and_test_folders(tmp_path: Path) -> None:
    _images(tmp_path / "train", {"cat": 8, "dog": 8})
    _images(tmp_path / "test", {"cat": 3, "dog": 2})
    task = load_task_data(tmp_path, SPEC, val_fraction=0.25)
    assert len(task.test) == 5 and all("/test/" in p for p in _paths(task.test))
    assert (len(task.train), len(task.val)) == (12, 4)
    assert all("/train/" in p for p in _paths(task.train) + _paths(task.val))


def test_val_folder_with_a_class_train_lacks(tmp_path: Path) -> None:
    _images(tmp_path / "train", {"cat": 4, "dog": 4})
    _images(tmp_path / "val", {"owl": 2})
    with pytest.raises(DataError, match=r"class folders \['owl'\] that the train split lacks"):
        load_task_data(tmp_path, SPEC)


def test_limit_caps_each_split_within_the_full_split(folder: Path) -> None:
    full = load_task_data(folder, SPEC, val_fraction=0.3, test_fraction=0.3)
    capped = load_task_data(folder, SPEC, val_fraction=0.3, test_fraction=0.3, limit=8)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (8, 2, 2)
    for small, big in zip(_splits(capped), _splits(full), strict=True):
        assert set(small) <= set(big)


def test_augment_changes_train_only(folder: Path) -> None:
    task = load_task_data(folder, SPEC, augment=True)
    plain = load_task_data(folder, SPEC)
    assert task.train[0][0].shape == (3, 16, 16)
    assert task.train.transform is not task.val.transform
    assert task.val.transform is task.test.transform
    assert torch.equal(task.val[0][0], plain.val[0][0])


def test_csv_with_header_and_string_labels(folder: Path) -> None:
    rows = ["file,label"] + [f"{c}/{i:02d}.png,{c}" for c in ("owl", "cat") for i in range(5)]
    (folder / "list.csv").write_text("\n".join(rows) + "\n")
    task = load_task_data(folder / "list.csv", SPEC, val_fraction=0.2, test_fraction=0.2)
    assert task.class_names == ["cat", "owl"]
    assert len(task.train) + len(task.val) + len(task.test) == 10
    image, label = task.test[0]
    level = (LEVELS[task.class_names[label]] / 255 - 0.5) / 0.25
    torch.testing.assert_close(image, torch.full_like(image, level))


def test_csv_with_int_labels_and_absolute_paths(folder: Path, tmp_path: Path) -> None:
    rows = [f"{folder / c / f'{i:02d}.png'},{n}" for n, c in enumerate(LEVELS) for i in range(4)]
    (tmp_path / "abs.csv").write_text("\n".join(rows))
    task = load_task_data(tmp_path / "abs.csv", SPEC, val_fraction=0.25, test_fraction=0.25)
    assert task.class_names == ["0", "1", "2"]
    assert np.bincount(task.val.labels).tolist() == [1, 1, 1]


def test_csv_row_with_wrong_column_count(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("a.png,cat\nb.png\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: expected 2 columns"):
        load_task_data(tmp_path / "bad.csv", SPEC)


def test_csv_that_is_not_utf8(folder: Path) -> None:
    (folder / "latin.csv").write_bytes("cat/00.png,caf\xe9\ndog/00.png,th\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv is not UTF-8 text .*save it as UTF-8"):
        load_task_data(folder / "latin.csv", SPEC)


def test_csv_saved_with_a_byte_order_mark(folder: Path) -> None:
    """As Excel saves UTF-8: the mark is no part of the first row's path."""
    rows = [f"{c}/{i:02d}.png,{c}" for c in ("owl", "cat") for i in range(5)]
    (folder / "excel.csv").write_text("\n".join(rows), encoding="utf-8-sig")
    task = load_task_data(folder / "excel.csv", SPEC)
    assert len(task.train) + len(task.val) + len(task.test) == 10


@pytest.mark.parametrize("label", ["1" + "0" * 30, "-1", "999999"])
def test_csv_label_that_is_no_class_index(folder: Path, label: str) -> None:
    """A label of 999999 would build a million-class head: refused before, with the limit."""
    (folder / "ids.csv").write_text(f"cat/00.png,0\ndog/00.png,{label}\n")
    with pytest.raises(DataError, match=rf"ids\.csv:2: label {label} is not a class index") as info:
        load_task_data(folder / "ids.csv", SPEC)
    assert f"0..{data.MAX_CLASSES - 1}" in str(info.value)


def test_csv_label_of_5000_digits_or_an_oversized_field(folder: Path) -> None:
    (folder / "long.csv").write_text(f"cat/00.png,0\ndog/00.png,{'9' * 5000}\n")
    with pytest.raises(DataError, match=r"long\.csv:2: label 9+\.\.\. is not a class index"):
        load_task_data(folder / "long.csv", SPEC)
    (folder / "wide.csv").write_text(f"cat/00.png,{'x' * 200_000}\n")
    with pytest.raises(DataError, match=r"wide\.csv is not a readable CSV"):
        load_task_data(folder / "wide.csv", SPEC)


def test_csv_with_more_class_names_than_supported(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("piggyback.data.sources.MAX_CLASSES", 1)
    (folder / "names.csv").write_text("cat/00.png,cat\ndog/00.png,dog\n")
    with pytest.raises(DataError, match=r"names 2 classes; at most 1"):
        load_task_data(folder / "names.csv", SPEC)


def test_classes_without_training_images_warn(folder: Path) -> None:
    """Integer labels 1 and 5 are indices: classes 0, 2, 3, 4 exist but have no images."""
    rows = [f"{c}/{i:02d}.png,{n}" for c, n in (("cat", 1), ("dog", 5)) for i in range(5)]
    (folder / "gaps.csv").write_text("\n".join(rows))
    with pytest.warns(UserWarning, match=r"4 of the 6 classes .* no training images .*'0', '2'"):
        task = load_task_data(folder / "gaps.csv", SPEC)
    assert task.num_classes == 6


def test_corrupt_file_is_skipped_with_one_warning(folder: Path) -> None:
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "dog" / "broken.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 32; first: .*broken"):
        task = load_task_data(folder, SPEC)
    assert len(task.train) + len(task.val) + len(task.test) == 30


def test_corrupt_file_is_an_error_when_strict(folder: Path) -> None:
    (folder / "cat" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*leave out --strict"):
        load_task_data(folder, SPEC, strict=True)


def test_oversized_images_are_skipped_from_their_header(folder: Path) -> None:
    """A few bytes that declare a gigapixel image are refused before decoding."""
    (folder / "cat" / "bomb.png").write_bytes(png_header(20_000, 20_000))
    (folder / "dog" / "strip.png").write_bytes(png_header(100_000, 1))
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\) of 32; first: .*bomb"):
        task = load_task_data(folder, SPEC)
    assert len(task.train) + len(task.val) + len(task.test) == 30
    with pytest.raises(DataError, match=r"bomb\.png is too large.*leave out --strict"):
        load_task_data(folder, SPEC, strict=True)


def test_image_grown_after_loading_is_skipped(folder: Path) -> None:
    task = load_task_data(folder, SPEC, val_fraction=0.0, test_fraction=0.0)
    Path(_paths(task.train)[0]).write_bytes(png_header(100_000, 1))
    with pytest.warns(UserWarning, match=r"skipping unreadable image: image .* elongated"):
        assert task.train[0] is None
    with pytest.raises(DataError, match=r"elongated than 64:1; .*leave out --strict"):
        TaskDataset(task.train.source, task.train.indices, task.train.transform, strict=True)[0]


def test_file_lost_after_loading_is_dropped_from_its_batch(folder: Path) -> None:
    task = load_task_data(folder, SPEC, val_fraction=0.0, test_fraction=0.0)
    lost = _paths(task.train)[:3]
    for path in lost:
        os.remove(path)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(make_loader(task.train, batch_size=3, shuffle=False))
    assert task.train.skipped == 3
    assert len(batches) == len(task.train) // 3 - 1  # the all-lost first batch is gone
    assert sum(len(labels) for _, labels in batches) == 27
    assert task.train[0] is None
    with pytest.raises(DataError, match=r"image .*\.png does not exist"):
        TaskDataset(task.train.source, task.train.indices, task.train.transform, strict=True)[0]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"val_fraction": 1.0}, "val_fraction must be a number in [0, 1)"),
        ({"test_fraction": -0.1}, "test_fraction must be a number in [0, 1)"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum must be below 1"),
        ({"limit": 0}, "limit must be a positive int"),
        ({"seed": -1}, "seed must be an int >= 0"),
    ],
)
def test_bad_settings(folder: Path, kwargs: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_task_data(folder, SPEC, **kwargs)
    assert words in str(info.value)


def test_too_few_images_to_split(tmp_path: Path) -> None:
    _images(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="too few"):
        load_task_data(tmp_path, SPEC)


def test_single_class_is_an_error(tmp_path: Path) -> None:
    _images(tmp_path, {"cat": 4})
    with pytest.raises(DataError, match="at least 2"):
        load_task_data(tmp_path, SPEC)


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="holds no images in class folders"):
        load_task_data(tmp_path, SPEC)


def _deny_listing(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Listing `denied` fails as without read permission, which chmod cannot show when
    the tests run as root (root reads any folder)."""
    real = os.scandir

    def scandir(path: str = ".") -> object:
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("denied", ["dog", ""], ids=["class-folder", "root"])
def test_unlistable_folder_is_an_error_not_empty(
    folder: Path, denied: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deny_listing(monkeypatch, folder / denied)
    with pytest.raises(DataError) as info:
        load_task_data(folder, SPEC)
    assert f"cannot list the folder {folder / denied} (Permission denied)" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_folder_without_read_permission(folder: Path) -> None:
    (folder / "dog").chmod(0)
    try:
        with pytest.raises(DataError, match=r"dog \(Permission denied\)"):
            load_task_data(folder, SPEC)
    finally:
        (folder / "dog").chmod(0o755)


@pytest.mark.parametrize(
    ("source", "words"),
    [("digts", "did you mean 'digits'"), ("/no/such/dir", "not found"), ("x.txt", "expected")],
)
def test_unknown_source(source: str, words: str) -> None:
    with pytest.raises(DataError, match=words) as info:
        load_task_data(source, SPEC)
    assert "torchvision:NAME:ROOT" in str(info.value)


def test_loader_order_is_seeded(folder: Path) -> None:
    task = load_task_data(folder, SPEC, val_fraction=0.0, test_fraction=0.0)

    def order(seed: int) -> list[int]:
        loader = make_loader(task.train, batch_size=4, shuffle=True, seed=seed)
        return [int(y) for _, labels in loader for y in labels]

    assert order(1) == order(1)
    assert order(1) != order(2)
    with_workers = make_loader(task.train, batch_size=4, shuffle=True, seed=1, num_workers=2)
    assert [int(y) for _, labels in with_workers for y in labels] == order(1)
    assert sorted(order(1)) == sorted(task.train.labels.tolist())
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(task.train, batch_size=0, shuffle=False)


def _write_idx(path: Path, values: np.ndarray) -> None:
    header = bytes([0, 0, 8, values.ndim]) + b"".join(d.to_bytes(4, "big") for d in values.shape)
    path.write_bytes(header + values.astype(np.uint8).tobytes())


def test_torchvision_dataset_on_disk(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    task = load_task_data(f"torchvision:FashionMNIST:{tmp_path}", SPEC, val_fraction=0.25)
    assert task.class_names[0] == "T-shirt/top" and task.num_classes == 10
    assert (len(task.train), len(task.val), len(task.test)) == (30, 10, 10)
    assert task.test[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("torchvision:FashionMNIST:{tmp}", "not on disk"),
        ("torchvision:FashonMNIST:{tmp}", r"close matches: \['FashionMNIST'"),
        ("torchvision:FashionMNIST:", "names no folder"),
    ],
)
def test_torchvision_dataset_missing(tmp_path: Path, source: str, words: str) -> None:
    with pytest.raises(DataError, match=words):
        load_task_data(source.format(tmp=tmp_path), SPEC)


def test_huggingface_dataset_on_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    images = [Image.new("L", (8, 8), 255 * (i % 2)) for i in range(12)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])}
    )
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(12)]}, features=features
    )
    dataset.save_to_disk(str(tmp_path / "hf"))
    task = load_task_data(f"hf:{tmp_path / 'hf'}", SPEC, val_fraction=0.25, test_fraction=0.25)
    assert task.class_names == ["dark", "light"]
    image, label = task.train[0]
    assert image.shape == (3, 16, 16) and image.mean().item() == pytest.approx(4.0 * label - 2.0)


class _FakeHFDataset:
    """The slice of a `datasets.Dataset` that the loader uses: columns, rows, features."""

    def __init__(self, labels: list[int]) -> None:
        self.rows = [{"img": Image.new("L", (8, 8), 255 * y), "labels": y} for y in labels]
        self.column_names = ["img", "labels"]
        self.features = {"labels": types.SimpleNamespace(names=["dark", "light"])}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | str) -> object:
        return [row[key] for row in self.rows] if isinstance(key, str) else self.rows[key]


def test_huggingface_splits_and_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs without the datasets package: a stand-in with its DatasetDict layout."""
    fake = types.ModuleType("datasets")
    fake.DatasetDict = type("DatasetDict", (dict,), {})
    fake.load_from_disk = lambda path: fake.DatasetDict(
        train=_FakeHFDataset([0, 1] * 6), test=_FakeHFDataset([1, 0, 1])
    )
    monkeypatch.setitem(sys.modules, "datasets", fake)
    task = load_task_data("hf:/saved", SPEC, val_fraction=0.5)
    assert task.class_names == ["dark", "light"]
    assert (len(task.train), len(task.val), len(task.test)) == (6, 6, 3)
    assert task.test.labels.tolist() == [1, 0, 1]
    image, label = task.test[1]
    assert label == 0 and torch.equal(image, torch.full((3, 16, 16), -2.0))


def test_huggingface_needs_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_task_data("hf:/somewhere", SPEC)


def test_builtin_names() -> None:
    assert BUILTIN_TASKS == ("fashion_mnist", "animals", "digits")


def _check_builtin(task: TaskData, classes: int) -> None:
    assert task.num_classes == classes
    image, label = task.train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -2.0 and image.max() <= 2.0 and 0 <= label < classes
    assert torch.equal(image[0], image[2])  # grey source: equal channels
    assert len(set(_paths(task.val)) & set(_paths(task.test))) == 0


def test_digits() -> None:
    pytest.importorskip("sklearn")
    task = load_task_data("digits", SPEC)
    _check_builtin(task, 10)
    assert task.class_names == [str(d) for d in range(10)]
    assert (len(task.train), len(task.val), len(task.test)) == (1437, 180, 180)
    assert len(set(_paths(task.train)) | set(_paths(task.val)) | set(_paths(task.test))) == 1797


@pytest.mark.parametrize(
    "spec",
    [SPEC, InputSpec(20, (0.4,) * 3, (0.3,) * 3, "bicubic", crop_pct=0.875)],
    ids=["bilinear", "bicubic-crop"],
)
def test_in_memory_images_are_resized_once_to_the_same_inputs(
    spec: InputSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    kept = load_task_data("digits", spec, limit=300)
    monkeypatch.setattr(data.tasks, "RESIZE_ONCE_BYTES", 0)  # every item resized on access
    each = load_task_data("digits", spec, limit=300)
    plain = image_transform(spec)
    for fast, slow in zip(_datasets(kept), _datasets(each), strict=True):
        assert fast.resized is not None and slow.resized is None
        assert fast.resized.shape == (len(fast), 1, spec.size, spec.size)
        assert np.array_equal(fast.labels, slow.labels)
        for item in range(len(fast)):
            image, label = fast[item]
            assert torch.equal(image, slow[item][0]) and label == slow[item][1]
            assert torch.equal(image, plain(fast.source.read(int(fast.indices[item]))))


def test_random_crops_start_from_the_original_images() -> None:
    pytest.importorskip("sklearn")
    task = load_task_data("digits", SPEC, limit=40, augment=True)
    assert task.train.resized is None and task.val.resized is not None


def _datasets(task: TaskData) -> list[TaskDataset]:
    return [task.train, task.val, task.test]


def test_animals() -> None:
    if importlib.util.find_spec("animal_mnist") is None:
        pytest.skip("animal-mnist not installed: pip install --no-deps animal-mnist==0.4")
    task = load_task_data("animals", SPEC, limit=100)
    _check_builtin(task, 10)
    assert task.class_names[0] == "Bear" and task.class_names[-1] == "Zebra"
    assert len(task.train.source.labels) == 10_000
    assert np.bincount(task.train.source.labels).tolist() == [1000] * 10
    assert np.bincount(task.train.labels).tolist() == [10] * 10


def test_fashion_mnist() -> None:
    if not (data.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    task = load_task_data("fashion_mnist", SPEC, limit=200)
    _check_builtin(task, 10)
    assert task.class_names[0] == "T-shirt/top" and task.class_names[9] == "Ankle boot"
    assert len(task.test.source.labels) == 10_000  # its own test split
    assert len(task.train.source.labels) == 60_000
    assert (len(task.train), len(task.val), len(task.test)) == (200, 50, 50)


def test_builtins_not_installed_say_how(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="sudo apt-get install dataset-fashion-mnist"):
        load_task_data("fashion_mnist", SPEC)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "animal_mnist" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match="pip install --no-deps animal-mnist"):
        load_task_data("animals", SPEC)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_task_data("digits", SPEC)


class _RunsCode:
    """Unpickling this would run a command: the animal-mnist reader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_array_reader_runs_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.gz"
    with gzip.open(good, "wb") as file:
        pickle.dump(np.arange(6, dtype="<i8"), file, protocol=4)
    assert data._read_pickled_array(good, "<i8", ()).tolist() == list(range(6))
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as file:
        pickle.dump(_RunsCode(tmp_path / "ran"), file, protocol=4)
    with pytest.raises(DataError, match="not the pickled"):
        data._read_pickled_array(bad, "<i8", ())
    assert not (tmp_path / "ran").exists()
