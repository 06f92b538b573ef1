"""Dynamic batching: concurrent requests, whatever their tasks, share one forward pass.

Requests wait in a queue. The oldest waiting request opens a window of `window_s`;
when the window closes, or as soon as `max_batch` images wait, the requests that fit
become one batch, which a single worker thread runs while the next batch gathers. One
worker means the model never runs in two threads at once (so switching tasks on it is
safe), and the event loop stays free to accept and decode requests meanwhile. Under
load the window hardly matters: requests pile up while a batch runs, and the next
batch takes them at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

import torch

from ..errors import PiggybackError


class ShuttingDownError(PiggybackError, RuntimeError):
    """A request arrived after, or was still waiting when, the server began to stop."""


@dataclass(frozen=True)
class Job:
    """One request's images, preprocessed to ``[n, 3, H, W]``, for one task."""

    task: str
    images: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.images.shape[0])


# Runs a batch: one outcome per job, its logits or the error that only that job gets.
RunBatch = Callable[[list[Job]], list[torch.Tensor | Exception]]


@dataclass
class _Waiting:
    job: Job
    future: asyncio.Future[torch.Tensor]
    since: float


class Batcher:
    """Gathers jobs from concurrent requests into batches for `run`.

    Example:
        >>> async def main() -> torch.Tensor:
        ...     batcher = Batcher(lambda jobs: [j.images.sum(1) for j in jobs], window_s=0.005,
        ...                       max_batch=8)
        ...     batcher.start()
        ...     result = await batcher.submit(Job("birds", torch.ones(2, 3)))
        ...     await batcher.stop()
        ...     return result
        >>> asyncio.run(main())
        tensor([3., 3.])
    """

    def __init__(self, run: RunBatch, *, window_s: float, max_batch: int) -> None:
        self._run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self._waiting: deque[_Waiting] = deque()
        self._waiting_rows = 0
        self._running: list[_Waiting] = []
        self._arrived = asyncio.Event()  # a fresh one in start(): an Event binds to a loop
        self._loop_task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        """Start gathering; call from the event loop that will submit jobs."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="piggyback-infer")
        self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Stop gathering; every job not yet answered fails with ShuttingDownError."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with suppress(asyncio.CancelledError):
                await self._loop_task
        for waiting in (*self._running, *self._waiting):
            if not waiting.future.done():
                waiting.future.set_exception(ShuttingDownError("the server is shutting down"))
        self._waiting.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> torch.Tensor:
        """Wait for `job`'s logits (or its error), computed in some batch."""
        if self._loop_task is None or self._loop_task.done():
            raise ShuttingDownError("the server is not accepting requests (not running)")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._waiting.append(_Waiting(job, future, loop.time()))
        self._waiting_rows += job.rows
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = await self._gather()
            jobs = [waiting.job for waiting in self._running]
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as exc:  # a bug met by one batch must not stop the server
                outcomes = [exc] * len(jobs)
            self.batches += 1
            self.images += sum(job.rows for job in jobs)
            for waiting, outcome in zip(self._running, outcomes, strict=True):
                if waiting.future.done():  # its client went away
                    continue
                if isinstance(outcome, Exception):
                    waiting.future.set_exception(outcome)
                else:
                    waiting.future.set_result(outcome)
            self._running = []

    async def _gather(self) -> list[_Waiting]:
        """Wait for a job, then until the oldest one's window closes or a batch is full."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._waiting[0].since + self.window_s
            while self._waiting_rows < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            batch = self._take()
            if batch:  # empty when every waiting client had gone away
                return batch

    def _take(self) -> list[_Waiting]:
        """The oldest jobs that fit in `max_batch` images (always at least one)."""
        batch: list[_Waiting] = []
        rows = 0
        while self._waiting:
            head = self._waiting[0]
            if batch and not head.future.done() and rows + head.job.rows > self.max_batch:
                break
            self._waiting.popleft()
            self._waiting_rows -= head.job.rows
            if not head.future.done():
                batch.append(head)
                rows += head.job.rows
        return batch
