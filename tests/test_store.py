"""Task files: bit-exact round trips, size, and clear errors on damaged or foreign files."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_tiny
from test_model import train_steps

import piggyback
from piggyback import (
    BackboneMismatchError,
    ConfigError,
    MaskConfig,
    PiggybackModel,
    TaskFileError,
    TaskFileNotFoundError,
    read_task_file,
)


@pytest.fixture
def trained(images: torch.Tensor) -> PiggybackModel:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("a", 3, class_names=["x", "y", "z"])
    model.add_task("b", 5, train_bn=False)
    train_steps(model, "a", images)
    train_steps(model, "b", images)
    model.freeze_task("a")  # as `fit` leaves a task: what its file keeps
    model.freeze_task("b")
    return model


def test_round_trip_is_bit_exact(
    trained: PiggybackModel, images: torch.Tensor, tmp_path: Path
) -> None:
    paths = piggyback.save(trained, tmp_path)
    assert sorted(p.name for p in paths) == ["a.safetensors", "b.safetensors"]
    loaded = piggyback.load(tmp_path, make_tiny())
    # The files' config, selecting exactly the layers they mask (no file regex is matched).
    unselected = {"target_modules": None, "exclude_modules": None}
    assert replace(loaded.config, **unselected) == replace(trained.config, **unselected)
    assert loaded.config.target_modules == list(trained.masked_layers)
    assert loaded.tasks == ["a", "b"]
    assert loaded.task_info["a"].class_names == ["x", "y", "z"]
    for task in ("a", "b"):
        for name, mask in trained.masks(task).items():
            assert torch.equal(loaded.masks(task)[name], mask), (task, name)
        head_in, head_out = trained.head.heads[task], loaded.head.heads[task]
        for key, value in head_in.state_dict().items():
            assert torch.equal(head_out.state_dict()[key], value)
        trained.set_task(task)
        loaded.set_task(task)
        with torch.no_grad():
            assert torch.equal(loaded(images), trained(images))
    for layer, norm in trained.norms.items():
        for key, value in norm.norms["a"].state_dict().items():
            if value.is_floating_point():  # the batch counter is not stored
                assert torch.equal(loaded.norms[layer].norms["a"].state_dict()[key], value)
    assert not loaded.is_trainable("a")


def test_norms_store_only_what_differs_at_16_bits(trained: PiggybackModel, tmp_path: Path) -> None:
    layer, norm = next(iter(trained.norms.items()))
    with torch.no_grad():  # one layer's statistics back to the backbone's own
        norm.norms["a"].running_var.copy_(norm.base_layer.running_var)
    _, tensors = read_task_file(trained.save_task("a", tmp_path / "a"))
    norm_keys = [k for k in tensors if k.startswith("norm.")]
    assert norm_keys and all(tensors[k].dtype == torch.float16 for k in norm_keys)
    assert f"norm.{layer}.running_var" not in tensors
    assert f"norm.{layer}.running_mean" in tensors
    assert not any(k.endswith("num_batches_tracked") for k in norm_keys)
    loaded = PiggybackModel(make_tiny(), trained.config)
    loaded.load_task(tmp_path / "a.safetensors")
    assert torch.equal(loaded.norms[layer].norms["a"].running_var, norm.base_layer.running_var)


def test_file_costs_at_most_one_bit_per_weight(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PiggybackModel(torchvision.models.resnet18(num_classes=10))
    model.add_task("a", 10)
    with torch.no_grad():  # a mask that keeps ~half the weights: hard to compress
        for layer in model.masked_layers.values():
            layer.scores["a"].uniform_(0, 0.01)
    path = model.save_task("a", tmp_path / "a")
    assert path.suffix == ".safetensors"
    numel = sum(m.weight.numel() for m in model.masked_layers.values())
    head_bytes = sum(p.numel() * 4 for p in model.head.heads["a"].parameters())
    header_allowance = 16_384
    assert path.stat().st_size <= numel / 8 + head_bytes + header_allowance
    meta, _ = read_task_file(path)
    assert meta["mask"]["bits_per_weight"] <= 1.0
    assert 0.3 < meta["mask"]["kept"] < 0.7


def test_mostly_ones_mask_compresses_below_half_a_bit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PiggybackModel(torchvision.models.resnet18(num_classes=10))
    model.add_task("a", 10)
    with torch.no_grad():  # drop ~4% of the weights, as trained masks do
        for layer in model.masked_layers.values():
            drop = torch.rand_like(layer.scores["a"]) < 0.04
            layer.scores["a"].masked_fill_(drop, 0.0)
    masks = model.masks("a")
    path = model.save_task("a", tmp_path / "a.safetensors")
    meta, _ = read_task_file(path)
    assert 0.95 < meta["mask"]["kept"] < 0.97
    assert meta["mask"]["entropy_bits_per_weight"] < meta["mask"]["bits_per_weight"] < 0.5
    loaded = PiggybackModel(model.base)
    loaded.load_task(path)
    assert all(torch.equal(loaded.masks("a")[n], m) for n, m in masks.items())


def test_wrong_backbone_is_refused(trained: PiggybackModel, tmp_path: Path) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    other = PiggybackModel(make_tiny(seed=1), MaskConfig(train_bn=True))
    with pytest.raises(BackboneMismatchError, match="was made for backbone"):
        other.load_task(path)
    narrower = PiggybackModel(make_tiny(), MaskConfig(target_modules=["stem"]))
    with pytest.raises(BackboneMismatchError, match="masks other layers"):
        narrower.load_task(path)
    assert other.tasks == [] and narrower.tasks == []


def test_truncated_and_corrupt_files(trained: PiggybackModel, tmp_path: Path) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "header_only": data[:8],
        "empty": b"",
        "garbage": os.urandom(300),
        "flipped_tail": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
        with pytest.raises(TaskFileError):
            model.load_task(bad)
        assert model.tasks == [], name


def test_not_a_piggyback_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(TaskFileError, match="not a piggyback task file"):
        PiggybackModel(make_tiny()).load_task(path)
    with pytest.raises(TaskFileNotFoundError, match="does not exist"):
        PiggybackModel(make_tiny()).load_task(tmp_path / "missing.safetensors")
    with pytest.raises(TaskFileNotFoundError, match="does not exist"):
        piggyback.load(tmp_path / "missing_dir", make_tiny())
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskFileNotFoundError, match=r"no \.safetensors task files"):
        piggyback.load(tmp_path / "empty", make_tiny())


def rewrite_metadata(path: Path, **changes: object) -> None:
    """Edit a task file's JSON header and sign it again, as a forger would: what is
    then refused is refused by the field checks, not by the checksum."""
    from piggyback.store import write_task_file

    meta, tensors = read_task_file(path)
    write_task_file(path, {**meta, **changes}, tensors)


def test_newer_format_is_refused(trained: PiggybackModel, tmp_path: Path) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    rewrite_metadata(path, format_version=99)
    with pytest.raises(TaskFileError, match="format 99"):
        PiggybackModel(make_tiny(), MaskConfig(train_bn=True)).load_task(path)


@pytest.mark.parametrize(
    "changes", [{"task": 5}, {"class_names": "xyz"}, {"metadata": [1, 2]}, {"mask": {}}]
)
def test_crafted_metadata_is_refused_cleanly(
    trained: PiggybackModel, tmp_path: Path, changes: dict
) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    rewrite_metadata(path, **changes)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    with pytest.raises(TaskFileError):
        model.load_task(path)
    assert model.tasks == [] and all(not layer.tasks for layer in model.masked_layers.values())


def test_interrupted_save_keeps_the_old_file(
    trained: PiggybackModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    original = path.read_bytes()

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        trained.save_task("b", path)
    assert path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [path], "temporary file left behind"


def test_duplicate_name_and_rename(trained: PiggybackModel, tmp_path: Path) -> None:
    path = trained.save_task("a", tmp_path / "a.safetensors")
    with pytest.raises(ConfigError, match="already exists"):
        trained.load_task(path)
    assert trained.load_task(path, name="a2") == "a2"
    for name, mask in trained.masks("a").items():
        assert torch.equal(trained.masks("a2")[name], mask)
