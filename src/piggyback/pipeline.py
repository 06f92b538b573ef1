"""From task files and images to predictions: what the CLI and the server share."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .backbones import DEFAULT_BACKBONE, InputSpec, create_backbone
from .baked import recorded_spec
from .data import image_transform
from .errors import BackboneMismatchError, ConfigError
from .images import open_image
from .layers import masked_parameter
from .model import PiggybackModel
from .store import read_task_file, task_config


@dataclass(frozen=True)
class Prediction:
    """Top-k labels of one image, best first."""

    labels: list[str]
    indices: list[int]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "indices": self.indices, "probabilities": self.probabilities}


def task_source(meta: dict[str, Any]) -> dict[str, Any]:
    """What a task file's metadata (from `read_task_file`) says of the backbone and input
    it was trained with: its metadata, then the config to wrap with and the masked
    layers' shapes."""
    layers = {name: tuple(shape) for name, shape in meta["mask"]["layers"]}
    return {**(meta.get("metadata") or {}), "config": task_config(meta), "layers": layers}


def recorded_backbone(
    source: dict[str, Any], *, backbone: str | None = None, weights: str | Path | None = None
) -> nn.Module:
    """The backbone a task file records (see `task_source`), unless `backbone` / `weights`
    name another; the embedded default when nothing is recorded. A recorded name is
    first built on the meta device, without memory, and must have the file's masked
    layers: a file cannot make this process build some large network for nothing."""
    name = backbone or source.get("backbone") or DEFAULT_BACKBONE
    weights = weights if weights is not None else source.get("weights")
    if backbone is None and "layers" in source:
        check_recorded_layers(name, source["layers"])
    return create_backbone(name, weights=weights)


def check_recorded_layers(name: str, layers: dict[str, tuple[int, ...]]) -> None:
    """Raise BackboneMismatchError unless backbone `name`, built on the meta device (no
    memory, no download), has `layers` (masked layer name -> weight shape)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading real weights into meta tensors is a no-op
        network = create_backbone(name)
    for layer, shape in layers.items():
        try:
            module = network.get_submodule(layer)
            found = tuple(getattr(module, masked_parameter(module)).shape)
        except (AttributeError, ConfigError):
            found = None
        if found != shape:
            raise BackboneMismatchError(
                f"the task file records backbone {name!r}, but its layer {layer!r} "
                f"{'is ' + str(found) if found else 'does not exist'} there (the file masks "
                f"{shape}): pass the backbone it was trained on with --backbone/--weights"
            )


def open_task(
    path: str | Path,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    size: int | None = None,
) -> tuple[PiggybackModel, str, InputSpec]:
    """A model holding the task at `path` on the backbone it names (or the one given).

    Returns the model (task active, eval mode), the task's name and the input spec
    it trained with (at `size` when given).
    """
    contents = read_task_file(path)  # once: checksummed here, checked against the model below
    source = task_source(contents[0])
    net = recorded_backbone(source, backbone=backbone, weights=weights)
    spec = recorded_spec(source, net, path)
    spec = spec if size is None else replace(spec, size=size)
    model = PiggybackModel(net, source["config"])
    task = model.load_task(path, read=contents)
    model.set_task(task)
    return model.eval(), task, spec


def read_image(path: str | Path) -> Image.Image:
    """An RGB image from disk, within `piggyback.images`' size budget, or a DataError
    that names the file."""
    return open_image(path, f"image {path}").convert("RGB")


@torch.no_grad()
def predict(
    model: PiggybackModel,
    images: list[Image.Image],
    spec: InputSpec,
    *,
    task_names: list[str] | None = None,
    topk: int = 5,
) -> list[Prediction]:
    """Top-k predictions for PIL images, on the active task or one task per image."""
    if not images:
        return []
    batch = preprocess(images, spec, next(model.parameters()).device)
    logits = model(batch, task_names=task_names) if task_names else model(batch)
    names = task_names or [model.active_task] * len(images)
    results = []
    for row, task in zip(logits, names, strict=True):
        info = model.task_info[task] if task is not None else None
        width = info.num_classes if info else row.shape[0]
        results.append(rank(row[:width], info.class_names if info else None, topk))
    return results


def preprocess(images: list[Image.Image], spec: InputSpec, device: torch.device) -> torch.Tensor:
    """PIL images as one batch, each prepared as training prepared its images."""
    transform = image_transform(spec)
    return torch.stack([transform(image) for image in images]).to(device)


def rank(logits: torch.Tensor, class_names: list[str] | None, topk: int) -> Prediction:
    """The `topk` most probable classes of one row of logits (one task's classes only)."""
    top = logits.float().softmax(0).topk(min(topk, logits.shape[0]))
    indices = top.indices.tolist()
    return Prediction(
        labels=[class_names[i] if class_names else str(i) for i in indices],
        indices=indices,
        probabilities=[round(p, 6) for p in top.values.tolist()],
    )
