"""Per-task wrappers that replace a backbone's layers in place.

Each wrapper keeps the original module as `base_layer` (frozen, never changed)
and holds per-task state keyed by task name; `active_task` picks which one a
forward pass uses (None: the plain backbone).
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .bank import MaskBank, masked_into
from .bits import MaskKind
from .config import MaskConfig
from .errors import ConfigError, UnknownTaskError
from .functional import MASK_KINDS, init_scores, mask_weight, threshold_scores
from .normbank import NormBank

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

    A task is either trainable (fp32 scores, thresholded each forward) or stored (its
    bit-packed mask in the model's `MaskBank`, from this layer's `start`). Under
    `torch.no_grad` the masked weights of the `cache_size` tasks used last are cached,
    so inference does not re-threshold or unpack on every call; deriving a task that
    is not cached rewrites the least recently used tensor in place unless someone else
    holds it (`clone` a weight to keep it across switches). Reading the masked parameter
    by name (``layer.weight``) gives the active task's masked weight, so parents that
    read it directly see the mask too (and pass the scores their gradient); `frozen` is
    the backbone's own.

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
        self.kinds: dict[str, MaskKind] = {}
        self.__dict__["bank"] = None  # the model's, set by `attach`; not a submodule
        self.start = 0
        self.cache_size = 1  # tasks whose masked weights are kept (the model's `weight_cache_size`)
        # task -> (what the weight was derived from: source, version, device; the weight),
        # least recently used first; a key of None marks memory kept for reuse only.
        self._derived: OrderedDict[str, tuple[tuple | None, torch.Tensor]] = OrderedDict()

    def attach(self, bank: MaskBank, start: int) -> None:
        """Read stored tasks' masks from `bank`, this layer's values from the `start`-th."""
        self.__dict__["bank"] = bank
        self.start = start

    @property
    def frozen(self) -> torch.Tensor:
        """The backbone's own weight, never masked and never trained."""
        base = self._modules["base_layer"]
        weight = base._parameters.get(self.parameter)
        return getattr(base, self.parameter) if weight is None else weight

    def _scores(self, task: str) -> torch.Tensor | None:
        """`task`'s trainable scores (None for a stored task). This and `frozen` read the
        dicts first: every forward of every layer asks, and nn.Module's attribute lookup
        behind two __getattr__ overrides costs more than the op it feeds. (A replica of
        nn.DataParallel holds them as plain attributes, not in the dicts.)"""
        scores = self._modules["scores"]
        found = scores._parameters.get(task)
        return scores[task] if found is None and task in scores else found

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

    def stored(self, task: str, kind: MaskKind) -> None:
        """`task`'s mask is now in the bank: drop any scores it had."""
        if task in self.scores:
            del self.scores[task]
        self.kinds[task] = kind
        self._forget(task)

    def remove_task(self, task: str) -> None:
        if task in self.scores:
            del self.scores[task]
        self.kinds.pop(task, None)
        self._derived.pop(task, None)

    def mask(self, task: str) -> torch.Tensor:
        """The task's mask as fp32, shaped like the weight; differentiable for trainable tasks."""
        if task in self.scores:
            return threshold_scores(
                self.scores[task], self.config.threshold, self.config.threshold_fn
            )
        if task not in self.kinds or self.bank is None:
            raise UnknownTaskError(f"layer has no task {task!r}; it holds {self.tasks}")
        return self.bank.values(task, self.start, self.frozen.numel()).view(self.frozen.shape)

    def masked_weight(self, task: str | None) -> torch.Tensor:
        """W * mask for `task` (W itself for None); cached while autograd is off."""
        if task is None:
            return self.frozen
        if torch.is_grad_enabled():
            return self._apply_mask(task, out=None)
        if self.is_stale(task):
            return self.derive(task)
        self._derived.move_to_end(task)
        return self._derived[task][1]

    def is_stale(self, task: str) -> bool:
        """Whether the cache does not hold `task`'s current masked weight."""
        held = self._derived.get(task)
        return held is None or held[0] != self._cache_key(task)

    def derive(self, task: str) -> torch.Tensor:
        """Cache `task`'s masked weight, written into the memory `claim` finds."""
        weight = self._apply_mask(task, self.claim(task))
        self.hold(task, weight)
        return weight

    def claim(self, task: str) -> torch.Tensor:
        """Memory to write `task`'s masked weight into, taken out of the cache: its own
        entry's, else (the cache being full) the least recently used entry's, if it fits
        the weight and no one else holds it (a fresh allocation costs more than the
        product); else new memory."""
        weight = self.frozen
        if task in self._derived:
            held = self._derived.pop(task)[1]
        elif self._derived and len(self._derived) >= self.cache_size:
            held = self._derived.popitem(last=False)[1][1]
        else:
            return torch.empty_like(weight)
        reusable = (
            sys.getrefcount(held) <= 2  # this frame's name and getrefcount's argument
            # torch refuses to write an inference tensor outside inference mode
            and not (held.is_inference() and not torch.is_inference_mode_enabled())
            and (held.shape, held.dtype, held.device, held.stride())
            == (weight.shape, weight.dtype, weight.device, weight.stride())
        )
        return held if reusable else torch.empty_like(weight)

    def hold(self, task: str, weight: torch.Tensor) -> None:
        """Cache `weight` as `task`'s masked weight, derived from its current mask."""
        self._derived[task] = (self._cache_key(task), weight)

    def _cache_key(self, task: str) -> tuple:
        source = self._scores(task)
        if source is None:
            if task not in self.kinds or self.bank is None:
                raise UnknownTaskError(f"layer has no task {task!r}; it holds {self.tasks}")
            source = self.bank.packed(task)
        weight = self.frozen
        return (task, id(source), source._version, weight.device, weight.dtype)

    def _apply_mask(self, task: str, out: torch.Tensor | None) -> torch.Tensor:
        """W * mask, into `out` when given; a stored mask is never made a float tensor."""
        weight, scores = self.frozen, self._scores(task)
        if scores is not None:
            config = self.config
            return mask_weight(weight, scores, config.threshold, config.threshold_fn, out)
        if task not in self.kinds or self.bank is None:
            raise UnknownTaskError(f"layer has no task {task!r}; it holds {self.tasks}")
        return masked_into(weight, self.bank, task, self.start, out)

    def clear_cache(self, release: bool = True) -> None:
        """Forget the cached masked weights; keep their memory for the next ones unless
        `release`."""
        if release:
            self._derived.clear()
        for task in self._derived:
            self._forget(task)

    def resize_cache(self, size: int) -> None:
        """Keep the masked weights of at most `size` tasks, dropping the least recently used."""
        self.cache_size = size
        while len(self._derived) > size:
            self._derived.popitem(last=False)

    def _forget(self, task: str) -> None:
        """Mark `task`'s cached weight stale, keeping its memory for reuse."""
        if task in self._derived:
            self._derived[task] = (None, self._derived[task][1])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base layer's own computation with the active task's masked weight."""
        weight = self.masked_weight(self.active_task)
        base = self._modules["base_layer"]
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

    The original always runs in eval mode (running statistics never change). A task
    that is training has a module of its own, trained like any norm layer; a frozen
    task (loaded, or after `PiggybackModel.freeze_task`) keeps its values in the
    model's `NormBank`, and runs one spare copy of the original whose tensors are
    views of them (a switch between such tasks swaps views, copies nothing).
    `norms[task]` gives either.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.norms = TaskNorms(self)
        self.__dict__["bank"] = None  # the model's, set by `attach`; not a submodule
        self.index = 0
        self.__dict__["_runner"] = None  # the spare copy that runs frozen tasks
        self.__dict__["_bound"] = None  # (task, the bank's views) the runner holds

    def attach(self, bank: NormBank, index: int) -> None:
        """Read frozen tasks' values from `bank`, as its `index`-th layer."""
        self.__dict__["bank"] = bank
        self.index = index

    def is_banked(self, task: str) -> bool:
        """Whether `task`'s values are in the bank (it has no module of its own)."""
        return self._in_bank(task) and self.own_module(task) is None

    def _in_bank(self, task: str) -> bool:
        bank = self.__dict__["bank"]
        return bank is not None and task in bank

    def own_module(self, task: str) -> nn.Module | None:
        """The module of its own that a training `task` has (None for a frozen task). Read
        from the dicts directly, as `MaskedLayer.frozen`: every forward of every norm asks."""
        return self._modules["norms"]._modules.get(task)

    def add_task(self, task: str) -> None:
        norm = copy_leaf(self.base_layer)
        norm.requires_grad_(True)
        norm.train(self.training)
        self.norms[task] = norm

    def remove_task(self, task: str) -> None:
        self.norms._modules.pop(task, None)
        self._unbind(task)

    def thaw(self, task: str) -> None:
        """Give a banked `task` a trainable module of its own (its bank entry is then stale:
        the model removes it)."""
        if self.is_banked(task):
            self.norms[task] = self.own_copy(task)
            self._unbind(task)

    def _unbind(self, task: str) -> None:
        """Let the runner drop its views of `task` (they would keep its values alive)."""
        if self._bound is not None and self._bound[0] == task:
            self.__dict__["_runner"] = self.__dict__["_bound"] = None

    def freeze_task(self, task: str) -> None:
        """Round the task's own floating-point tensors to NORM_DTYPE, the precision task
        files keep, so the trained model and the one loaded from its file are the same.
        A tensor still equal to the backbone's is left exact: files do not store it."""
        if task in self.norms:
            base = self.base_layer.state_dict()
            with torch.no_grad():
                for key, value in self.layer_for(task).state_dict().items():
                    if value.is_floating_point() and not torch.equal(value, base[key]):
                        value.copy_(value.to(NORM_DTYPE))

    def own_copy(self, task: str | None) -> nn.Module:
        """The layer `task` runs as a module with tensors of its own (a trainable copy)."""
        if not (task is not None and self.is_banked(task)):
            return copy.deepcopy(self.layer_for(task))
        views = self.bank.views(task, self.index)
        copied = copy_holding(self.base_layer, {k: v.detach().clone() for k, v in views.items()})
        return copied.requires_grad_(True).train(self.training)

    def layer_for(self, task: str | None) -> nn.Module:
        if task is None:
            return self._modules["base_layer"]
        own = self.own_module(task)
        if own is not None:
            return own
        return self._runner_for(task) if self._in_bank(task) else self.base_layer

    def _runner_for(self, task: str) -> nn.Module:
        """The spare copy holding views of `task`'s values (made once, then rebound)."""
        views = self.bank.views(task, self.index)
        if self._runner is None:
            self.__dict__["_runner"] = copy_leaf(self.base_layer)
            self.__dict__["_bound"] = None
        if self._bound is None or self._bound[1] is not views:
            bind(self._runner, views)
            self.__dict__["_bound"] = (task, views)
        if self._runner.training != self.training:
            self._runner.train(self.training)
        return self._runner

    def current_layer(self) -> nn.Module:
        return self.layer_for(self.active_task)

    def train(self, mode: bool = True) -> TaskNorm:
        super().train(mode)
        self.base_layer.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> TaskNorm:
        """As nn.Module's (`.to`, `.half`...): the runner, no submodule, is made afresh
        from the moved backbone layer when next needed."""
        self.__dict__["_runner"] = self.__dict__["_bound"] = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_runner"] = state["_bound"] = None  # views of the bank: remade on demand
        return state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer_for(self.active_task)(*args, **kwargs)


