"""Bake a task into a plain model file (`piggyback.baked`), and optionally ONNX."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .backbones import DEFAULT_BACKBONE
from .baked import task_model_info, write_baked
from .errors import ConfigError
from .pipeline import open_task


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

    The state_dict file loads with `piggyback.baked.read_baked`. The ONNX file takes a
    (batch, 3, size, size) float input named "images" and returns "logits"; its
    metadata_props hold the same entries as the baked file's header: the task, its
    class names and the input spec (JSON) to prepare images with.
    """
    model, task, spec = open_task(task_file, backbone=backbone, weights=weights, size=size)
    info = task_model_info(model, task, spec)
    name = backbone or info.metadata.get("backbone") or DEFAULT_BACKBONE
    baked = model.bake(task)
    written = [write_baked(Path(out), baked, info, backbone=name, head=model.head_name)]
    if onnx_path is not None:
        header = {"backbone": name, **info.header()}
        written.append(_export_onnx(baked, spec.size, header, Path(onnx_path)))
    return written


def _export_onnx(model: nn.Module, size: int, header: dict[str, str], path: Path) -> Path:
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
        verbose=False,  # no progress chatter on stdout
    )
    program.model.metadata_props.update(header)
    tmp = path.with_name(path.name + ".partial")
    program.save(str(tmp))
    tmp.replace(path)
    return path
