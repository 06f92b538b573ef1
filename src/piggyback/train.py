"""Training: the paper's recipe as plain functions over any model and loader.

`fit` adds one task to a PiggybackModel with one of three methods, so they can be
compared side by side: "piggyback" (learn the mask and the head), "classifier"
(the head only) and "finetune" (every weight of a copy of the backbone).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data import TaskData, make_loader
from .errors import ConfigError
from .model import PiggybackModel
from .store import write_atomic

Method = Literal["piggyback", "classifier", "finetune"]
METHODS: tuple[str, ...] = ("piggyback", "classifier", "finetune")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the paper's: Adam at 1e-4, batch 32, 30 epochs,
    lr x0.1 every 15 epochs, no weight decay.

    Example:
        >>> TrainConfig(epochs=2, method="classifier").lr_decay_every
        15
    """

    method: Method = "piggyback"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-4
    head_lr: float = 1e-4
    lr_decay: float = 0.1
    lr_decay_every: int = 15
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not known; expected one of {METHODS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer={self.optimizer!r}; expected 'adam' or 'sgd'")
        for name in ("epochs", "batch_size", "lr_decay_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "head_lr", "lr_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        resolve_device(self.device)


def resolve_device(device: str) -> torch.device:
    """ "auto" means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r} is not a torch device (try 'cpu' or 'cuda')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asked for, but CUDA is not available here")
    return resolved


@dataclass
class FitResult:
    """What a run produced: the best epoch on validation and its test metrics."""

    task: str
    method: str
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    task_file: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_file"] = str(self.task_file) if self.task_file else None
        return data


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for images, labels in bar:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    *,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy, and mean loss, over `loader`."""
    model.eval()
    total_loss, top1, top5, seen = 0.0, 0, 0, 0
    hits = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right = ranked[:, 0] == labels
        top1 += int(right.sum())
        top5 += int((ranked == labels[:, None]).any(1).sum())
        seen += len(labels)
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
        hits += torch.bincount(labels[right].cpu(), minlength=num_classes)
    per_class = [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]
    return {
        "top1": top1 / max(seen, 1),
        "top5": top5 / max(seen, 1),
        "loss": total_loss / max(seen, 1),
        "per_class": per_class,
        "samples": seen,
    }


def prepare_task(
    model: PiggybackModel,
    task: str,
    data: TaskData,
    config: TrainConfig,
    *,
    train_bn: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Add `task` and return the network to train with its optimizer parameter groups."""
    model.add_task(
        task,
        data.num_classes,
        class_names=data.class_names,
        train_bn=train_bn,
        metadata={**(metadata or {}), "method": config.method},
    )
    model.set_task(task)
    if config.method == "finetune":
        network = model.bake(task)
        head = set(map(id, network.get_submodule(model.head_name).parameters()))
        body = [p for p in network.parameters() if id(p) not in head]
        heads = [p for p in network.parameters() if id(p) in head]
        return network, [{"params": body, "lr": config.lr}, {"params": heads, "lr": config.head_lr}]
    scores = model.trainable_parameters(task, "scores")
    rest = model.trainable_parameters(task, "head") + model.trainable_parameters(task, "norm")
    groups = [{"params": rest, "lr": config.head_lr}]
    if config.method == "piggyback":
        groups.insert(0, {"params": scores, "lr": config.lr})
    else:
        for score in scores:
            score.requires_grad_(False)
    return model, groups


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)


def fit(
    model: PiggybackModel,
    task: str,
    data: TaskData,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    train_bn: bool | None = None,
    resume: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train `task` on `data`, select the epoch best on validation, test it, save it.

    Writes to `out_dir`: `metrics.jsonl` (one line per epoch), `checkpoint/` (the
    state after the last finished epoch, for `resume=True`), the task file
    `TASK.safetensors` (piggyback/classifier) or `TASK.finetuned.safetensors`
    (finetune, a full model), and `result.json`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    network, groups = prepare_task(model, task, data, config, train_bn=train_bn, metadata=metadata)
    network.to(device)
    optimizer = make_optimizer(groups, config)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every, config.lr_decay)
    trainable = _trainable_state_keys(network, groups)
    val_loader = make_loader(data.val, config.batch_size, shuffle=False)
    test_loader = make_loader(data.test, config.batch_size, shuffle=False)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "top1": -1.0, "state": None}
    start_epoch, started = 0, time.perf_counter()
    checkpoint_dir = out / "checkpoint"
    if resume and checkpoint_dir.exists():
        start_epoch, history, best = load_checkpoint(
            checkpoint_dir, network, optimizer, scheduler, trainable, device
        )
    metrics_path = out / "metrics.jsonl"
    for epoch in range(start_epoch, config.epochs):
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # same stream whether resumed or not
        loader = make_loader(
            data.train,
            config.batch_size,
            shuffle=True,
            seed=config.seed * 1_000_003 + epoch,
            num_workers=config.num_workers,
        )
        desc = f"{task} {epoch + 1}/{config.epochs}"
        train_metrics = train_one_epoch(
            network, loader, optimizer, device, desc=desc, progress=config.progress
        )
        scheduler.step()
        val = evaluate(network, val_loader, device, data.num_classes, progress=False)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_metrics["loss"],
            "train_acc": train_metrics["acc"],
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "lr": optimizer.param_groups[0]["lr"],
        }
        if config.method != "finetune":
            row["kept"] = model.mask_stats(task).kept
        history.append(row)
        if val["top1"] > best["top1"]:
            best = {
                "epoch": epoch + 1,
                "top1": val["top1"],
                "state": _copy_state(network, trainable),
            }
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in history).encode())
        save_checkpoint(
            checkpoint_dir, network, optimizer, scheduler, trainable, epoch + 1, history, best
        )
        if config.progress:
            tqdm.write(
                f"{desc}: loss {row['train_loss']:.4f} train {row['train_acc']:.3f} "
                f"val {row['val_top1']:.3f}"
            )
    if best["state"] is not None:
        network.load_state_dict(best["state"], strict=False)
    val = evaluate(network, val_loader, device, data.num_classes, progress=False)
    test = evaluate(network, test_loader, device, data.num_classes, progress=False)
    task_file = save_result_model(model, network, task, config.method, out)
    result = FitResult(
        task=task,
        method=config.method,
        best_epoch=best["epoch"],
        val=val,
        test=test,
        history=history,
        seconds=time.perf_counter() - started,
        task_file=task_file,
    )
    write_atomic(out / "result.json", json.dumps(result.to_dict(), indent=2).encode())
    return result


def save_result_model(
    model: PiggybackModel, network: nn.Module, task: str, method: str, out: Path
) -> Path:
    """The task file for masked methods; a full safetensors model for fine-tuning."""
    if method != "finetune":
        model.freeze_task(task)
        return model.save_task(task, out / f"{task}.safetensors")
    from safetensors.torch import save as safetensors_save

    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    meta = {
        "task": task,
        "method": method,
        "class_names": json.dumps(model.task_info[task].class_names),
    }
    path = out / f"{task}.finetuned.safetensors"
    write_atomic(path, safetensors_save(state, metadata=meta))
    return path


def _trainable_state_keys(network: nn.Module, groups: list[dict[str, Any]]) -> list[str]:
    """state_dict keys of what training changes: trained parameters and their modules' buffers."""
    ids = {id(p) for group in groups for p in group["params"]}
    keys = [name for name, p in network.named_parameters() if id(p) in ids]
    owners = {name.rpartition(".")[0] for name in keys}
    keys += [name for name, _ in network.named_buffers() if name.rpartition(".")[0] in owners]
    return keys


def _copy_state(network: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    state = network.state_dict()
    return {k: state[k].detach().clone() for k in keys}