class TaskNorms(nn.ModuleDict):
    """Task -> that task's own norm layer: training tasks' modules (submodules, as in
    any ModuleDict: what optimizers and the state_dict hold), then frozen tasks' layers,
    which the owner's `NormBank` holds (reading one gives a copy of the backbone's
    layer whose tensors are views of the bank's: a write goes there)."""

    def __init__(self, owner: TaskNorm) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: the owner holds this dict

    def _banked(self) -> list[str]:
        bank = self.owner.bank
        return [] if bank is None else [t for t in bank.tasks if t not in self._modules]

    def __getitem__(self, task: str) -> nn.Module:  # type: ignore[override]
        if task in self._modules:
            return self._modules[task]
        if self.owner.is_banked(task):
            views = self.owner.bank.views(task, self.owner.index)
            return copy_holding(self.owner.base_layer, views).train(self.owner.training)
        raise KeyError(task)

    def __contains__(self, task: object) -> bool:
        return task in self._modules or (isinstance(task, str) and self.owner.is_banked(task))

    def keys(self) -> list[str]:  # type: ignore[override]
        return [*self._modules, *self._banked()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._modules) + len(self._banked())

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(task, self[task]) for task in self.keys()]

    def values(self) -> list[nn.Module]:  # type: ignore[override]
        return [self[task] for task in self.keys()]


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


