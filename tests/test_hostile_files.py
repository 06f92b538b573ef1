"""Task files from strangers: every field checked before use, loads all or nothing,
the checksum covering the metadata too, and writes that survive kills and keep modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from test_model import train_steps
from test_store import rewrite_metadata

from piggyback import (
    BackboneMismatchError,
    ConfigError,
    MaskConfig,
    PiggybackModel,
    TaskFileError,
    read_task_file,
)
from piggyback.report import describe_task_file
from piggyback.store import remove_stale_temps, write_atomic, write_task_file
from piggyback.taskmeta import MAX_CLASSES, MAX_INPUT_SIZE


@pytest.fixture
def task_file(images: torch.Tensor, tmp_path: Path) -> Path:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("a", 3, class_names=["x", "y", "z"], metadata={"size": 8})
    train_steps(model, "a", images)
    model.freeze_task("a")
    return model.save_task("a", tmp_path / "a.safetensors")


def fresh() -> PiggybackModel:
    return PiggybackModel(make_tiny(), MaskConfig(train_bn=True))


def assert_untouched(model: PiggybackModel, keys: list[str]) -> None:
    assert model.tasks == [] and list(model.state_dict()) == keys
    assert all(not layer.tasks for layer in model.masked_layers.values())
    assert all(not norm.norms for norm in model.norms.values())


def edited(meta: dict, path: str, value: object) -> dict:
    """A deep copy of `meta` with the dotted `path` set to `value`."""
    meta = json.loads(json.dumps(meta))
    *parents, last = path.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return meta


BAD_FIELDS = {
    "huge input size": ("metadata.size", MAX_INPUT_SIZE + 1),
    "input size as text": ("metadata.size", "32"),
    "negative input size": ("metadata.size", -3),
    "huge class count": ("num_classes", 10**7),
    "class count past the limit": ("num_classes", MAX_CLASSES + 1),
    "class count as float": ("num_classes", 3.0),
    "overflowing class count": ("num_classes", 10**30),
    "infinite kept": ("mask.kept", float("inf")),
    "kept as text": ("mask.kept", "most"),
    "integer fingerprint": ("backbone.fingerprint", 12345),
    "short fingerprint": ("backbone.fingerprint", "abc"),
    "list as layer name": ("mask.layers.0.0", ["stem"]),
    "null config": ("config", None),
    "config with a bad threshold fn": ("config.threshold_fn", "sigmoid"),
    "huge declared mask": ("mask.numel", 10**12),
    "numel not the layers' sum": ("mask.numel", 1),
    "unknown codec": ("mask.codec", "gzip"),
    "unknown mask kind": ("mask.kind", "quaternary"),
    "class names of the wrong length": ("class_names", ["x"]),
    "class name as number": ("class_names.0", 7),
    "weights as number": ("metadata.weights", 5),
    "null task name": ("task", None),
    "input spec as text": ("metadata.input_spec", "x"),
    "input spec without channels": ("metadata.input_spec", {"size": 3}),
    "null kept": ("mask.kept", None),
    "calibration as text": ("metadata.calibration", "sure"),
    "calibration of 3 quantiles": (
        "metadata.calibration",
        {"quantiles": [0, 0.5, 1], "samples": 9},
    ),
    "calibration out of order": (
        "metadata.calibration",
        {"quantiles": [1 - i / 100 for i in range(101)], "samples": 9},
    ),
    "calibration above 1": ("metadata.calibration", {"quantiles": [2.0] * 101, "samples": 9}),
    "calibration of no images": ("metadata.calibration", {"quantiles": [0.5] * 101, "samples": 0}),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_each_bad_field_is_refused_by_name(task_file: Path, case: str) -> None:
    field, value = BAD_FIELDS[case]
    meta, tensors = read_task_file(task_file)
    write_task_file(task_file, edited(meta, field, value), tensors)
    model = fresh()
    keys = list(model.state_dict())
    last = field.split(".")[-1] if not field.split(".")[-1].isdigit() else field.split(".")[-2]
    with pytest.raises(TaskFileError, match=last):
        model.load_task(task_file)
    assert_untouched(model, keys)
    with pytest.raises(TaskFileError):
        describe_task_file(task_file)


def test_declared_layer_sizes_are_checked_before_any_allocation(task_file: Path) -> None:
    """A 1 KB file declaring 268 million weights (its numel agreeing) must be refused from
    the model's own shapes, at once, not after decoding a gigabyte."""
    meta, tensors = read_task_file(task_file)
    layers = meta["mask"]["layers"]
    layers[0][1] = [2**14, 2**14]  # 268 million weights
    meta["mask"]["numel"] = sum(int(torch.tensor(s).prod()) for _, s in layers)
    meta["mask"]["codec"] = "sparse-zstd"
    write_task_file(task_file, meta, tensors)
    start = time.perf_counter()
    with pytest.raises(BackboneMismatchError, match="masks other layers"):
        fresh().load_task(task_file)
    assert time.perf_counter() - start < 2.0


def test_deeply_nested_metadata_is_a_task_file_error(task_file: Path) -> None:
    header, tensors = _raw(task_file)
    nested = '{"format_version": 3, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _write_raw(task_file, {**header, "piggyback": nested}, tensors)
    with pytest.raises(TaskFileError, match="unreadable piggyback metadata"):
        fresh().load_task(task_file)


def test_one_flipped_bit_in_the_metadata_is_caught(task_file: Path) -> None:
    """The checksum covers the JSON header: class "y" turned into "x" is corruption."""
    header, tensors = _raw(task_file)
    assert '"y"' in header["piggyback"]
    _write_raw(
        task_file, {**header, "piggyback": header["piggyback"].replace('"y"', '"x"')}, tensors
    )
    with pytest.raises(TaskFileError, match="checksum"):
        fresh().load_task(task_file)


