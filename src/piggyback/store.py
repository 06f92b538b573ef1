"""Task files: one task's masks, head and norms in a safetensors file.

A task file holds no code (safetensors, never pickle). Its metadata records the
library version, the config, the masked layers' names and shapes, the head, the
class names and the backbone's fingerprint, so it loads only onto the backbone it
was made for. Masks are stored bit-packed or entropy-coded, whichever is smaller.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .bits import decode_mask, empirical_entropy_bits, encode_mask
from .config import MaskConfig
from .errors import BackboneMismatchError, ConfigError, TaskFileError, TaskFileNotFoundError
from .layers import NORM_DTYPE

if TYPE_CHECKING:
    from .model import PiggybackModel

FORMAT = "piggyback-task"
# 2: per-task norms store only the tensors that differ from the backbone's, at 16 bits.
FORMAT_VERSION = 2
SUFFIX = ".safetensors"


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
    """Write via a temporary file and rename: an interrupted save leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_task(model: PiggybackModel, task: str, path: str | Path) -> Path:
    """Write `task` of `model` to `path` (a `.safetensors` suffix is added if missing)."""
    path = Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    kind = model.mask_kind(task)  # raises UnknownTaskError for a task the model lacks
    info = model.task_info[task]
    masks = model.masks(task)
    flat = torch.cat([m.flatten().cpu() for m in masks.values()])
    payload, codec = encode_mask(flat, kind)
    tensors: dict[str, torch.Tensor] = {
        "masks": torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    }
    for key, value in model.head.heads[task].state_dict().items():
        tensors[f"head.{key}"] = value.detach().cpu().contiguous()
    for layer_name, norm in model.norms.items():
        if task in norm.norms:
            changed = changed_norm_tensors(norm.norms[task], norm.base_layer)
            tensors.update({f"norm.{layer_name}.{key}": v for key, v in changed.items()})
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "task": task,
        "num_classes": info.num_classes,
        "class_names": info.class_names,
        "train_bn": info.train_bn,
        "metadata": info.metadata,
        "config": model.config.to_dict(),
        "backbone": {
            "fingerprint": model.fingerprint,
            "class": type(model.backbone).__name__,
            "head": model.head_name,
        },
        "mask": {
            "kind": kind,
            "codec": codec,
            "numel": flat.numel(),
            "payload_bytes": len(payload),
            "bits_per_weight": 8 * len(payload) / max(flat.numel(), 1),
            "entropy_bits_per_weight": empirical_entropy_bits(flat) / max(flat.numel(), 1),
            "kept": float((flat != 0).float().mean()),
            "layers": [[name, list(model.masked_layers[name].weight.shape)] for name in masks],
        },
        "checksum": _checksum(tensors),
    }
    data = safetensors_save(tensors, metadata={"format": FORMAT, "piggyback": json.dumps(meta)})
    write_atomic(path, data)
    return path


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


