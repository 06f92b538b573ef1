"""Per-task wrappers that replace a backbone's layers in place.

Each wrapper keeps the original module as `base_layer` (frozen, never changed)
and holds per-task state keyed by task name; `active_task` picks which one a
forward pass uses (None: the plain backbone).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .bits import MaskKind, pack_mask, unpack_mask
from .config import MaskConfig
from .errors import ConfigError, UnknownTaskError
from .functional import MASK_KINDS, init_scores, threshold_scores

# The parameter each maskable type multiplies by its mask. nn.MultiheadAttention keeps its
# input projection as a parameter of its own (its out_proj is a Linear, masked as one).
MASKED_PARAMETER: dict[type[nn.Module], str] = {
    nn.Conv1d: "weight",
    nn.Conv2d: "weight",
    nn.Conv3d: "weight",
    nn.Linear: "weight",
    nn.MultiheadAttention: "in_proj_weight",
}
MASKABLE_TYPES: tuple[type[nn.Module], ...] = tuple(MASKED_PARAMETER)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
HEAD_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
NORM_DTYPE = torch.float16  # what task files keep of a task's own norm layers


class TaskModule(nn.Module):
    """A wrapper with per-task state; the model switches `active_task` on all of them.

    It stands in for the module it wraps everywhere, not only when called: reading an
    attribute it lacks (``bias``, ``eps``, ``in_features``...) reads it from the layer
    the active task runs (`current_layer`), since some parents read their children's
    tensors directly instead of calling them (attention blocks pass ``qkv.weight`` to
    ``F.linear``; the fused encoder path reads ``norm1.weight`` and ``norm1.eps``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # the backbone is never trained
        self.active_task: str | None = None

    def remove_task(self, task: str) -> None:
        raise NotImplementedError

    def current_layer(self) -> nn.Module:
        """The module that the active task runs."""
        return self.base_layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or "base_layer" not in self.__dict__.get("_modules", {}):
                raise  # copying and pickling probe dunders; during __init__ nothing is there
            return getattr(self.current_layer(), name)


class MaskedLayer(TaskModule):
    """A conv, linear or attention layer whose frozen weight is multiplied by a per-task
    mask (the parameter `MASKED_PARAMETER` names: ``weight``, or ``in_proj_weight``).

    A task is either trainable (fp32 scores, thresholded each forward) or stored
    (a bit-packed mask, 1 or 2 bits per weight). Under `torch.no_grad` the masked
    weight of the last task used is cached, so inference does not re-threshold or
    unpack on every call. Reading the masked parameter by name (``layer.weight``)
    gives the active task's masked weight, so parents that read it directly see the
    mask too (and pass the scores their gradient); `frozen` is the backbone's own.

    Example:
        >>> layer = MaskedLayer(nn.Linear(4, 2), MaskConfig())
        >>> layer.add_task("a"); layer.active_task = "a"
        >>> layer(torch.ones(1, 4)).shape
        torch.Size([1, 2])
    """

    def __init__(self, base_layer: nn.Module, config: MaskConfig) -> None:
        parameter = masked_parameter(base_layer)
        super().__init__(base_layer)
        self.parameter = parameter
        self.config = config
        self.scores = nn.ParameterDict()
        self.packed = _BufferDict()
        self.kinds: dict[str, MaskKind] = {}
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def frozen(self) -> torch.Tensor:
        """The backbone's own weight, never masked and never trained."""
        return getattr(self.base_layer, self.parameter)

    def __getattr__(self, name: str) -> Any:
        if name == self.__dict__.get("parameter"):
            return self.masked_weight(self.active_task)
        return super().__getattr__(name)

    @property
    def tasks(self) -> list[str]:
        return list(self.kinds)

    def add_task(self, task: str) -> None:
        """Fresh trainable scores for `task`, initialised as the config says."""
        scores = init_scores(self.frozen, self.config.init, self.config.init_scale)
        if not bool((scores > self.config.threshold).any()):
            raise ConfigError(
                f"init={self.config.init!r} starts every score of this "
                f"{type(self.base_layer).__name__} {tuple(self.frozen.shape)} at or below "
                f"threshold={self.config.threshold}: its first mask would drop every weight. "
                "Use init='1s' with init_scale above the threshold, or lower the threshold"
            )
        self.scores[task] = nn.Parameter(scores)
        self.kinds[task] = MASK_KINDS[self.config.threshold_fn]

    def store_mask(self, task: str, mask: torch.Tensor, kind: MaskKind) -> None:
        """Hold `task` as a fixed bit-packed mask (replacing any scores it had)."""
        if mask.shape != self.frozen.shape:
            raise ConfigError(
                f"mask for task {task!r} has shape {tuple(mask.shape)}; the layer's weight "
                f"has shape {tuple(self.frozen.shape)}"
            )
        packed = pack_mask(mask.to(self.frozen.device), kind)
        if task in self.scores:
            del self.scores[task]
        self.packed[task] = packed
        self.kinds[task] = kind
        self._cache = None

    def freeze_task(self, task: str) -> None:
        """Replace trainable scores by their packed mask: 32 bits per weight down to 1-2."""
        if task in self.scores:
            self.store_mask(task, self.mask(task).detach(), self.kinds[task])

    def remove_task(self, task: str) -> None:
        if task in self.scores:
            del self.scores[task]
        self.packed.pop(task)
        self.kinds.pop(task, None)
        self._cache = None

    def mask(self, task: str) -> torch.Tensor:
        """The task's mask as fp32, shaped like the weight; differentiable for trainable tasks."""
        if task in self.scores:
            return threshold_scores(
                self.scores[task], self.config.threshold, self.config.threshold_fn
            )
        if task not in self.kinds:
            raise UnknownTaskError(f"layer has no task {task!r}; it holds {self.tasks}")
        flat = unpack_mask(self.packed[task], self.frozen.numel(), self.kinds[task])
        return flat.view(self.frozen.shape)

    def masked_weight(self, task: str | None) -> torch.Tensor:
        """W * mask for `task` (W itself for None); cached while autograd is off."""
        weight = self.frozen
        if task is None:
            return weight
        if torch.is_grad_enabled():
            return self._apply_mask(task)
        source = self.scores[task] if task in self.scores else self.packed[task]
        key = (task, id(source), source._version, weight.device, weight.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._apply_mask(task))
        return self._cache[1]

    def _apply_mask(self, task: str) -> torch.Tensor:
        """W * mask; a stored binary mask selects W through a bool tensor, which skips
        materialising a float mask (the cost of every task switch at inference)."""
        weight = self.frozen
        if task in self.scores or self.kinds[task] != "binary":
            return weight * self.mask(task).to(weight.dtype)
        keep = unpack_mask(self.packed[task], weight.numel(), "binary", dtype=torch.bool)
        return torch.where(keep.view(weight.shape), weight, weight.new_zeros(()))

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base layer's own computation with the active task's masked weight."""
        weight = self.masked_weight(self.active_task)
        base = self.base_layer
        if type(base) is nn.Linear and len(args) == 1 and not kwargs:
            return F.linear(args[0], weight, base.bias)
        if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and len(args) == 1 and not kwargs:
            return base._conv_forward(args[0], weight, base.bias)
        # Others (attention, timm's Conv2dSame...) keep their own forward: swap the weight in.
        return functional_call(base, {self.parameter: weight}, args, kwargs)

    def baked(self, task: str | None, memo: dict[int, Any] | None = None) -> nn.Module:
        """A plain copy of the base layer holding W * mask (`memo`: as copy.deepcopy's,
        holding the baked copies of masked layers inside this one)."""
        plain = copy.deepcopy(self.base_layer, memo)
        with torch.no_grad():
            setattr(plain, self.parameter, nn.Parameter(self.masked_weight(task).clone()))
        return plain


def masked_parameter(module: nn.Module) -> str:
    """The name of the parameter a MaskedLayer masks in `module`, or a ConfigError."""
    found = next((p for t, p in MASKED_PARAMETER.items() if isinstance(module, t)), None)
    if found is None:
        raise ConfigError(
            f"cannot mask {type(module).__name__}; supported: "
            f"{[t.__name__ for t in MASKABLE_TYPES]}"
        )
    if not isinstance(getattr(module, found, None), nn.Parameter):
        raise ConfigError(
            f"cannot mask this {type(module).__name__}: it has no {found} parameter (an "
            "attention layer whose keys or values have their own size keeps three); "
            "leave it out with MaskConfig(exclude_modules=[...])"
        )
    return found


class TaskNorm(TaskModule):
    """A normalisation layer with optional per-task copies; the original stays frozen.

    The original always runs in eval mode (running statistics never change); a
    task that has its own copy trains it like any norm layer.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.norms = nn.ModuleDict()

    def add_task(self, task: str) -> None:
        norm = copy.deepcopy(self.base_layer)
        norm.requires_grad_(True)
        norm.train(self.training)
        self.norms[task] = norm

    def remove_task(self, task: str) -> None:
        if task in self.norms:
            del self.norms[task]

    def freeze_task(self, task: str) -> None:
        """Round the task's own floating-point tensors to NORM_DTYPE, the precision task
        files keep, so the trained model and the one loaded from its file are the same.
        A tensor still equal to the backbone's is left exact: files do not store it."""
        if task in self.norms:
            base = self.base_layer.state_dict()
            with torch.no_grad():
                for key, value in self.norms[task].state_dict().items():
                    if value.is_floating_point() and not torch.equal(value, base[key]):
                        value.copy_(value.to(NORM_DTYPE))

    def layer_for(self, task: str | None) -> nn.Module:
        return self.norms[task] if task is not None and task in self.norms else self.base_layer

    def current_layer(self) -> nn.Module:
        return self.layer_for(self.active_task)

    def train(self, mode: bool = True) -> TaskNorm:
        super().train(mode)
        self.base_layer.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer_for(self.active_task)(*args, **kwargs)


class TaskHead(TaskModule):
    """The classifier: the backbone's own for no task, a new one per task."""

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, HEAD_TYPES):
            raise ConfigError(
                f"the head is a {type(base_layer).__name__}; supported heads: "
                f"{[t.__name__ for t in HEAD_TYPES]}. Name another module with MaskConfig(head=...)"
            )
        super().__init__(base_layer)
        self.heads = nn.ModuleDict()

    def add_task(self, task: str, num_classes: int) -> None:
        self.heads[task] = new_head(self.base_layer, num_classes)

    def remove_task(self, task: str) -> None:
        if task in self.heads:
            del self.heads[task]

    def layer_for(self, task: str | None) -> nn.Module:
        return self.base_layer if task is None else self.heads[task]

    def current_layer(self) -> nn.Module:
        return self.layer_for(self.active_task)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer_for(self.active_task)(*args, **kwargs)


def new_head(base: nn.Module, num_classes: int) -> nn.Module:
    """A freshly initialised head like `base` but with `num_classes` outputs."""
    factory = {"device": base.weight.device, "dtype": base.weight.dtype}
    bias = base.bias is not None
    if isinstance(base, nn.Linear):
        return nn.Linear(base.in_features, num_classes, bias=bias, **factory)
    return nn.Conv2d(
        base.in_channels,
        num_classes,
        base.kernel_size,
        stride=base.stride,
        padding=base.padding,
        bias=bias,
        **factory,
    )


class _BufferDict(nn.Module):
    """Tensors keyed by task name, moved with the module and kept in its state_dict."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __contains__(self, key: str) -> bool:
        return key in self._buffers

    def pop(self, key: str) -> torch.Tensor | None:
        return self._buffers.pop(key, None)
