"""What would make the host wait for a GPU, recorded on the CPU.

On a GPU the host queues kernels and runs ahead; it waits for the device when it reads a
device tensor's values (``item``, ``tolist``, ``bool``, ``.cpu()``), runs an op whose
output size depends on values (``nonzero``, boolean indexing, ``unique``), or uploads
with a blocking copy (``torch.tensor(..., device=...)``). Each wait empties the queue:
on paths bound by the host, as piggyback's are on a GPU at batch 16-64, the device then
idles while the host catches up. `host_waits` records such calls made by piggyback's code,
or by torch on its behalf (a BatchNorm reading its batch count), on a model on the CPU, so
tests can hold the per-batch paths to none; torch's reads of values it keeps on the host
(a sampler's seeds, an optimizer's step counters) are left out.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import piggyback

_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
}  # not numpy(): it refuses a device tensor, so only the CPU's own paths call it
_UPLOADS = {torch.tensor, torch.as_tensor}
_SIZED_BY_VALUES = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::_local_scalar_dense",
}
PACKAGE = str(Path(piggyback.__file__).parent)
# torch's code that reads values it keeps on the host by design: a DataLoader's sampler
# seeds, an optimizer's step counters (on the CPU unless `capturable`)
HOST_SIDE = (
    str(Path(torch.__file__).parent / "utils" / "data"),
    str(Path(torch.__file__).parent / "optim"),
)


def _caller() -> str | None:
    """`file:function` of the innermost frame in piggyback's code (a read inside torch on
    piggyback's behalf counts: a BatchNorm reading its count), None if none or if it is
    torch's own reading of host-side values."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(HOST_SIDE):
            return None
        if frame.filename.startswith(PACKAGE):
            return f"{Path(frame.filename).name}:{frame.name}"
    return None


class _Calls(TorchFunctionMode):
    def __init__(self, seen: list[tuple[str, str]]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        data = args[0] if args else kwargs.get("data")
        upload = (  # Python values to a device (a tensor there already is no upload)
            func in _UPLOADS and kwargs.get("device") is not None and not torch.is_tensor(data)
        )
        if func in _READS or upload:
            where = _caller()
            if where is not None:
                self.seen.append((func.__name__, where))
        return func(*args, **kwargs)


class _Ops(TorchDispatchMode):
    def __init__(self, seen: list[tuple[str, str]]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func._schema.name
        if name in _SIZED_BY_VALUES:
            where = _caller()
            if where is not None:
                self.seen.append((name, where))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_waits() -> Iterator[list[tuple[str, str]]]:
    """While the block runs, each call of piggyback's that would make the host wait for
    a GPU, as (what, `file:function`), in order."""
    seen: list[tuple[str, str]] = []
    with _Calls(seen), _Ops(seen):
        yield seen
