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

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import is_not
from typing import Any

import torch
from torch import nn

from .bank import BufferDict
from .errors import ConfigError, UnknownTaskError

VIEWS_KEPT = 32  # tasks whose views are kept: a mixed batch of up to 32 tasks makes none


@dataclass(frozen=True)
class Slot:
    """Where one tensor of a norm layer's state lies in its task's flat tensors."""

    key: str  # the state_dict key in the layer ("weight", "running_mean"...)
    group: int  # which flat tensor: one per dtype the backbone's layers hold
    position: int  # the how-many-th tensor of its group, all layers in order
    shape: torch.Size
    parameter: bool  # a Parameter of the layer (else a buffer)


class NormBank(nn.Module):
    """The norm state of frozen tasks, moved with the model and kept in its state_dict
    as ``norm_bank.flats.TASK.GROUP``.

    Example:
        >>> bank = NormBank([nn.BatchNorm2d(2), nn.LayerNorm(3)])
        >>> bank.store("a", [{"weight": torch.full((2,), 3.0)}, {}])
        >>> bank.views("a", 0)["weight"].data, bank.views("a", 1)["bias"].data
        (tensor([3., 3.]), tensor([0., 0., 0.]))
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.__dict__["layers"] = list(layers)  # the backbone's own layers: not submodules
        dtypes: list[torch.dtype] = []
        self.numels: list[list[int]] = []  # per group, its tensors' sizes in order
        self.slots: list[list[Slot]] = []
        for layer in layers:
            parameters = dict(layer.named_parameters())
            slots = []
            for key, tensor in layer.state_dict().items():
                if tensor.dtype not in dtypes:
                    dtypes.append(tensor.dtype)
                    self.numels.append([])
                group = dtypes.index(tensor.dtype)
                position = len(self.numels[group])
                slots.append(Slot(key, group, position, tensor.shape, key in parameters))
                self.numels[group].append(tensor.numel())
            self.slots.append(slots)
        self.groups = len(dtypes)
        self.flats = nn.ModuleDict()
        # task -> (its flat tensors, every layer's views), the most recently used last
        self.__dict__["_views"] = OrderedDict()

    def __contains__(self, task: str) -> bool:
        return task in self._modules["flats"]._modules  # the dicts directly: every forward asks

    @property
    def tasks(self) -> list[str]:
        return list(self.flats)

    def store(self, task: str, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Keep `task`'s norm state: one state per layer, in order, each holding some of
        its keys; the others are the backbone's. Values take the dtype and device of the
        backbone's tensors, as `load_state_dict` into a copy of its layer would. Values
        on another device (a task file's, on the CPU) move there joined, once per device
        they come from: one transfer to a GPU, not one per tensor, each waited for."""
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.groups)]
        devices: list[set[torch.device]] = [set() for _ in range(self.groups)]
        for layer, slots, state in zip(self.layers, self.slots, states, strict=True):
            for slot in slots:
                like = _state_tensor(layer, slot.key)
                value = state.get(slot.key, like).detach()
                if value.shape != like.shape:
                    raise ConfigError(
                        f"norm tensor {slot.key!r} of shape {tuple(value.shape)} for a layer "
                        f"whose {slot.key} is {tuple(like.shape)}"
                    )
                parts[slot.group].append(value.to(dtype=like.dtype).reshape(-1))
                devices[slot.group].add(like.device)
        flats = BufferDict()
        for group, (tensors, held_on) in enumerate(zip(parts, devices, strict=True)):
            if len(held_on) > 1:
                raise ConfigError(
                    f"the backbone's norm layers hold {tensors[0].dtype} tensors on "
                    f"{sorted(map(str, held_on))}; frozen tasks' norms need them on one "
                    "device (move the backbone there)"
                )
            flats[str(group)] = torch.cat(_moved_joined(tensors, held_on.pop()))
        self.flats[task] = flats

    def remove(self, task: str) -> None:
        if task in self.flats:
            del self.flats[task]
        self._views.pop(task, None)

    def flat(self, task: str) -> tuple[torch.Tensor, ...]:
        """`task`'s flat tensors, one per group."""
        flats = self._modules["flats"]._modules.get(task)
        if flats is None:
            raise UnknownTaskError(f"no stored norm layers for task {task!r}; stored: {self.tasks}")
        return tuple(flats._buffers.values())

    def views(self, task: str, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th layer's state for `task` as views of the task's flat tensors
        (Parameters where the layer has them, not trained). Every layer's are made at
        once, one split per flat tensor, and kept for the `VIEWS_KEPT` tasks asked last
        (a mixed batch asks for each of its tasks in turn, layer by layer): the same dict
        while that lasts, so a caller can tell that nothing changed."""
        flats, held = self.flat(task), self._views.get(task)
        if held is None or any(map(is_not, held[0], flats)):
            pieces = [flat.split(numels) for flat, numels in zip(flats, self.numels, strict=True)]
            layers = [
                {s.key: _shaped(pieces[s.group][s.position], s) for s in slots}
                for slots in self.slots
            ]
            held = self._views[task] = (flats, layers)
        self._views.move_to_end(task)
        if len(self._views) > VIEWS_KEPT:
            self._views.popitem(last=False)
        return held[1][index]

    def _apply(self, fn: Any, recurse: bool = True) -> NormBank:
        """As nn.Module's (`.to`, `.half`...); the views of the old flat tensors go with
        them, not kept alive until their task is next asked for."""
        self._views.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_views"] = OrderedDict()  # made again on demand
        return state


def _moved_joined(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`tensors` on `device`, in order; those elsewhere moved joined, one copy per device."""
    elsewhere: dict[torch.device, list[int]] = {}
    for index, tensor in enumerate(tensors):
        if tensor.device != device:
            elsewhere.setdefault(tensor.device, []).append(index)
    tensors = list(tensors)
    for indices in elsewhere.values():
        joined = torch.cat([tensors[i] for i in indices]).to(device)
        for i, moved in zip(
            indices, joined.split([tensors[i].numel() for i in indices]), strict=True
        ):
            tensors[i] = moved
    return tensors


def _state_tensor(layer: nn.Module, key: str) -> torch.Tensor:
    """`layer.state_dict()[key]`, read from the module dicts (a task's load asks for every
    tensor of every norm layer: `state_dict` would build each layer's whole dict)."""
    path, _, name = key.rpartition(".")
    owner = layer.get_submodule(path) if path else layer
    tensor = owner._parameters.get(name)
    return owner._buffers[name] if tensor is None else tensor


def _shaped(piece: torch.Tensor, slot: Slot) -> torch.Tensor:
    tensor = piece.view(slot.shape) if piece.shape != slot.shape else piece
    return nn.Parameter(tensor, requires_grad=False) if slot.parameter else tensor
