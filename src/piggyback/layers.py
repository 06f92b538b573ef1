"""Per-task wrappers that replace a backbone's layers in place.

Each wrapper keeps the original module as `base_layer` (frozen, never changed)
and holds per-task state keyed by task name; `active_task` picks which one a
forward pass uses (None: the plain backbone).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .bits import MaskKind, pack_mask, unpack_mask
from .config import MaskConfig
from .errors import ConfigError, UnknownTaskError
from .functional import MASK_KINDS, init_scores, threshold_scores

MASKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)
HEAD_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
NORM_DTYPE = torch.float16  # what task files keep of a task's own norm layers


class TaskModule(nn.Module):
    """A wrapper with per-task state; the model switches `active_task` on all of them."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)  # the backbone is never trained
        self.active_task: str | None = None

    def remove_task(self, task: str) -> None:
        raise NotImplementedError


class MaskedLayer(TaskModule):
    """A conv or linear layer whose frozen weight is multiplied by a per-task mask.

    A task is either trainable (fp32 scores, thresholded each forward) or stored
    (a bit-packed mask, 1 or 2 bits per weight). Under `torch.no_grad` the masked
    weight of the last task used is cached, so inference does not re-threshold or
    unpack on every call.

    Example:
        >>> layer = MaskedLayer(nn.Linear(4, 2), MaskConfig())
        >>> layer.add_task("a"); layer.active_task = "a"
        >>> layer(torch.ones(1, 4)).shape
        torch.Size([1, 2])
    """

    def __init__(self, base_layer: nn.Module, config: MaskConfig) -> None:
        if not isinstance(base_layer, MASKABLE_TYPES):
            raise ConfigError(
                f"cannot mask {type(base_layer).__name__}; supported: "
                f"{[t.__name__ for t in MASKABLE_TYPES]}"
            )
        super().__init__(base_layer)
        self.config = config
        self.scores = nn.ParameterDict()
        self.packed = _BufferDict()
        self.kinds: dict[str, MaskKind] = {}
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def tasks(self) -> list[str]:
        return list(self.kinds)

    def add_task(self, task: str) -> None:
        """Fresh trainable scores for `task`, initialised as the config says."""
        self.scores[task] = nn.Parameter(
            init_scores(self.weight, self.config.init, self.config.init_scale)
        )
        self.kinds[task] = MASK_KINDS[self.config.threshold_fn]

    def store_mask(self, task: str, mask: torch.Tensor, kind: MaskKind) -> None:
        """Hold `task` as a fixed bit-packed mask (replacing any scores it had)."""
        if mask.shape != self.weight.shape:
            raise ConfigError(
                f"mask for task {task!r} has shape {tuple(mask.shape)}; the layer's weight "
                f"has shape {tuple(self.weight.shape)}"
            )
        packed = pack_mask(mask.to(self.weight.device), kind)
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
        flat = unpack_mask(self.packed[task], self.weight.numel(), self.kinds[task])
        return flat.view(self.weight.shape)

    def masked_weight(self, task: str | None) -> torch.Tensor:
        """W * mask for `task` (W itself for None); cached while autograd is off."""
        weight = self.weight
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
        weight = self.weight
        if task in self.scores or self.kinds[task] != "binary":
            return weight * self.mask(task).to(weight.dtype)
        keep = unpack_mask(self.packed[task], weight.numel(), "binary", dtype=torch.bool)
        return torch.where(keep.view(weight.shape), weight, weight.new_zeros(()))

    def clear_cache(self) -> None:
        self._cache = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.masked_weight(self.active_task))

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Run the base layer's own computation with another weight."""
        base = self.base_layer
        if type(base) is nn.Linear:
            return F.linear(x, weight, base.bias)
        if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return base._conv_forward(x, weight, base.bias)
        # Subclasses (timm's Conv2dSame...) keep their own forward: swap the weight in.
        return functional_call(base, {"weight": weight}, (x,))

    def baked(self, task: str | None) -> nn.Module:
        """A plain copy of the base layer holding W * mask."""
        plain = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            plain.weight = nn.Parameter(self.masked_weight(task).clone())
        return plain


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
        files keep, so the trained model and the one loaded from its file are the same."""
        if task in self.norms:
            with torch.no_grad():
                for value in self.norms[task].state_dict().values():
                    if value.is_floating_point():
                        value.copy_(value.to(NORM_DTYPE))

    def layer_for(self, task: str | None) -> nn.Module:
        return self.norms[task] if task is not None and task in self.norms else self.base_layer

    def train(self, mode: bool = True) -> TaskNorm:
        super().train(mode)
        self.base_layer.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_for(self.active_task)(x)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_for(self.active_task)(x)


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