def test_format_2_files_still_load(task_file: Path) -> None:
    """Before format 3 the checksum covered the tensors only and lived in the metadata."""
    from piggyback.store import _checksum

    model = fresh()
    model.load_task(task_file)
    meta, tensors = read_task_file(task_file)
    old = task_file.with_name("old.safetensors")
    meta = {**meta, "format_version": 2, "checksum": _checksum(tensors)}
    _write_raw(old, {"format": "piggyback-task", "piggyback": json.dumps(meta)}, tensors)
    assert model.load_task(old, name="old") == "old"
    for layer, mask in model.masks("a").items():
        assert torch.equal(model.masks("old")[layer], mask)


@pytest.mark.parametrize("tensor", ["masks", "head.weight", "norm.bn.weight"])
def test_tensors_of_the_wrong_kind_or_shape_are_refused(task_file: Path, tensor: str) -> None:
    meta, tensors = read_task_file(task_file)
    assert tensor in tensors
    tensors[tensor] = torch.zeros(2, 2, dtype=torch.float16 if tensor == "masks" else torch.float32)
    write_task_file(task_file, meta, tensors)
    model = fresh()
    keys = list(model.state_dict())
    with pytest.raises(TaskFileError):
        model.load_task(task_file)
    assert_untouched(model, keys)


def test_unknown_tensors_are_refused(task_file: Path) -> None:
    meta, tensors = read_task_file(task_file)
    for extra in ("code", "norm.nowhere.weight"):
        write_task_file(task_file, meta, {**tensors, extra: torch.zeros(1)})
        with pytest.raises(TaskFileError, match=extra.split(".")[-1] if "." in extra else extra):
            fresh().load_task(task_file)


def test_a_load_failing_after_the_masks_are_stored_leaves_no_trace(
    task_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fresh()
    keys = list(model.state_dict())

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory while loading the head")

    monkeypatch.setattr(torch.nn.Linear, "load_state_dict", fail)
    with pytest.raises(RuntimeError):
        model.load_task(task_file)
    assert_untouched(model, keys)


def test_add_task_with_masks_is_atomic_and_checks_shapes() -> None:
    model = fresh()
    keys = list(model.state_dict())
    masks = {n: torch.ones_like(layer.weight) for n, layer in model.masked_layers.items()}
    last = list(masks)[-1]
    with pytest.raises(ConfigError, match="may only hold"):
        model.add_task("t", 2, masks={**masks, last: torch.full_like(masks[last], 2.0)})
    assert_untouched(model, keys)
    first = next(iter(masks))
    transposed = masks[first].flatten().view(-1, 1)
    with pytest.raises(ConfigError, match="shape"):
        model.add_task("t", 2, masks={**masks, first: transposed})
    assert_untouched(model, keys)
    model.add_task("t", 2, masks=masks)
    assert model.tasks == ["t"]


def test_writes_keep_the_umask_or_the_replaced_files_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "new.bin"
        write_atomic(target, b"1")
        assert target.stat().st_mode & 0o777 == 0o644
        os.chmod(target, 0o640)
        write_atomic(target, b"2")
        assert target.stat().st_mode & 0o777 == 0o640 and target.read_bytes() == b"2"
    finally:
        os.umask(old)


def test_temp_files_of_killed_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    target = tmp_path / "a.safetensors"
    stale = tmp_path / f".a.safetensors.{dead.stdout.strip()}.x1y2.tmp"
    live = tmp_path / f".a.safetensors.{os.getppid()}.z3w4.tmp"  # a process still running
    other = tmp_path / f".b.safetensors.{dead.stdout.strip()}.x1y2.tmp"  # another target's
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    write_atomic(target, b"whole")
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temps(target) == []


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118


def _write_raw(path: Path, header: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    path.write_bytes(safetensors_save(tensors, metadata=header))


def test_rewrite_metadata_resigns(task_file: Path) -> None:
    """The helper other tests use forges a valid checksum: refusals are the field checks'."""
    rewrite_metadata(task_file, library_version="9.9")
    assert read_task_file(task_file)[0]["library_version"] == "9.9"


def test_fuzz_of_task_files_gives_only_library_errors(tmp_path: Path) -> None:
    """bench/fuzz.py at CI size: 3,000 seeded structure-aware cases, each loaded and
    inspected. It fails on any non-library exception, hang, leak, silent change of an
    unsigned file, or a peak memory over 1 GB."""
    script = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
    out = tmp_path / "fuzz.json"
    command = [sys.executable, str(script), "--cases", "3000", "--seed", "1",
               "--work", str(tmp_path), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["failures"] == [] and payload["peak_mb"] < 1024
    refused = {row["mutator"] for row in payload["counts"] if row["result"] == "refused"}
    assert refused == {"bitflip", "codec", "drop-field", "field", "raw-json", "sizes",
                       "splice", "tensor", "truncate"}  # fmt: skip


def test_a_recorded_giant_backbone_is_refused_without_being_built(task_file: Path) -> None:
    """A file naming a 1-billion-weight net whose layers are not its own: refused from
    the net's shapes on the meta device, before any weight is allocated."""
    from piggyback.pipeline import open_task

    rewrite_metadata(task_file, metadata={"backbone": "vit_giant_patch14_224", "size": 8})
    started = time.perf_counter()
    with pytest.raises(BackboneMismatchError, match="'stem' does not exist there"):
        open_task(task_file)
    assert time.perf_counter() - started < 20
