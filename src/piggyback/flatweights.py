"""Every masked layer of a stored binary task derived in one select, on an accelerator.

A switch derives each masked layer's W * mask. On a GPU, layer by layer, that is one
select per layer (53 for ResNet-50), and launching each costs more host time than the
GPU takes to run it: the switch is the launches. Here the masked layers' weights are
kept end to end in one tensor (`FlatWeights`: a second copy of them on the device, 94 MB
for ResNet-50 in fp32), the task's bits are unpacked at once, and one `torch.where`
writes every layer's W * mask into one tensor whose slices are the layers' cached
weights (`joined` finds that tensor again at the next switch, so its memory is reused).
A slice held outside the model keeps the whole tensor alive (`clone` a weight to keep it
across switches).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor


class FlatWeights:
    """The masked layers' frozen weights end to end in one tensor, made on first use and
    again whenever one of them was replaced, moved or changed in place (another tensor,
    storage or version). A change through ``.data``, which torch does not version, is
    seen after `model.train()` or a `.to()`: the backbone is meant never to change."""

    def __init__(self) -> None:
        self._sources: list[weakref.ref] = []
        self._key: tuple | None = None
        self._flat: torch.Tensor | None = None

    def of(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        same = len(self._sources) == len(weights) and all(
            ref() is w for ref, w in zip(self._sources, weights, strict=True)
        )
        if self._flat is None or not same or key != self._key:
            self._flat = None  # free the old copy before making the new one
            self._flat = torch.cat([w.detach().reshape(-1) for w in weights])
            self._sources = [weakref.ref(w) for w in weights]
            self._key = key
        return self._flat

    def clear(self) -> None:
        self._sources, self._key, self._flat = [], None, None


def can_join(weights: Sequence[torch.Tensor]) -> bool:
    """Whether the weights can be derived as one flat tensor: one dtype, one device, each
    contiguous (a channels-last weight keeps its layout, layer by layer), real (a traced
    fake tensor has no address to key the copy on)."""
    first = weights[0]
    return all(
        w.dtype == first.dtype
        and w.device == first.device
        and w.is_contiguous()
        and not isinstance(w, FakeTensor)
        for w in weights
    )


def joined(parts: Sequence[torch.Tensor], total: int) -> torch.Tensor | None:
    """The flat tensor of `total` values whose consecutive slices `parts` are, in order
    from its start (what `split_into` made), or None when they are not."""
    first = parts[0]
    storage = first.untyped_storage()
    if storage.nbytes() < total * first.element_size():
        return None
    offset = 0
    for part in parts:
        same_storage = part.untyped_storage().data_ptr() == storage.data_ptr()
        in_place = part.storage_offset() == offset and part.is_contiguous()
        if not (same_storage and in_place and part.dtype == first.dtype):
            return None
        offset += part.numel()
    if offset != total:
        return None
    return first.as_strided((total,), (1,), 0)


def split_into(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` as consecutive views shaped like the tensors of `like`."""
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return views
