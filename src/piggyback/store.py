"""Task files: one task's masks, head and norms in a safetensors file.

A task file holds no code (safetensors, never pickle). Its metadata records the
library version, the config, the masked layers' names and shapes, the head, the
class names and the backbone's fingerprint, so it loads only onto the backbone it
was made for. Masks are stored bit-packed or entropy-coded, whichever is smaller.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .bits import (
    MaskKind,
    decode_bits,
    decode_mask,
    empirical_entropy_bits,
    encode_mask,
    unpack_mask,
)
from .config import MaskConfig
from .errors import BackboneMismatchError, TaskFileError, TaskFileNotFoundError
from .layers import NORM_DTYPE
from .taskmeta import CALIBRATION_KEY, FEATURES_KEY, check_meta

FORMAT = "piggyback-task"
# 2: per-task norms store only the tensors that differ from the backbone's, at 16 bits.
# 3: the checksum covers the JSON metadata too (a header entry beside it).
FORMAT_VERSION = 3
SUFFIX = ".safetensors"
_TEMP_NAME = re.compile(r"(\d+)\.[^.]+\.tmp")  # after the prefix: writer's pid, random part


def library_version() -> str:
    try:
        return version("piggyback")
    except PackageNotFoundError:
        return "unknown"


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, dtypes, shapes, bytes): its identity."""
    return _checksum(module.state_dict())


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(data))
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename: an interrupted save leaves the old file whole.

    The file gets the permissions a plain `open` would give (the umask's, or those of
    the file it replaces), and temporary files that killed writers left behind for the
    same target are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _file_mode(path))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of `write_atomic` calls for `path` whose process is
    gone (killed mid-write); returns what was deleted."""
    prefix = _temp_prefix(path)
    removed = []
    for temp in path.parent.glob(".*.tmp"):
        writer = _TEMP_NAME.fullmatch(temp.name[len(prefix) :])
        if temp.name.startswith(prefix) and writer and not _alive(int(writer[1])):
            temp.unlink(missing_ok=True)
            removed.append(temp)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; or not a pid at all
        return True
    return True


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, else what the umask gives a new file."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore, the only portable way
    os.umask(mask)
    return mask


def write_task(path: str | Path, task: PreparedTask) -> Path:
    """Write `task` to `path` (a `.safetensors` suffix is added if missing), its masks
    in the smallest encoding."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    numel = sum(math.prod(shape) for _, shape in task.layers)
    flat = unpack_mask(task.bits.cpu(), numel, task.mask_kind, torch.int8)
    payload, codec = encode_mask(flat, task.mask_kind)
    tensors: dict[str, torch.Tensor] = {
        "masks": torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    }
    tensors.update({f"head.{k}": v.detach().cpu().contiguous() for k, v in task.head.items()})
    tensors.update({f"norm.{k}": v.detach().cpu().contiguous() for k, v in task.norms.items()})
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "task": task.name,
        "num_classes": task.num_classes,
        "class_names": task.class_names,
        "train_bn": task.train_bn,
        "metadata": task.metadata,
        "config": task.config,
        "backbone": task.backbone,
        "mask": {
            "kind": task.mask_kind,
            "codec": codec,
            "numel": numel,
            "payload_bytes": len(payload),
            "bits_per_weight": 8 * len(payload) / max(numel, 1),
            "entropy_bits_per_weight": empirical_entropy_bits(flat) / max(numel, 1),
            "kept": float((flat != 0).float().mean()),
            "layers": [[name, list(shape)] for name, shape in task.layers],
        },
    }
    return write_task_file(path, meta, tensors)


