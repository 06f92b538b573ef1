"""Bake a task into a plain model file (safetensors state_dict), and optionally ONNX."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from .backbones import DEFAULT_BACKBONE, create_backbone
from .errors import ConfigError, TaskFileError
from .layers import new_head
from .pipeline import open_task
from .store import read_safetensors, write_atomic
from .taskmeta import MAX_CLASSES

FORMAT = "piggyback-baked"


def export_task(
    task_file: str | Path,
    out: str | Path,
    *,
    onnx_path: str | Path | None = None,
    backbone: str | None = None,
    weights: str | Path | None = None,
    size: int | None = None,
) -> list[Path]:
    """Write the task baked into its backbone (W * mask, the task's head and norms).

    The state_dict file loads with `load_exported`; the ONNX file takes a
    (batch, 3, size, size) float input named "images" and returns "logits".
    """
    model, task, spec = open_task(task_file, backbone=backbone, weights=weights, size=size)
    baked = model.bake(task)
    info = model.task_info[task]
    meta = {
        "format": FORMAT,
        "task": task,
        "backbone": backbone or info.metadata.get("backbone") or DEFAULT_BACKBONE,
        "head": model.head_name,
        "num_classes": str(info.num_classes),
        "class_names": json.dumps(info.class_names),
        "input_spec": json.dumps(asdict(spec)),
    }
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in baked.state_dict().items()}
    write_atomic(out, safetensors_save(state, metadata=meta))
    written = [out]
    if onnx_path is not None:
        written.append(_export_onnx(baked, spec.size, Path(onnx_path)))
    return written


def _export_onnx(model: nn.Module, size: int, path: Path) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "ONNX export needs the onnx packages: pip install 'piggyback[onnx]' (onnx, onnxscript)"
        ) from exc
    example = torch.randn(1, 3, size, size)
    program = torch.onnx.export(
        model,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
    )
    tmp = path.with_name(path.name + ".partial")
    program.save(str(tmp))
    tmp.replace(path)
    return path


def load_exported(path: str | Path) -> nn.Module:
    """The plain model written by `export_task`, rebuilt on its backbone's class.

    The file's header is checked before use (a known backbone, a head the backbone
    has, a bounded class count), and tensors that do not fit are a TaskFileError."""
    path = Path(path)
    meta, state = read_safetensors(path, "exported model")
    if meta.get("format") != FORMAT:
        raise TaskFileError(f"{path} is not a model written by `piggyback export`")
    classes = meta.get("num_classes", "")
    if not classes.isdigit() or not 1 <= int(classes) <= MAX_CLASSES:
        raise TaskFileError(f"{path}: num_classes {classes[:20]!r} is not in [1, {MAX_CLASSES:,}]")
    if not meta.get("backbone"):
        raise TaskFileError(
            f"{path} does not record its backbone; rebuild it yourself and load the state_dict"
        )
    model = create_backbone(meta["backbone"])
    try:
        parent, _, child = meta.get("head", "").rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, new_head(getattr(owner, child), int(classes)))
        model.load_state_dict(state)
    except (AttributeError, ConfigError, RuntimeError) as exc:
        raise TaskFileError(f"{path} does not fit backbone {meta['backbone']!r}: {exc}") from exc
    return model.eval()
