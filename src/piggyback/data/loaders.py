"""Batches of a task's items: `make_loader` for a pass, `EpochLoader` for a training run.

Both seed their order (the same seed, the same batches) and drop unreadable (None)
items instead of failing the epoch. Given a CUDA `device`, batches arrive in pinned
memory, so that their copies to the GPU run asynchronously (`non_blocking`); worker
processes each keep `PREFETCH_BATCHES` batches ready.
"""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from ..errors import ConfigError

PREFETCH_BATCHES = 4  # per worker: enough to ride out a slow image or a busy core


def _collate_present(batch: list[Any]) -> Any:
    """Collate the items that could be read; None when none could."""
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None


class _SkipEmptyLoader(DataLoader):
    """A DataLoader that never yields an empty batch (one whose every image failed)."""

    def __iter__(self) -> Any:
        for batch in super().__iter__():
            if batch is not None:
                yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    device: torch.device | None = None,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling is seeded (same seed, same order of batches) and which
    drops unreadable (None) items instead of failing the epoch. A `sampler` (e.g. a
    DistributedSampler) sets the order instead of `shuffle`; `seed` still seeds workers.
    On a CUDA `device` batches come in pinned memory; `persistent` keeps the worker
    processes from one pass to the next (for a loader that is iterated many times)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    ahead = {"prefetch_factor": PREFETCH_BATCHES, "persistent_workers": persistent}
    return _SkipEmptyLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
        collate_fn=_collate_present,
        drop_last=False,
        pin_memory=device is not None and device.type == "cuda",
        **(ahead if num_workers else {}),
    )


def _base_seed(seed: int) -> int:
    """The base seed of the workers of a loader whose generator is seeded `seed`: its
    first draw, as DataLoader takes it."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


class _EpochSeeded(Dataset):
    """`dataset` as a persistent worker reads it: at its first item of each epoch the
    worker seeds itself as a fresh worker of that epoch's loader would be (base seed
    plus worker id, DataLoader's rule), so that random augmentations draw the same
    numbers whether workers live for the run or for an epoch, and whether resumed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.base_seed = multiprocessing.RawValue("q", 0)  # shared with the workers
        self._applied: int | None = None  # in a worker: the base seed it seeded itself with

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int) -> Any:
        worker, base = get_worker_info(), self.base_seed.value
        if worker is not None and base != self._applied:
            random.seed(base + worker.id)
            torch.manual_seed(base + worker.id)
            self._applied = base
        return self.dataset[item]


class EpochLoader:
    """A training run's loader, made once, so that its worker processes live for the
    whole run instead of starting again every epoch.

    `epoch(seed)` readies it for one epoch (after the sampler's `set_epoch`): its
    batches, and the random numbers each item draws, are those of
    `make_loader(dataset, ..., seed=seed)` made for that epoch alone.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        sampler: Sampler,
        *,
        num_workers: int,
        device: torch.device | None = None,
    ) -> None:
        self._seeded = _EpochSeeded(dataset) if num_workers else None
        self.loader = make_loader(
            dataset if self._seeded is None else self._seeded,
            batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=num_workers,
            device=device,
            persistent=True,
        )

    def epoch(self, seed: int) -> DataLoader:
        """The loader, seeded for the epoch whose seed is `seed`."""
        self.loader.generator.manual_seed(seed)  # type: ignore[union-attr]
        if self._seeded is not None:
            self._seeded.base_seed.value = _base_seed(seed)
        return self.loader
