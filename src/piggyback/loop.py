"""The training loop's two passes, over any model and loader: one epoch of training, and
an evaluation. `piggyback.train.fit` runs them; they work alone too.

Under torchrun each process passes its own share of the data and every process gets the
metrics of the whole set (`piggyback.distributed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import DataError
from .precision import Amp, autocast

PROGRESS_SECONDS = 0.5  # how often the bar's running loss and accuracy are read back


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
    # Summed where the steps run and read back once: on a GPU each read of a step's loss
    # holds the host until the step is done, so the next one is not queued behind it.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, shown = 0, time.monotonic()
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
        loss_sum += loss.detach().double() * len(labels)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(labels)
        if progress and time.monotonic() - shown >= PROGRESS_SECONDS:
            running = (loss_sum / seen).item(), correct.item() / seen
            bar.set_postfix(loss=f"{running[0]:.3f}", acc=f"{running[1]:.3f}")
            shown = time.monotonic()
    loss_total, correct_total = torch.stack((loss_sum, correct.double())).tolist()
    totals = distributed.all_sum(
        torch.tensor([loss_total, correct_total, seen], dtype=torch.float64)
    )
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
    # summed where the batches run and read back once (see `train_one_epoch`)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    ranks = torch.zeros(2, dtype=torch.long, device=device)  # right at top-1, in top-5
    hits = torch.zeros(num_classes, dtype=torch.long, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    seen = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not progress):
        _check_batch_labels(labels, num_classes)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        if observe is not None:
            observe(logits, labels)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        right = ranked[:, 0] == labels
        ranks += torch.stack((right.sum(), (ranked == labels[:, None]).any(1).sum()))
        seen += len(labels)
        counts.index_add_(0, labels, torch.ones_like(labels))  # bincount would read the max
        hits.index_add_(0, labels, right.long())
    read = torch.cat((torch.stack((loss_sum, *ranks.double())), hits.double(), counts.double()))
    total_loss, top1, top5, *per_class_counts = read.tolist()
    totals = distributed.all_sum(torch.tensor([total_loss, top1, top5, seen], dtype=torch.float64))
    total_loss, (top1, top5, seen) = float(totals[0]), totals[1:].long().tolist()
    hits, counts = distributed.all_sum(torch.tensor(per_class_counts).long().view(2, num_classes))
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
