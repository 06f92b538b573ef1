"""Any model file piggyback writes, opened by what its header says it is: a task file
(`piggyback.store`) or a baked model (`piggyback.baked`: an export or a fine-tuned
baseline). `eval`, `predict` and `inspect` take all of them through here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import baked, store
from .baked import ModelInfo, baked_kind, read_baked, task_model_info
from .errors import ConfigError, TaskFileError
from .pipeline import Prediction, open_task, preprocess, rank

FORMATS = (store.FORMAT, baked.FORMAT)


@dataclass
class OpenedModel:
    """A model file ready to classify images: `network` maps a batch prepared as
    `info.spec` says to the task's logits."""

    network: nn.Module
    info: ModelInfo
    kind: str

    @torch.no_grad()
    def predict(self, images: list[Image.Image], topk: int) -> list[Prediction]:
        """The `topk` most probable classes of each image (at most the task's classes)."""
        if not images:
            return []
        device = next(self.network.parameters()).device
        logits = self.network.eval()(preprocess(images, self.info.spec, device))
        return [rank(row, self.info.class_names, topk) for row in logits]


def file_format(path: str | Path) -> str:
    """The format a piggyback model file's header names (one of `FORMATS`), read without its
    tensors; anything else is a TaskFileError that says what is accepted."""
    path = Path(path)
    header, _ = store.read_safetensors(path, "model file", tensors=False)
    found = header.get("format")
    if found not in FORMATS:
        raise TaskFileError(
            f"{path} is a safetensors file but not a piggyback model file; expected a task "
            "file (TASK.safetensors), a fine-tuned model (TASK.finetuned.safetensors) or "
            "a model written by `piggyback export`"
        )
    return found


def open_model_file(
    path: str | Path,
    *,
    backbone: str | None = None,
    weights: str | Path | None = None,
    size: int | None = None,
) -> OpenedModel:
    """The model in a task file or a baked file, ready to classify as it trained.

    `backbone` / `weights` replace the backbone a task file records; a baked file holds
    its whole network, so they are refused there. `size` changes the input resolution.
    """
    found = file_format(path)
    if found == store.FORMAT:
        model, task, spec = open_task(path, backbone=backbone, weights=weights, size=size)
        info = task_model_info(model, task, spec)
        return OpenedModel(model, info, "task file")
    if backbone is not None or weights is not None:
        raise ConfigError(
            f"{path} is a baked model that holds its whole network; --backbone and "
            "--weights apply to task files only: leave them out"
        )
    info, network = read_baked(path)
    if size is not None:
        info = replace(info, spec=replace(info.spec, size=size))
    return OpenedModel(network, info, baked_kind(info))