def read_safetensors(path: Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and tensors of a safetensors file; damage is a TaskFileError."""
    if not path.is_file():
        raise TaskFileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise TaskFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return header, tensors


def read_task_file(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a task file, checked for integrity but not against a model."""
    path = Path(path)
    header, tensors = read_safetensors(path, "task file")
    if header.get("format") != FORMAT or "piggyback" not in header:
        raise TaskFileError(f"{path} is a safetensors file but not a piggyback task file")
    try:
        meta = json.loads(header["piggyback"])
        version_ = int(meta["format_version"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskFileError(f"{path} has unreadable piggyback metadata: {exc}") from exc
    if version_ > FORMAT_VERSION:
        raise TaskFileError(
            f"{path} uses task-file format {version_}; this piggyback "
            f"({library_version()}) reads up to {FORMAT_VERSION}: upgrade piggyback"
        )
    if meta.get("checksum") != _checksum(tensors):
        raise TaskFileError(f"{path} is corrupt: its tensors do not match their checksum")
    _check_field_types(path, meta)
    return meta, tensors


def task_masks(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of a task file read by `read_task_file`: int8, one per layer, weight-shaped."""
    try:
        mask = meta["mask"]
        layers = [(str(layer), tuple(int(d) for d in shape)) for layer, shape in mask["layers"]]
        payload = tensors["masks"].numpy().tobytes()
        flat = decode_mask(payload, mask["codec"], int(mask["numel"]), mask["kind"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskFileError(f"task file metadata misses or garbles a mask field: {exc}") from exc
    sizes = [int(np.prod(shape)) for _, shape in layers]
    if sum(sizes) != flat.numel():
        raise TaskFileError(f"mask layers hold {sum(sizes)} weights; the payload {flat.numel()}")
    views = flat.split(sizes) if sizes else []
    return {layer: view.view(shape) for (layer, shape), view in zip(layers, views, strict=True)}


def load_task(model: PiggybackModel, path: str | Path, *, name: str | None = None) -> str:
    """Add the task stored at `path` to `model` (as a stored, packed-mask task)."""
    meta, tensors = read_task_file(path)
    try:
        task = name or meta["task"]
        mask_meta = meta["mask"]
        layers = [(layer, tuple(shape)) for layer, shape in mask_meta["layers"]]
        kind = mask_meta["kind"]
        num_classes = int(meta["num_classes"])
        stored_fingerprint = meta["backbone"]["fingerprint"]
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskFileError(f"{path} misses metadata field {exc}") from exc
    if stored_fingerprint != model.fingerprint:
        raise BackboneMismatchError(
            f"{path} was made for backbone {stored_fingerprint[:12]} "
            f"({meta['backbone'].get('class')}); this model's backbone is "
            f"{model.fingerprint[:12]} ({type(model.backbone).__name__}): load it onto the "
            "backbone it was trained on"
        )
    _check_layers(path, layers, model)
    if task in model.task_info:
        raise ConfigError(f"task {task!r} already exists in the model; pass name= to rename it")
    masks = task_masks(meta, tensors)
    head_state = _prefixed(tensors, "head.")
    norm_states = {layer: _prefixed(tensors, f"norm.{layer}.") for layer in model.norms}
    norm_states = {k: v for k, v in norm_states.items() if v}
    model.add_task(
        task,
        num_classes,
        class_names=meta.get("class_names"),
        train_bn=bool(norm_states) or meta.get("train_bn") is True,
        masks=masks,
        mask_kind=kind,
        metadata=meta.get("metadata") or {},
    )
    try:
        model.head.heads[task].load_state_dict(head_state)
        for layer, state in norm_states.items():
            own = model.norms[layer].norms[task]
            full = own.state_dict()  # a copy of the backbone's layer: what was not stored
            for key, value in state.items():
                full[key] = value.to(full[key].dtype) if key in full else value
            own.load_state_dict(full)
    except RuntimeError as exc:
        model.remove_task(task)
        raise BackboneMismatchError(f"{path}: head or norm tensors do not fit: {exc}") from exc
    return task


def _check_field_types(path: str | Path, meta: dict[str, Any]) -> None:
    """The checksum covers the tensors only, so a crafted header must still fail cleanly."""
    expected = {"task": (str,), "class_names": (list, type(None)), "metadata": (dict, type(None))}
    for key, types in expected.items():
        if not isinstance(meta.get(key), types):
            raise TaskFileError(f"{path}: metadata field {key!r} is malformed")


def _check_layers(path: str | Path, layers: list[tuple[str, tuple]], model: PiggybackModel) -> None:
    ours = [(n, tuple(m.weight.shape)) for n, m in model.masked_layers.items()]
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


def save(model: PiggybackModel, directory: str | Path) -> list[Path]:
    """Write every task of `model` to `directory`, one task file each."""
    directory = Path(directory)
    return [save_task(model, task, directory / f"{task}{SUFFIX}") for task in model.tasks]


def load(
    directory: str | Path, backbone: nn.Module, config: MaskConfig | None = None
) -> PiggybackModel:
    """Wrap `backbone` and load every task file in `directory` (config from the files).

    The model comes back in eval mode, ready for inference, like any loaded model.
    """
    from .model import PiggybackModel

    files = task_files(directory)
    if not files:
        raise TaskFileNotFoundError(f"no {SUFFIX} task files in {str(directory)!r}")
    if config is None:
        config = MaskConfig.from_dict(read_task_file(files[0])[0]["config"])
    model = PiggybackModel(backbone, config)
    for file in files:
        load_task(model, file)
    return model.eval()
