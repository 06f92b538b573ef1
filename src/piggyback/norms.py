"""A task's own BatchNorm layers: start them as the frozen backbone, and re-estimate
their statistics under the mask. Both are parts of the default recipe (docs/method.md).

Each runs up to `ImagePass.count` training images through the task's network in eval mode,
without gradients; under torchrun each process takes its share and the statistics are
averaged over the processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from . import distributed
from .data import make_loader
from .model import PiggybackModel
from .precision import Amp, autocast

BatchNorm = nn.modules.batchnorm._BatchNorm


def task_batchnorms(model: PiggybackModel, task: str) -> list[tuple[BatchNorm, BatchNorm]]:
    """(the task's own, the backbone's) pairs of BatchNorm layers with running statistics."""
    pairs = []
    for wrapper in model.norms.values():
        own, base = wrapper.layer_for(task), wrapper.base_layer
        if own is not base and isinstance(own, BatchNorm) and own.track_running_stats:
            pairs.append((own, base))
    return pairs


@dataclass(frozen=True)
class ImagePass:
    """How many training images a norm pass runs, in batches of what size, shuffled with
    which seed, in which precision."""

    count: int
    batch_size: int
    seed: int
    amp: Amp | None = None


def _run_images(
    model: PiggybackModel,
    task: str,
    images: Dataset,
    device: torch.device,
    run: ImagePass,
    observe: tuple[list[BatchNorm], Callable[[nn.Module, tuple], None]],
) -> None:
    """Forward `run.count` of `images` (each process its share) through the task's
    network, with `observe`'s forward pre-hook on each of its layers for the pass."""
    layers, pre_hook = observe
    hooks = [layer.register_forward_pre_hook(pre_hook) for layer in layers]
    was_training, active = model.training, model.active_task
    model.set_task(task).eval()
    batch = max(1, run.batch_size // distributed.world_size())
    share = math.ceil(run.count / distributed.world_size())
    loader = make_loader(distributed.shard(images), batch, shuffle=True, seed=run.seed)
    try:
        seen = 0
        for inputs, _ in loader:
            with torch.no_grad(), autocast(device, run.amp):
                model(inputs.to(device, non_blocking=True))
            seen += len(inputs)
            if seen >= share:
                break
    finally:
        for hook in hooks:
            hook.remove()
        model.set_task(active).train(was_training)


def recalibrate_norms(
    model: PiggybackModel,
    task: str,
    images: Dataset,
    device: torch.device,
    run: ImagePass,
) -> None:
    """Re-estimate the task's BatchNorm statistics under its current mask.

    While masks train, a BatchNorm normalises with batch statistics, but its running
    averages trail the masks by many steps: evaluated with them, a network whose masks
    just moved can fall to chance. The cumulative average over `run.count` training images,
    with the mask as it is now, is what evaluation and the task file then use.
    """
    norms = [own for own, _ in task_batchnorms(model, task)]
    if not norms or not run.count:
        return
    momenta = [n.momentum for n in norms]
    for norm in norms:
        norm.reset_running_stats()
    batches = dict.fromkeys(map(id, norms), 0)

    def batch_statistics(module: nn.Module, _inputs: tuple) -> None:
        module.train()  # this layer alone: the rest of the network stays in eval mode
        # A cumulative average: the n-th batch weighs 1/n. What momentum=None does, but
        # counted here: torch reads its count off the device, on a GPU a wait per layer.
        batches[id(module)] += 1
        module.momentum = 1.0 / batches[id(module)]

    try:
        _run_images(model, task, images, device, run, observe=(norms, batch_statistics))
        distributed.average_(t for n in norms for t in (n.running_mean, n.running_var))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
            norm.train(model.training)


@torch.no_grad()
def start_norms_as_backbone(
    model: PiggybackModel,
    task: str,
    images: Dataset,
    device: torch.device,
    run: ImagePass,
) -> None:
    """Start the task's own BatchNorm layers where the frozen backbone is.

    In training mode a BatchNorm normalises with the batch's statistics, which on a new
    domain can be far from the backbone's running ones (a channel nearly constant on
    grey images would be scaled up by orders of magnitude). So each of the task's layers
    takes the mean and variance of its input on `run.count` task images under the plain
    backbone, and sets its affine parameters so that normalising with them gives what
    the frozen layer gives: ``gamma' = gamma * sigma_task / sigma_backbone`` and
    ``beta' = beta + gamma * (mu_task - mu_backbone) / sigma_backbone``. The task starts
    as the plain backbone, and a mask that shifts a channel is still re-centred by the
    batch statistics. Call it before the mask or the norms have trained.
    """
    pairs = [(own, base) for own, base in task_batchnorms(model, task) if own.affine]
    if not pairs or not run.count:
        return
    sums: dict[int, torch.Tensor] = {}  # per layer: (mean, variance) summed over batches
    batches: dict[int, int] = {}

    def measure(module: nn.Module, inputs: tuple) -> None:
        key = id(module)
        sums[key] = sums.get(key, 0) + _channel_moments(inputs[0].float())
        batches[key] = batches.get(key, 0) + 1

    # The task's own layers are still copies of the backbone's: the plain network.
    _run_images(model, task, images, device, run, observe=([own for own, _ in pairs], measure))
    moments = [sums[id(own)] / batches[id(own)] for own, _ in pairs]
    distributed.average_(moments)
    for (own, base), (mean, var) in zip(pairs, moments, strict=True):
        own.running_mean.copy_(mean)
        own.running_var.copy_(var)
        base_sigma = (base.running_var + base.eps).sqrt()
        own.weight.copy_(base.weight * (var + own.eps).sqrt() / base_sigma)
        own.bias.copy_(base.bias + base.weight * (mean - base.running_mean) / base_sigma)


def _channel_moments(x: torch.Tensor) -> torch.Tensor:
    """(mean, unbiased variance) per channel of a batch: what BatchNorm's training pass
    computes, taken from its fused kernel (3-4x faster on the CPU than `torch.var_mean`
    over the batch and spatial dimensions, and equal to it within 1e-7)."""
    channels = x.shape[1]
    mean = x.new_zeros(channels)
    var = x.new_ones(channels)
    F.batch_norm(x, mean, var, training=True, momentum=1.0)  # running stats := the batch's
    return torch.stack([mean, var])
