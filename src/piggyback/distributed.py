"""Several processes, one training run: PyTorch's own engine (torchrun, DistributedDataParallel).

torchrun starts one process per GPU (or per CPU worker) and tells each its RANK, WORLD_SIZE
and LOCAL_RANK. `process_group` joins them (NCCL on CUDA, Gloo on the CPU); the other
functions do what one process would do when there is no group, so the training loop has
a single code path.

Example (a single process, where every function is a no-op):
    >>> world_size(), is_main(), all_sum(torch.tensor([2.0])).item()
    (1, True, 2.0)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset

from .errors import ConfigError

# DDP would broadcast every buffer (frozen BatchNorm statistics, other tasks' packed masks)
# from rank 0 before each forward; `average_` syncs the few that training changes instead.
# torch >= 2.13 names the switch `forward_sync_buffers`; older versions `broadcast_buffers`.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def _launched_world_size() -> int:
    """How many processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """Under torchrun a plain "cuda" means this process's own GPU, cuda:LOCAL_RANK."""
    if device.type != "cuda" or device.index is not None or "LOCAL_RANK" not in os.environ:
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the torchrun job for the block: NCCL when `device` is CUDA, else Gloo.

    Does nothing when there is one process or a group already exists (the caller's).
    """
    if _launched_world_size() <= 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` (a CPU tensor) summed over every process; returned on the CPU."""
    if world_size() == 1:
        return values
    on_device = dist.get_backend() == "nccl"
    summed = values.to(torch.device("cuda", torch.cuda.current_device()) if on_device else "cpu")
    dist.all_reduce(summed)
    return summed.cpu()


def average_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each floating-point tensor in place by its mean over the processes.

    For BatchNorm running statistics trained without SyncBatchNorm: each process
    estimates them from its own share of the batches, and the mean of the running
    means is the running mean of the whole batches.
    """
    if world_size() == 1:
        return
    for tensor in tensors:
        if tensor.is_floating_point():
            dist.all_reduce(tensor)
            tensor.div_(world_size())


def all_equal(value: Any) -> bool:
    """Whether every process holds the same (picklable) `value`."""
    if world_size() == 1:
        return True
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def train_sampler(dataset: Dataset, seed: int) -> DistributedSampler:
    """Each process's share of a seeded shuffle; call `set_epoch` before every epoch.

    The shuffle depends only on `seed` and the epoch, and process r takes positions
    r, r + W, r + 2W... of it (W processes). With per-process batches of B / W, step k
    of all processes together covers positions kB..(k+1)B-1: exactly the batch that a
    single process (W = 1, batch B) uses at step k. When W does not divide the dataset,
    the first items are repeated to even out the shares (DistributedSampler's padding).
    """
    return DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed
    )


def shard(dataset: Dataset) -> Dataset:
    """This process's share of an evaluation set: items rank, rank + W, ...; no padding,
    so sums over the processes (`all_sum`) count every item exactly once."""
    if world_size() == 1:
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


@contextmanager
def data_parallel(
    network: nn.Module, device: torch.device, params: list[nn.Parameter], *, sync_bn: bool = False
) -> Iterator[nn.Module]:
    """`network` under DistributedDataParallel for the block (`network` itself when alone).

    DDP all-reduces the gradients of exactly the parameters that require one, so these
    must be `params` (what the optimizer trains): a frozen backbone is never reduced.
    `sync_bn` swaps the trainable BatchNorm layers for SyncBatchNorm (CUDA only) for the
    block: batch statistics over the whole global batch, as one process would compute.
    """
    if world_size() == 1:
        yield network
        return
    needing_grad = {id(p) for p in network.parameters() if p.requires_grad}
    if needing_grad != {id(p) for p in params}:
        raise ConfigError(
            f"DistributedDataParallel would all-reduce {len(needing_grad)} parameter tensors "
            f"but the optimizer trains {len(params)}: set requires_grad=False on the others"
        )
    restore = _use_sync_batchnorm(network) if sync_bn else (lambda: None)
    try:
        yield DistributedDataParallel(
            network,
            device_ids=[device] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            **_NO_FORWARD_BUFFER_SYNC,
        )
    finally:
        restore()


def _use_sync_batchnorm(network: nn.Module) -> Callable[[], None]:
    """Swap every trainable BatchNorm for a SyncBatchNorm holding the same parameter and
    buffer tensors; returns the function that puts the originals (now updated) back.

    Only trainable ones: piggyback's frozen norms (a TaskNorm's base layer) run in eval
    mode, where SyncBatchNorm would do nothing but change the backbone's module types.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            trainable = any(p.requires_grad for p in child.parameters(recurse=False))
            if isinstance(child, _BatchNorm) and trainable:
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))

    def restore() -> None:
        for parent, name, child in swapped:
            setattr(parent, name, child)

    return restore
