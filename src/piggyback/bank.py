"""Stored tasks' masks, resident on the backbone's device, and W * mask derived from them.

A stored task keeps one flat bit-packed buffer (1 bit per masked weight, 2 for ternary)
over every masked layer in the model's order: the layout of a task file's mask, so a
loaded task is its decoded bits, kept as they are. A layer's mask is the slice of bits
from its `start`. Deriving a layer's masked weight reads its bits where they live (no
host round trip) and never makes a float mask: on the CPU the weight's bits are
multiplied as integers by the unpacked 0/1 bytes, the values of every layer derived at
once (`masks_into`) split in equal parts over torch's CPU threads; elsewhere
`torch.where` selects with the bytes viewed as bool, after one unpack of the whole task
for every layer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate, pairwise

import numpy as np
import torch
from torch import nn

from .bits import MaskKind, bits_per_value, pack_mask, unpack_binary, unpack_mask
from .errors import ConfigError, UnknownTaskError
from .functional import kept

# Integer views of float weights: multiplying the bits by 1 keeps them, by 0 gives +0.0,
# exactly what torch.where(keep, weight, 0) gives.
_INT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 18  # values unpacked at a time on the CPU: 256 KB of 0/1 bytes, in L2
_MIN_PART = 1 << 16  # the fewest values worth handing to another thread (~0.1 ms of work)


class MaskBank(nn.Module):
    """One flat packed mask per stored task, moved with the model (`model.to(device)`)
    and kept in its state_dict as ``bank.bits.TASK``.

    Example:
        >>> bank = MaskBank([4, 2])
        >>> masks = [torch.tensor([1, 0, 1, 1]), torch.tensor([0, 1])]
        >>> bank.store("a", masks, "binary", torch.device("cpu"))
        >>> bank.values("a", start=4, numel=2, dtype=torch.int8)
        tensor([0, 1], dtype=torch.int8)
    """

    def __init__(self, numels: Sequence[int]) -> None:
        super().__init__()
        self.numel = sum(numels)
        self.bits = BufferDict()
        self.kinds: dict[str, MaskKind] = {}

    def __contains__(self, task: str) -> bool:
        return task in self.kinds

    def store(
        self, task: str, masks: Sequence[torch.Tensor], kind: MaskKind, device: torch.device
    ) -> None:
        """Pack the masks of every layer, in order, as `task`'s bits on `device`."""
        flat = torch.cat([mask.detach().flatten().to(device) for mask in masks])
        self.store_bits(task, pack_mask(flat, kind), kind, device)

    def store_bits(
        self, task: str, bits: torch.Tensor, kind: MaskKind, device: torch.device
    ) -> None:
        """Keep packed bits (a decoded task file's) as `task`'s, on `device`."""
        expected = math.ceil(self.numel * bits_per_value(kind) / 8)
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != expected:
            raise ConfigError(
                f"{kind} masks of {self.numel} values pack into {expected} uint8 bytes; "
                f"got a {bits.dtype} tensor of shape {tuple(bits.shape)}"
            )
        self.bits[task] = bits.to(device)
        self.kinds[task] = kind

    def remove(self, task: str) -> None:
        self.bits.pop(task)
        self.kinds.pop(task, None)

    def values(
        self, task: str, start: int, numel: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """`numel` mask values of `task` from the `start`-th on, flat, as `dtype`."""
        return unpack_mask(self.packed(task), numel, self.kinds[task], dtype, start)

    def packed(self, task: str) -> torch.Tensor:
        """`task`'s packed bits (read from the dicts directly: each masked layer's forward
        asks, to check that its cached weight is current)."""
        if task not in self.kinds:
            raise UnknownTaskError(f"no stored masks for task {task!r}; stored: {list(self.kinds)}")
        return self._modules["bits"]._buffers[task]

    def unpacks_at_once(self, task: str) -> bool:
        """Whether `keep_all` serves `task`: a stored binary task off the CPU (on the CPU
        each chunk of values unpacks its own bits into its product, `masks_into`)."""
        return (
            task in self.kinds
            and self.kinds[task] == "binary"
            and self.packed(task).device.type != "cpu"
        )

    def select_all(self, task: str, weights: torch.Tensor, out: torch.Tensor) -> None:
        """Every layer's W * mask of a task that `unpacks_at_once`, from the masked
        weights end to end (`flatweights.FlatWeights`) into `out`: one select."""
        kept(self.keep_all(task), weights, out)

    def keep_all(self, task: str) -> torch.Tensor:
        """Every layer's keep flags of a task that `unpacks_at_once`, unpacked at once (one
        chain of kernels for the whole model instead of one per layer)."""
        return unpack_mask(self.packed(task), self.numel, "binary", torch.bool)


def masked_into(
    weight: torch.Tensor,
    bank: MaskBank,
    task: str,
    start: int,
    out: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """W * mask of a stored task, written into `out` when given (else a new tensor).

    Binary masks select (dropped weights become +0.0); ternary ones multiply. `keep`:
    this layer's slice of `MaskBank.keep_all`, when the whole task was unpacked at once.
    """
    numel, kind = weight.numel(), bank.kinds.get(task)
    if kind == "ternary":
        values = bank.values(task, start, numel, torch.int8).view(weight.shape)
        return torch.mul(weight, values.to(weight.dtype), out=out)
    if keep is None and _numpy_select(weight, out):
        target = torch.empty_like(weight) if out is None else out
        _select_on_cpu(bank.packed(task), [(weight, start, target)])
        return target
    if keep is None:
        keep = bank.values(task, start, numel, torch.bool)
    return kept(keep.view(weight.shape), weight, out)


def masks_into(
    bank: MaskBank, task: str, layers: Sequence[tuple[torch.Tensor, int, torch.Tensor]]
) -> None:
    """W * mask of several layers of a stored task at once, each (weight, the place of
    its first value in the task's bits, the tensor to write): on the CPU their values end
    to end in equal parts over the threads (layers one by one leave the threads idle
    between parts, and a small layer on one thread); a binary task elsewhere from one
    unpack for every layer (`MaskBank.keep_all`); else layer by layer."""
    if bank.kinds.get(task) == "binary" and all(_numpy_select(w, out) for w, _, out in layers):
        _select_on_cpu(bank.packed(task), layers)
        return
    keep = bank.keep_all(task) if bank.unpacks_at_once(task) else None
    for weight, start, out in layers:
        part = None if keep is None else keep[start : start + weight.numel()]
        masked_into(weight, bank, task, start, out, part)


def _select_on_cpu(
    packed: torch.Tensor, layers: Sequence[tuple[torch.Tensor, int, torch.Tensor]]
) -> None:
    """Binary W * mask of `layers` (as `masks_into` takes them) with numpy: each weight's
    bits multiplied as integers by its unpacked 0/1 bytes, a chunk at a time."""
    views = []
    for weight, start, out in layers:
        as_int = _INT_VIEWS[weight.element_size()]
        source = weight.detach().view(as_int).numpy().reshape(-1)
        views.append((source, out.view(as_int).numpy().reshape(-1), start))
    ends = list(accumulate(len(source) for source, _, _ in views))
    bits = packed.numpy()

    def select(first: int, last: int) -> None:
        for (source, written, start), (low, high) in zip(views, pairwise([0, *ends]), strict=True):
            for begin in range(max(first, low) - low, min(last, high) - low, _CHUNK):
                end = min(begin + _CHUNK, last - low, len(source))  # chunks' bytes stay in cache
                codes = unpack_binary(bits, end - begin, start + begin)
                np.multiply(source[begin:end], codes, out=written[begin:end])

    _on_threads(select, ends[-1] if ends else 0)


def _on_threads(work: Callable[[int, int], None], numel: int) -> None:
    """`work(first, last)` over values 0 to `numel`, in equal parts over torch's CPU
    threads (this one and a pool's; numpy's unpack and multiply let go of the GIL). Each
    value is written by one thread alone: the result is the same on any number of them."""
    threads = min(torch.get_num_threads(), numel // _MIN_PART)
    if threads < 2:
        work(0, numel)
        return
    first, *others = pairwise(numel * part // threads for part in range(threads + 1))
    pending = [_pool().submit(work, *part) for part in others]
    try:
        work(*first)
    finally:
        for done in pending:
            done.result()


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool() -> ThreadPoolExecutor:
    """This process's pool (a forked child makes its own: the parent's threads are not in
    it). It starts a thread only when no idle one can take a part, so it holds as many as
    the most parts handed to it at once."""
    pid = os.getpid()
    if pid not in _POOLS:
        workers = os.cpu_count() or 1
        _POOLS[pid] = ThreadPoolExecutor(workers, thread_name_prefix="piggyback-derive")
    return _POOLS[pid]


def _numpy_select(weight: torch.Tensor, out: torch.Tensor | None) -> bool:
    """Whether numpy's integer multiply can write W * mask: CPU, contiguous, float."""
    return (
        weight.device.type == "cpu"
        and weight.is_floating_point()
        and weight.element_size() in _INT_VIEWS
        and weight.is_contiguous()
        and (out is None or out.is_contiguous())
    )


class BufferDict(nn.Module):
    """Tensors keyed by task name, moved with the module and kept in its state_dict."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def pop(self, key: str) -> torch.Tensor | None:
        return self._buffers.pop(key, None)
