"""Resumable training state in safetensors + JSON: no pickle, even for the optimizer.

The state is one file, written atomically: a run killed at any moment leaves either the
previous complete checkpoint or, before the first one, none (`has_checkpoint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .errors import TaskFileError
from .store import write_atomic

FILE = "state.safetensors"


def save_checkpoint(
    directory: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keys: list[str],
    epoch: int,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Everything `fit` needs to go on after `epoch` as if it had never stopped."""
    state = network.state_dict()
    tensors = {f"model.{k}": state[k].detach().cpu().contiguous() for k in keys}
    if best["state"] is not None:
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best["state"].items()})
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optim["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {
        "epoch": epoch,
        "history": history,
        "best_epoch": best["epoch"],
        "best_top1": best["top1"],
        "param_groups": optim["param_groups"],
        "optim_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},  # {} when fp16 is off
    }
    path = directory / FILE
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(path, safetensors_save(tensors, metadata={"checkpoint": json.dumps(meta)}))
    return path


def has_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a complete checkpoint (a damaged one still counts, so
    that `load_checkpoint` says so instead of it being silently replaced)."""
    return (directory / FILE).is_file()


def remove_checkpoint(directory: Path) -> None:
    """Forget an earlier run's state when a run starts over in the same folder."""
    (directory / FILE).unlink(missing_ok=True)


def load_checkpoint(
    directory: Path,
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keys: list[str],
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Restore what `save_checkpoint` wrote; returns (epochs done, history, best)."""
    path = directory / FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["checkpoint"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # a damaged checkpoint must say so, not crash deep inside
        raise TaskFileError(
            f"cannot resume from {path}: {exc}. Delete {directory} to start over"
        ) from exc
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if sorted(model_state) != sorted(keys):
        raise TaskFileError(
            f"{path} was written for another run (its tensors differ from this model's); "
            f"delete {directory} or use another output folder"
        )
    network.load_state_dict(model_state, strict=False)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value  # load_state_dict moves them
    for index, values in meta["optim_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    best_state = {
        k[len("best.") :]: v.to(device) for k, v in tensors.items() if k.startswith("best.")
    }
    best = {"epoch": meta["best_epoch"], "top1": meta["best_top1"], "state": best_state or None}
    return meta["epoch"], meta["history"], best
