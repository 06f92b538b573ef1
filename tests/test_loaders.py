"""Loaders: a run's loader draws what a loader per epoch draws, and "auto" workers."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from piggyback import workers
from piggyback.cli import build_parser
from piggyback.data import EpochLoader, make_loader
from piggyback.errors import ConfigError
from piggyback.workers import check_workers, resolve_workers


class RandomItems(Dataset):
    """Items that draw random numbers, as random augmentations do, and say who read them."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int, int]:
        return torch.rand(2), item, os.getpid()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_run_loader_draws_what_a_loader_per_epoch_draws(num_workers: int) -> None:
    items = RandomItems()
    sampler = DistributedSampler(items, num_replicas=1, rank=0, seed=7)
    run = EpochLoader(items, 3, sampler, num_workers=num_workers)
    readers = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        torch.manual_seed(100 + epoch)  # what fit does: draws in the training process
        alone = make_loader(
            items, 3, shuffle=False, seed=100 + epoch, num_workers=num_workers, sampler=sampler
        )
        expected = list(alone)
        torch.manual_seed(100 + epoch)
        batches = list(run.epoch(100 + epoch))
        assert len(batches) == len(expected) == 4
        for got, want in zip(batches, expected, strict=True):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        readers.append({int(pid) for batch in batches for pid in batch[2]})
    if num_workers:  # the same worker processes all run long
        assert readers[0] == readers[1] == readers[2] and os.getpid() not in readers[0]


def test_auto_workers_come_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers("auto", "cpu") == 0  # the training threads use every core
    assert resolve_workers("auto", "cuda") == workers.MAX_AUTO_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 training processes share 16 cores
    assert resolve_workers("auto", "cuda") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert resolve_workers("auto", "cuda") == 1
    assert resolve_workers(5, "cuda") == 5 and resolve_workers(2, "cpu") == 2


@pytest.mark.parametrize("value", [-1, 1.5, True, "many", None])
def test_bad_worker_settings_say_what_is_allowed(value: object) -> None:
    with pytest.raises(ConfigError, match=r"num_workers must be 'auto' or an integer >= 0"):
        check_workers(value)


def test_the_command_line_takes_auto_or_a_count() -> None:
    parse = build_parser().parse_args
    assert parse(["train", "--data", "digits"]).num_workers == "auto"
    assert parse(["train", "--data", "digits", "--num-workers", "3"]).num_workers == 3
    assert build_parser(train_defaults={"num_workers": "auto"}).parse_args(
        ["train"]
    ).num_workers == "auto"  # fmt: skip
    with pytest.raises(SystemExit):
        parse(["train", "--num-workers", "some"])
