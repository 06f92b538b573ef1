"""Baked model files: a task's whole network as a plain state_dict, with what it takes to
run it (classes, the input spec it trained with) and to evaluate it again (its data).

`piggyback export` writes them from task files and `fit` writes its fine-tuned baselines
the same way, so `eval`, `predict` and `inspect` read both. A file may come from anyone:
every header field is checked for type and range before use (with the checkers of
`piggyback.taskmeta`), and the network its header names is sized on the meta device and
compared with the file's tensors before any memory is given to it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from .backbones import InputSpec, create_backbone, input_spec
from .errors import PiggybackError, TaskFileError
from .layers import new_head
from .store import read_safetensors, write_atomic
from .taskmeta import (
    MAX_CLASSES,
    SPEC_KEY,
    _class_names,
    _metadata,
    _require,
    _text,
    parse_spec,
    spec_record,
)

if TYPE_CHECKING:
    from .model import PiggybackModel

FORMAT = "piggyback-baked"


@dataclass(frozen=True)
class ModelInfo:
    """What a model file says of its task: its classes, how to feed it (`spec`) and how
    it was trained (`metadata`: backbone, data, seed, split fractions, limit, method)."""

    task: str
    num_classes: int
    class_names: list[str] | None
    spec: InputSpec
    metadata: dict[str, Any] = field(default_factory=dict)

    def header(self) -> dict[str, str]:
        """As string entries: a safetensors header's, or an ONNX file's metadata_props."""
        return {
            "task": self.task,
            "num_classes": str(self.num_classes),
            "class_names": json.dumps(self.class_names),
            SPEC_KEY: json.dumps(spec_record(self.spec)),
            "preprocessing": self.spec.describe(),
            "metadata": json.dumps(self.metadata),
        }


def baked_kind(info: ModelInfo) -> str:
    """What a baked file is, in a user's words."""
    return "fine-tuned model" if info.metadata.get("method") == "finetune" else "baked model"


def task_model_info(model: PiggybackModel, task: str, spec: InputSpec) -> ModelInfo:
    """The info of a task `model` holds, fed as `spec` says."""
    record = model.task_info[task]
    metadata = {key: value for key, value in record.metadata.items() if key != SPEC_KEY}
    return ModelInfo(task, record.num_classes, record.class_names, spec, metadata)


def recorded_spec(metadata: Mapping[str, Any], network: nn.Module, path: str | Path) -> InputSpec:
    """The input spec a task trained with, as its metadata (from the file at `path`)
    records it; for files written before specs were recorded, the backbone's own at the
    recorded size."""
    if SPEC_KEY not in metadata:
        return input_spec(network, size=metadata.get("size"))
    try:
        return parse_spec(metadata[SPEC_KEY], f"metadata.{SPEC_KEY}")
    except TaskFileError as exc:
        raise TaskFileError(f"{path}: {exc}") from exc


def write_baked(
    path: Path, network: nn.Module, info: ModelInfo, *, backbone: str, head: str
) -> Path:
    """Write `network` (the backbone named `backbone`, its head at `head` resized to the
    task's classes) with `info`, atomically."""
    header = {"format": FORMAT, "backbone": backbone, "head": head, **info.header()}
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    write_atomic(path, safetensors_save(state, metadata=header))
    return path


def read_baked_header(path: Path) -> tuple[dict[str, str], ModelInfo, dict[str, torch.Tensor]]:
    """The checked header of a baked file (its raw entries and its `ModelInfo`) and its
    tensors, without building the network."""
    raw, tensors = read_safetensors(path, "model file")
    if raw.get("format") != FORMAT:
        raise TaskFileError(f"{path} is not a model written by `piggyback export` or `fit`")
    try:
        info = _parse_info(raw)
        _text(256)(raw.get("backbone"), "backbone")
        _text(1024)(raw.get("head"), "head")
    except TaskFileError as exc:
        raise TaskFileError(f"{path}: {exc}") from exc
    return raw, info, tensors


def read_baked(path: str | Path) -> tuple[ModelInfo, nn.Module]:
    """The model in a baked file, rebuilt on its backbone's class (eval mode), and its info.

    The network's shapes are compared with the file's tensors on the meta device first,
    so a header naming a huge backbone costs nothing; what does not fit is a TaskFileError.
    """
    path = Path(path)
    raw, info, state = read_baked_header(path)
    if not raw["backbone"]:
        raise TaskFileError(
            f"{path} does not record its backbone; rebuild it yourself and load the state_dict"
        )
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading real weights into meta tensors is a no-op
        expected = _network(path, raw, info.num_classes).state_dict()
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    wanted = {key: tuple(tensor.shape) for key, tensor in expected.items()}
    if shapes != wanted:
        differ = sorted(set(shapes.items()) ^ set(wanted.items()))[:3]
        raise TaskFileError(
            f"{path} does not fit backbone {raw['backbone']!r}: tensors differ, first "
            f"{[name for name, _ in differ]}"
        )
    network = _network(path, raw, info.num_classes)
    network.load_state_dict(state)
    return info, network.eval()


def _network(path: Path, raw: dict[str, str], num_classes: int) -> nn.Module:
    """The backbone the header names with its head resized to the task's classes."""
    try:
        network = create_backbone(raw["backbone"])
        parent, _, child = raw["head"].rpartition(".")
        owner = network.get_submodule(parent) if parent else network
        setattr(owner, child, new_head(getattr(owner, child), num_classes))
    except (PiggybackError, AttributeError, TypeError, RuntimeError) as exc:
        raise TaskFileError(f"{path} names a network that cannot be built: {exc}") from exc
    return network


def _parse_info(raw: dict[str, str]) -> ModelInfo:
    _text(128)(raw.get("task"), "task")
    classes = raw.get("num_classes", "")
    ok = classes.isdigit() and len(classes) <= 6 and 1 <= int(classes) <= MAX_CLASSES
    _require(ok, "num_classes", f"an integer in [1, {MAX_CLASSES:,}]", classes)
    num_classes = int(classes)
    class_names = _json(raw, "class_names", "null")
    if class_names is not None:
        _class_names(num_classes)(class_names, "class_names")
    metadata = _json(raw, "metadata", "{}")
    _metadata(metadata, "metadata")
    _text(32)(metadata.get("method", ""), "metadata.method")
    spec = parse_spec(_json(raw, SPEC_KEY, "null"), SPEC_KEY)
    return ModelInfo(raw["task"], num_classes, class_names, spec, metadata)


def _json(raw: dict[str, str], key: str, missing: str) -> Any:
    try:
        return json.loads(raw.get(key, missing))
    except (ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise TaskFileError(f"field {key!r} is not readable JSON ({exc})") from None