def bind(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make `tensors` (by state_dict key) `module`'s own as they are, views included: no
    copy. A plain tensor in place of a parameter becomes one, not trained."""
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        owner = module.get_submodule(path) if path else module
        if name not in owner._parameters:
            owner._buffers[name] = tensor
        elif isinstance(tensor, nn.Parameter):
            owner._parameters[name] = tensor
        else:
            owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def copy_holding(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of `module` (as `copy_leaf`) that holds `tensors` (see `bind`)."""
    copied = copy_leaf(module)
    bind(copied, tensors)
    return copied


def copy_leaf(module: nn.Module) -> nn.Module:
    """A copy of `module` with tensors, hooks and containers of its own: what
    `copy.deepcopy` gives, at a fraction of its cost for a module without children
    (a task's norm layers are copied whenever one is added or loaded)."""
    if module._modules:
        return copy.deepcopy(module)
    new = copy.copy(module)  # a new __dict__ whose dicts, sets and lists are still shared
    state = vars(new)
    for name, value in list(state.items()):
        if isinstance(value, dict | set | list):
            state[name] = copy.copy(value)
    for name, param in new._parameters.items():
        if param is not None:
            new._parameters[name] = nn.Parameter(param.detach().clone(), param.requires_grad)
    for name, buffer in new._buffers.items():
        if buffer is not None:
            new._buffers[name] = buffer.clone()
    return new
