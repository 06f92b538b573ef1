"""Frozen tasks' own norm layers as one flat tensor per task and dtype, not as modules.

A task that no longer trains (loaded from a task file, or frozen at the end of `fit`)
needs the values of its norm layers, not modules holding them: held as modules, the 49
norm layers of an EfficientNet-Lite0 task (each with its activation and dropout
children, and several small tensors) cost more memory than the task's masks. The bank
keeps each such task's norm state as one flat tensor per dtype over every norm layer
in the model's order, the same layout for every task; a layer's state is a set of
views of it, so what a forward in training mode writes (running statistics) lands in
the bank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .bank import BufferDict
from .errors import ConfigError, UnknownTaskError


@dataclass(frozen=True)
class Slot:
    """Where one tensor of a norm layer's state lies in its task's flat tensors."""

    key: str  # the state_dict key in the layer ("weight", "running_mean"...)
    group: int  # which flat tensor: one per dtype the backbone's layers hold
    start: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class NormBank(nn.Module):
    """The norm state of frozen tasks, moved with the model and kept in its state_dict
    as ``norm_bank.flats.TASK.GROUP``.

    Example:
        >>> bank = NormBank([nn.BatchNorm2d(2), nn.LayerNorm(3)])
        >>> bank.store("a", [{"weight": torch.full((2,), 3.0)}, {}])
        >>> bank.views("a", 0)["weight"], bank.views("a", 1)["bias"]
        (tensor([3., 3.]), tensor([0., 0., 0.]))
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.__dict__["layers"] = list(layers)  # the backbone's own layers: not submodules
        dtypes: list[torch.dtype] = []
        sizes: list[int] = []
        self.slots: list[list[Slot]] = []
        for layer in layers:
            slots = []
            for key, tensor in layer.state_dict().items():
                if tensor.dtype not in dtypes:
                    dtypes.append(tensor.dtype)
                    sizes.append(0)
                group = dtypes.index(tensor.dtype)
                slots.append(Slot(key, group, sizes[group], tensor.shape))
                sizes[group] += tensor.numel()
            self.slots.append(slots)
        self.groups = len(dtypes)
        self.flats = nn.ModuleDict()

    def __contains__(self, task: str) -> bool:
        return task in self.flats

    @property
    def tasks(self) -> list[str]:
        return list(self.flats)

    def store(self, task: str, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Keep `task`'s norm state: one state per layer, in order, each holding some of
        its keys; the others are the backbone's. Values take the dtype and device of the
        backbone's tensors, as `load_state_dict` into a copy of its layer would."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.groups)]
        for layer, slots, state in zip(self.layers, self.slots, states, strict=True):
            base = layer.state_dict()
            for slot in slots:
                like = base[slot.key]
                value = state.get(slot.key, like).detach()
                if value.shape != like.shape:
                    raise ConfigError(
                        f"norm tensor {slot.key!r} of shape {tuple(value.shape)} for a layer "
                        f"whose {slot.key} is {tuple(like.shape)}"
                    )
                parts[slot.group].append(value.to(like.device, like.dtype).reshape(-1))
        flats = BufferDict()
        for group, tensors in enumerate(parts):
            flats[str(group)] = torch.cat(tensors)
        self.flats[task] = flats

    def remove(self, task: str) -> None:
        if task in self.flats:
            del self.flats[task]

    def flat(self, task: str) -> tuple[torch.Tensor, ...]:
        """`task`'s flat tensors, one per group (what a cache of its views is keyed by)."""
        if task not in self.flats:
            raise UnknownTaskError(f"no stored norm layers for task {task!r}; stored: {self.tasks}")
        flats = self.flats[task]
        return tuple(flats[str(group)] for group in range(self.groups))

    def views(self, task: str, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th layer's state for `task`, as views of the task's flat tensors."""
        flats = self.flat(task)
        return {
            slot.key: flats[slot.group][slot.start : slot.start + slot.numel].view(slot.shape)
            for slot in self.slots[index]
        }