def write_task_file(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a task file whose checksum covers both `meta` (as JSON) and `tensors`."""
    text = json.dumps(meta)
    header = {"format": FORMAT, "piggyback": text, "checksum": _header_checksum(text, tensors)}
    write_atomic(path, safetensors_save(tensors, metadata=header))
    return path


def _header_checksum(text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    return hashlib.sha256(f"{text}\n{_checksum(tensors)}".encode()).hexdigest()


def changed_norm_tensors(trained: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """A task's norm layer as stored: the floating-point tensors that differ from the
    backbone's own layer, at 16 bits (NORM_DTYPE); loading takes the rest from the
    backbone. BatchNorm's `num_batches_tracked`, a counter no forward pass reads, is not
    stored."""
    base_state = base.state_dict()
    return {
        key: value.detach().to(NORM_DTYPE).cpu().contiguous()
        for key, value in trained.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, base_state[key])
    }


def read_safetensors(
    path: Path, what: str, *, tensors: bool = True
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and tensors (none unless `tensors`) of a safetensors file; damage
    is a TaskFileError."""
    if not path.is_file():
        raise TaskFileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            keys = handle.keys() if tensors else []
            return header, {key: handle.get_tensor(key) for key in keys}
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise TaskFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc


def read_task_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a task file, checked for integrity (checksum) and for the
    type and range of every field (`piggyback.taskmeta`), but not against a model.
    Whatever the bytes, the only errors are TaskFileError and TaskFileNotFoundError."""
    path = Path(path)
    header, tensors = read_safetensors(path, "task file")
    if header.get("format") != FORMAT or "piggyback" not in header:
        raise TaskFileError(f"{path} is a safetensors file but not a piggyback task file")
    try:
        meta = json.loads(header["piggyback"])
    except (ValueError, RecursionError, MemoryError) as exc:  # RecursionError: deep nesting
        raise TaskFileError(
            f"{path} has unreadable piggyback metadata ({type(exc).__name__}: {exc})"
        ) from None
    version_ = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version_, bool) or not isinstance(version_, int) or version_ < 1:
        raise TaskFileError(f"{path} has no valid format_version in its metadata")
    if version_ > FORMAT_VERSION:
        raise TaskFileError(
            f"{path} uses task-file format {version_}; this piggyback "
            f"({library_version()}) reads up to {FORMAT_VERSION}: upgrade piggyback"
        )
    if version_ >= 3:
        intact = header.get("checksum") == _header_checksum(header["piggyback"], tensors)
    else:  # formats 1-2 checksummed the tensors only
        intact = meta.get("checksum") == _checksum(tensors)
    if not intact:
        raise TaskFileError(f"{path} is corrupt: its contents do not match their checksum")
    try:
        check_meta(meta, version_)
        _check_tensor_kinds(tensors, meta)
    except TaskFileError as exc:
        raise TaskFileError(f"{path}: {exc}") from exc
    return meta, tensors


def _check_tensor_kinds(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The mask payload is flat bytes; every other tensor is a float head or norm tensor."""
    payload = tensors.get("masks")
    if payload is None or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise TaskFileError("the 'masks' tensor is missing or is not flat uint8 bytes")
    declared = meta["mask"].get("payload_bytes", payload.numel())
    if declared != payload.numel():
        raise TaskFileError(f"mask payload holds {payload.numel()} bytes; {declared} declared")
    for key, tensor in tensors.items():
        if key != "masks" and not (
            key.startswith(("head.", "norm.")) and tensor.is_floating_point()
        ):
            raise TaskFileError(f"unexpected tensor {key!r} ({tensor.dtype}) in the task file")


def task_config(meta: dict[str, Any]) -> MaskConfig:
    """The MaskConfig to wrap a backbone with for a task file read by `read_task_file`:
    its own, but selecting exactly the layers it masks by name. A selector from a file
    is never matched (a crafted regular expression can take hours to match)."""
    layers = [name for name, _ in meta["mask"]["layers"]]
    return MaskConfig.from_dict(
        {**meta["config"], "target_modules": layers or None, "exclude_modules": None}
    )


def task_masks(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of a task file read by `read_task_file`: int8, one per layer,
    weight-shaped. Its sizes were bounded when read; decoding allocates one byte each."""
    mask = meta["mask"]
    layers = [(name, tuple(shape)) for name, shape in mask["layers"]]
    payload = tensors["masks"].numpy().tobytes()
    flat = decode_mask(payload, mask["codec"], mask["numel"], mask["kind"])
    views = flat.split([int(np.prod(shape)) for _, shape in layers]) if layers else []
    return {layer: view.view(shape) for (layer, shape), view in zip(layers, views, strict=True)}


@dataclass(frozen=True)
class PreparedTask:
    """One task as its file holds it: what a model hands `write_task`, and what
    `read_task` hands a model to check (`check_fits`) and add.

    `bits` are the masks of every layer in `layers` order, packed (`bits.pack_mask`);
    `norms` maps "LAYER.KEY" to the norm tensors that differ from the backbone's;
    `backbone` is what it was made for (fingerprint, class, head); `config` the
    MaskConfig as a dict.
    """

    name: str
    num_classes: int
    class_names: list[str] | None
    train_bn: bool
    mask_kind: MaskKind
    layers: list[tuple[str, tuple[int, ...]]]
    bits: torch.Tensor
    head: dict[str, torch.Tensor]
    norms: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    backbone: dict[str, Any]
    config: dict[str, Any]


@dataclass(frozen=True)
class ModelShape:
    """What a task file must fit in a model: its backbone's fingerprint and class, its head's
    name and tensor shapes (outputs first), its masked layers' and norm layers' shapes."""

    fingerprint: str
    class_name: str
    head: str
    head_shapes: dict[str, torch.Size]
    layers: list[tuple[str, tuple[int, ...]]]
    norms: dict[str, dict[str, torch.Size]]


TaskFileContents = tuple[dict[str, Any], dict[str, torch.Tensor]]  # of `read_task_file`


def read_task(
    path: str | Path,
    model: ModelShape,
    *,
    name: str | None = None,
    read: TaskFileContents | None = None,
    device: torch.device | None = None,
) -> PreparedTask:
    """The task file at `path`, checked for integrity and to fit `model` (`check_fits`)
    before its masks are decoded (onto `device`, the CPU by default), so a file's
    declared sizes are never allocated first. `name` replaces the file's; `read`: what
    `read_task_file(path)` returned, for a caller that already read it."""
    meta, tensors = read_task_file(path) if read is None else read
    mask = meta["mask"]
    norms = _prefixed(tensors, "norm.")
    task = PreparedTask(
        name=meta["task"] if name is None else name,
        num_classes=meta["num_classes"],
        class_names=meta.get("class_names"),
        train_bn=bool(norms) or meta.get("train_bn") is True,
        mask_kind=mask["kind"],
        layers=[(layer, tuple(shape)) for layer, shape in mask["layers"]],
        bits=torch.empty(0, dtype=torch.uint8),
        head=_prefixed(tensors, "head."),
        norms=norms,
        metadata=meta.get("metadata") or {},
        backbone=meta["backbone"],
        config=meta["config"],
    )
    check_fits(path, task, model)
    payload = tensors["masks"].numpy().tobytes()
    bits = decode_bits(payload, mask["codec"], mask["numel"], mask["kind"], device)
    return replace(task, bits=bits)


def check_fits(path: str | Path, task: PreparedTask, model: ModelShape) -> dict[str, dict]:
    """Raise BackboneMismatchError unless `task` fits `model` (backbone fingerprint, layer
    shapes, head, norm tensors); returns its norm tensors by norm layer and key."""
    stored = task.backbone["fingerprint"]
    if stored != model.fingerprint:
        raise BackboneMismatchError(
            f"{path} was made for backbone {stored[:12]} ({task.backbone.get('class')}); "
            f"this model's backbone is {model.fingerprint[:12]} "
            f"({model.class_name}): load it onto the backbone it was trained on"
        )
    _check_layers(path, task.layers, model.layers)
    _check_feature_layers(path, task.metadata, model.layers)
    if task.backbone.get("head", model.head) != model.head:
        raise BackboneMismatchError(
            f"{path} replaces the head {task.backbone['head']!r}; this model's head is "
            f"{model.head!r}: load it with the same MaskConfig(head=...)"
        )
    head_shapes = {k: torch.Size((task.num_classes, *s[1:])) for k, s in model.head_shapes.items()}
    _check_state(path, "head", task.head, head_shapes)
    norms: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in task.norms.items():
        layer = next((n for n in model.norms if key.startswith(f"{n}.")), None)
        if layer is None:
            raise BackboneMismatchError(f"{path} holds norm tensor {key!r} for no norm layer")
        norms.setdefault(layer, {})[key[len(layer) + 1 :]] = tensor
    for layer, state in norms.items():
        _check_state(path, f"norm layer {layer}", state, model.norms[layer], partial=True)
    return norms


def _check_feature_layers(
    path: str | Path, metadata: Mapping[str, Any], layers: list[tuple[str, tuple[int, ...]]]
) -> None:
    """The layers a task's feature statistics name (`piggyback.taskfeatures`) are masked
    layers of the model, and each holds as many features as its layer gives: task
    inference runs every candidate at once, so a task that does not fit would fail the
    inference of every task."""
    calibration = metadata.get(CALIBRATION_KEY) or {}
    records = calibration.get(FEATURES_KEY, {}).get("layers", [])
    shapes = dict(layers)
    unknown = sorted({record["name"] for record in records} - set(shapes))
    if unknown:
        raise BackboneMismatchError(
            f"{path}'s task-inference statistics read layers {unknown}, which this model "
            "does not mask: load it onto the model it was calibrated on"
        )
    for record in records:
        shape = shapes[record["name"]]
        if record["dim"] not in _feature_dims(shape):
            raise BackboneMismatchError(
                f"{path}'s task-inference statistics hold {record['dim']} features for layer "
                f"{record['name']!r}, whose weight {shape} gives {sorted(_feature_dims(shape))}: "
                "load it onto the model it was calibrated on"
            )


def _feature_dims(shape: tuple[int, ...]) -> set[int]:
    """The features a masked layer of weight `shape` can give, pooled: a convolution's or a
    linear layer's outputs (its first dimension), or, for an attention's input projection
    (3 x embed, embed), the embedding."""
    if len(shape) == 2 and shape[0] == 3 * shape[1]:
        return {shape[0], shape[1]}
    return {shape[0]}


def _check_state(
    path: str | Path,
    what: str,
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    *,
    partial: bool = False,
) -> None:
    """`state` holds tensors of exactly `shapes` (a subset of them if `partial`)."""
    missing = [] if partial else sorted(set(shapes) - set(state))
    wrong = [
        f"{key} {tuple(value.shape)} (expected {tuple(shapes[key]) if key in shapes else 'none'})"
        for key, value in state.items()
        if key not in shapes or value.shape != shapes[key]
    ]
    if missing or wrong:
        raise BackboneMismatchError(
            f"{path}: the {what} tensors do not fit this model (missing {missing}, "
            f"mismatched {wrong[:3]}): load it onto the backbone it was trained on"
        )


def _check_layers(
    path: str | Path, layers: list[tuple[str, tuple]], ours: list[tuple[str, tuple]]
) -> None:
    if layers == ours:
        return
    theirs = dict(layers)
    problems = [f"{n}: file {theirs.get(n)} vs model {s}" for n, s in ours if theirs.get(n) != s]
    problems += [f"{n}: in file only" for n in theirs if n not in dict(ours)]
    raise BackboneMismatchError(
        f"{path} masks other layers than this model ({len(problems)} differences, e.g. "
        f"{'; '.join(problems[:3])}): use the same backbone and MaskConfig targets"
    )


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def task_files(directory: str | Path) -> list[Path]:
    """The task files in `directory`, sorted; the folder must exist (it may be empty)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskFileNotFoundError(f"task directory {str(directory)!r} does not exist")
    return sorted(directory.glob(f"*{SUFFIX}"))
