"""From task files and images to predictions: what the CLI and the server share."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .backbones import DEFAULT_BACKBONE, InputSpec, create_backbone, meta_backbone
from .baked import recorded_spec
from .data import image_transform
from .errors import BackboneMismatchError, ConfigError, PiggybackError
from .images import open_image
from .layers import masked_parameter
from .model import PiggybackModel
from .store import read_task_file, task_config, task_files
from .taskmeta import RANDOM_KEY


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
    name another; the embedded default when nothing is recorded. A name is first built
    on the meta device, without memory, and must have the file's masked layers: a file
    cannot make this process build some large network for nothing, and a wrong
    `backbone` is one short error. A backbone the file records as random is rebuilt from
    its recorded seed, as training built it."""
    recorded = source.get("backbone") or DEFAULT_BACKBONE
    name = backbone or recorded
    weights = weights if weights is not None else source.get("weights")
    if "layers" in source:
        check_recorded_layers(name, source["layers"], trained_on=backbone and recorded)
    if source.get(RANDOM_KEY) is True and weights is None and name == recorded:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.get("seed") or 0)
            return create_backbone(name)
    return create_backbone(name, weights=weights)


def check_recorded_layers(
    name: str, layers: dict[str, tuple[int, ...]], *, trained_on: str | None = None
) -> None:
    """Raise BackboneMismatchError unless backbone `name`, built on the meta device (no
    memory, no download), has `layers` (masked layer name -> weight shape). `trained_on`:
    the backbone the file records, when `name` was given in its place."""
    network = meta_backbone(name)
    for layer, shape in layers.items():
        try:
            module = network.get_submodule(layer)
            found = tuple(getattr(module, masked_parameter(module)).shape)
        except (AttributeError, ConfigError):
            found = None
        if found == shape:
            continue
        if trained_on:
            raise BackboneMismatchError(
                f"the task file was trained on backbone {trained_on!r}; {name!r} does not "
                f"have its masked layers: leave out --backbone (or pass {trained_on!r})"
            )
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


def open_tasks(
    given: list[Path],
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    size: int | None = None,
) -> tuple[PiggybackModel, InputSpec, list[str]]:
    """One model holding every task file of `given` (files, or folders of them) on the
    backbone the first that loads records, for task inference. Returns the model, the
    input spec all its tasks share and a line for each file that did not load (skipped,
    as the server does); tasks whose inputs are prepared otherwise are skipped, and those
    trained at another input size too unless `size` sets one."""
    paths = [p for path in given for p in (task_files(path) if path.is_dir() else [path])]
    if not paths:
        raise ConfigError(f"no task file in {[str(p) for p in given]}")
    skipped, rest = [], list(paths)
    while rest:  # the first file that loads sets the backbone and the input spec
        first = rest.pop(0)
        try:
            model, _, spec = open_task(first, backbone=backbone, weights=weights, size=size)
            break
        except PiggybackError as exc:
            skipped.append(f"skipped {first}: {exc}")
    else:
        raise ConfigError(f"no task file of {[str(p) for p in given]} loads: {skipped}")
    for path in rest:
        try:
            contents = read_task_file(path)
            own = recorded_spec(task_source(contents[0]), model.backbone, path)
            if replace(own, size=spec.size) != spec:
                raise ConfigError(
                    f"its inputs are prepared otherwise than {first}'s ({own.describe()}; "
                    f"against {spec.describe()})"
                )
            if size is None and own.size != spec.size:
                raise ConfigError(
                    f"it was trained on {own.size} px inputs, {first} on {spec.size} "
                    "px; pass --size to run all at one size"
                )
            model.load_task(path, read=contents)
        except PiggybackError as exc:
            skipped.append(f"skipped {path}: {exc}")
    return model.eval(), spec, skipped


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
