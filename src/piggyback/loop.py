"""The training loop's two passes, over any model and loader: one epoch of training, and
an evaluation. `piggyback.train.fit` runs them; they work alone too.

Under torchrun each process passes its own share of the data and every process gets the
metrics of the whole set (`piggyback.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import DataError
from .precision import Amp, autocast


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    desc: str = "train",
    progress: bool = True,
    amp: Amp | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss and accuracy (over every process's share).

    `scaler` scales fp16 losses so small gradients do not underflow.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for images, labels in bar:
        if len(labels) == 1 and model.training:
            continue  # a last batch of one sample: BatchNorm cannot train on it
        targets = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True))
            _check_batch_labels(labels, logits.shape[1])
            loss = F.cross_entropy(logits, targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == targets).sum())
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    totals = distributed.all_sum(torch.tensor([total_loss, correct, seen], dtype=torch.float64))
    total_loss, correct, seen = totals.tolist()
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
    amp: Amp | None = None,
    observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy, and mean loss, over `loader`; `observe`, if
    given, sees each batch's logits and labels (`taskinfer.calibrating`).

    Under torch.distributed each process passes its own share of the set
    (`distributed.shard`) and every process gets the metrics of the whole set.
    """
    model.eval()
    total_loss, top1, top5, seen = 0.0, 0, 0, 0
    hits = torch.zeros(num_classes, dtype=torch.long)
    counts = torch.zeros(num_classes, dtype=torch.long)
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        _check_batch_labels(labels, num_classes)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        if observe is not None:
            observe(logits, labels)
        total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right = ranked[:, 0] == labels
        top1 += int(right.sum())
        top5 += int((ranked == labels[:, None]).any(1).sum())
        seen += len(labels)
        counts += torch.bincount(labels.cpu(), minlength=num_classes)
        hits += torch.bincount(labels[right].cpu(), minlength=num_classes)
    totals = distributed.all_sum(torch.tensor([total_loss, top1, top5, seen], dtype=torch.float64))
    total_loss, (top1, top5, seen) = float(totals[0]), totals[1:].long().tolist()
    hits, counts = distributed.all_sum(torch.stack([hits, counts]))
    per_class = [float(h / c) if c else None for h, c in zip(hits, counts, strict=True)]
    return {
        "top1": top1 / max(seen, 1),
        "top5": top5 / max(seen, 1),
        "loss": total_loss / max(seen, 1),
        "per_class": per_class,
        "samples": seen,
    }


def _check_batch_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Refuse a batch whose labels the head has no output for: cross_entropy would fail
    deep inside, on CUDA as a device-side assert that ends the process. `labels` are the
    loader's, still on the CPU, so checking them costs no device sync."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"a batch has labels {int(labels.min())}..{int(labels.max())}, but the head has "
            f"{num_classes} classes (0..{num_classes - 1}); train or evaluate it on data "
            "with those classes"
        )
