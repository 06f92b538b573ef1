"""PiggybackModel: one frozen backbone, many tasks, one mask per task."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .bank import MaskBank
from .bits import MaskKind, bits_per_value, empirical_entropy_bits
from .config import MaskConfig, matches
from .errors import ConfigError, UnknownTaskError
from .layers import (
    MASKABLE_TYPES,
    NORM_TYPES,
    MaskedLayer,
    TaskHead,
    TaskModule,
    TaskNorm,
)

TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,127}")
# Names that nn.ModuleDict / nn.ParameterDict (which key per-task state by task name) own.
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()) + dir(nn.ParameterDict()))
ParameterPart = Literal["all", "scores", "head", "norm"]


@dataclass
class TaskInfo:
    """What the model knows of one task beyond its tensors."""

    num_classes: int
    class_names: list[str] | None = None
    train_bn: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerMaskStats:
    """One layer's mask: how many weights, and the fractions kept (non-zero) and negated."""

    name: str
    numel: int
    kept: float
    negative: float = 0.0

    @classmethod
    def of(cls, name: str, mask: torch.Tensor) -> LayerMaskStats:
        numel = mask.numel()
        share = 1 / max(numel, 1)  # counts, not float copies: masks can be gigabytes
        return cls(
            name,
            numel,
            kept=int(torch.count_nonzero(mask)) * share,
            negative=int(torch.count_nonzero(mask < 0)) * share if _has_negatives(mask) else 0.0,
        )


def _has_negatives(mask: torch.Tensor) -> bool:
    """A reduction, so binary masks skip the full-size comparison `mask < 0` allocates."""
    return mask.is_signed() and mask.numel() > 0 and bool(mask.min() < 0)


@dataclass(frozen=True)
class MaskStats:
    """How much of the backbone a task keeps, and what its mask costs to store."""

    task: str
    kind: MaskKind
    layers: list[LayerMaskStats] = field(repr=False)
    numel: int
    kept: float
    packed_bits: int
    entropy_bits: float

    @property
    def entropy_bits_per_weight(self) -> float:
        return self.entropy_bits / max(self.numel, 1)


class PiggybackModel(nn.Module):
    """Wraps any backbone so that tasks are added as masks over its frozen weights.

    The backbone is changed in place: its conv and linear layers become
    `MaskedLayer`s, its norm layers `TaskNorm`s and its head a `TaskHead`, and
    every original parameter is frozen. With no active task the model is the
    plain backbone.

    Example:
        >>> import torchvision
        >>> model = PiggybackModel(torchvision.models.resnet18(num_classes=10))
        >>> model.add_task("birds", num_classes=5)
        >>> model.set_task("birds")
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 5])
    """

    def __init__(self, backbone: nn.Module, config: MaskConfig | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise ConfigError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        if any(isinstance(m, TaskModule) for m in backbone.modules()):
            raise ConfigError("this backbone is already wrapped by a PiggybackModel")
        from .store import fingerprint

        self.config = config or MaskConfig()
        self.fingerprint = fingerprint(backbone)
        backbone.requires_grad_(False)
        self.head_name = _find_head(backbone, self.config.head)
        targets = _select_targets(backbone, self.config, self.head_name)
        self.masked_layers: dict[str, MaskedLayer]
        self.norms: dict[str, TaskNorm] = {}
        _refuse_untracked_statistics(backbone)
        _refuse_aliases(backbone, [*targets, self.head_name])
        # Every wrapper is made (and so checked) before the backbone changes: a refusal
        # leaves the caller's backbone as it was.
        self.masked_layers = {n: MaskedLayer(_get(backbone, n), self.config) for n in targets}
        self.bank = MaskBank([layer.frozen.numel() for layer in self.masked_layers.values()])
        start = 0
        for layer in self.masked_layers.values():
            layer.attach(self.bank, start)
            start += layer.frozen.numel()
        head = TaskHead(_get(backbone, self.head_name))
        for name in reversed(targets):  # innermost first: an attention's out_proj, then it
            _replace(backbone, name, self.masked_layers[name])
        for name, module in list(backbone.named_modules()):
            if isinstance(module, NORM_TYPES) and not name.startswith(self.head_name + "."):
                self.norms[name] = _replace(backbone, name, TaskNorm(module))
        self.head: TaskHead = _replace(backbone, self.head_name, head)
        self.backbone = backbone
        self.task_info: dict[str, TaskInfo] = {}
        self.active_task: str | None = None

    # ----------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self.task_info)

    def add_task(
        self,
        name: str,
        num_classes: int,
        *,
        class_names: Sequence[str] | None = None,
        train_bn: bool | None = None,
        masks: Mapping[str, torch.Tensor] | None = None,
        mask_kind: MaskKind = "binary",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a task: a new head, per-task norm layers when `train_bn` (default: the
        config's), and either fresh trainable scores for every masked layer or, with
        `masks` (layer name -> mask values), fixed bit-packed masks. `metadata`
        (JSON-ready, e.g. the backbone's name and input size) is kept in task files."""
        self.check_new_task_name(name)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"{len(class_names)} class names given for num_classes={num_classes}")
        if masks is not None:
            self._check_masks(masks)
        try:  # everything is checked before any layer takes the task
            metadata = dict(metadata or {})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metadata must be a mapping, got {type(metadata).__name__}") from exc
        train_bn = self.config.train_bn if train_bn is None else train_bn
        try:
            if masks is None:
                for layer in self.masked_layers.values():
                    layer.add_task(name)
            else:
                self._store(name, [masks[n] for n in self.masked_layers], mask_kind)
            self.head.add_task(name, num_classes)
            if train_bn:
                for norm in self.norms.values():
                    norm.add_task(name)
        except BaseException:  # all or nothing: no layer keeps a half-added task
            for module in self._task_modules():
                module.remove_task(name)
            self.bank.remove(name)
            raise
        names = None if class_names is None else [str(c) for c in class_names]
        self.task_info[name] = TaskInfo(num_classes, names, train_bn, metadata)

    def check_new_task_name(self, name: str) -> None:
        """Raise ConfigError unless `name` is a valid name that no task has yet."""
        if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
            raise ConfigError(
                f"task name {name!r} is not allowed; use 1-128 letters, digits, '_' or '-'"
            )
        if name in _RESERVED_NAMES:
            raise ConfigError(
                f"task name {name!r} is reserved: torch's containers, which hold a task's "
                f"scores and layers, have an attribute of that name; use e.g. {name + '_task'!r}"
            )
        if name in self.task_info:
            raise ConfigError(f"task {name!r} already exists; remove_task({name!r}) first")

    def _check_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """One weight-shaped tensor per masked layer (values are checked when packed)."""
        if set(masks) != set(self.masked_layers):
            missing = sorted(set(self.masked_layers) - set(masks))[:3]
            extra = sorted(set(masks) - set(self.masked_layers))[:3]
            raise ConfigError(
                f"masks must cover exactly the masked layers; missing e.g. {missing}, "
                f"unknown e.g. {extra}"
            )
        for layer_name, mask in masks.items():
            shape = tuple(self.masked_layers[layer_name].frozen.shape)
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ConfigError(
                    f"the mask for layer {layer_name!r} must be a tensor of the weight's "
                    f"shape {shape}; got {got}"
                )

    def set_task(self, name: str | None) -> PiggybackModel:
        """Make `name` the task that `forward` runs (None: the plain backbone); returns
        the model so calls chain like `model.set_task("a").eval()`."""
        if name is not None:
            self._check_task(name)
        self._activate(name)
        self.active_task = name
        return self

    def remove_task(self, name: str) -> None:
        self._check_task(name)
        for module in self._task_modules():
            module.remove_task(name)
        self.bank.remove(name)
        del self.task_info[name]
        if self.active_task == name:
            self.set_task(None)

    def freeze_task(self, name: str) -> None:
        """Turn a trained task into what its task file keeps: scores into packed masks
        (1-2 bits per weight), its own norm layers rounded to 16 bits."""
        self._check_task(name)
        if self.is_trainable(name):
            with torch.no_grad():
                masks = [layer.mask(name) for layer in self.masked_layers.values()]
            self._store(name, masks, self.mask_kind(name))
        for norm in self.norms.values():
            norm.freeze_task(name)

    def is_trainable(self, name: str) -> bool:
        self._check_task(name)
        return any(name in layer.scores for layer in self.masked_layers.values())

    def trainable_parameters(
        self, task: str | None = None, part: ParameterPart = "all"
    ) -> list[nn.Parameter]:
        """The parameters an optimizer should update for `task` (default: the active one)."""
        task = self._task_or_active(task)
        params: list[nn.Parameter] = []
        if part in ("all", "scores"):
            params += [m.scores[task] for m in self.masked_layers.values() if task in m.scores]
        if part in ("all", "head"):
            params += list(self.head.heads[task].parameters())
        if part in ("all", "norm"):
            for norm in self.norms.values():
                if task in norm.norms:
                    params += list(norm.norms[task].parameters())
        return params

    def masks(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """Every masked layer's mask values for `task`, as int8 tensors."""
        task = self._task_or_active(task)
        with torch.no_grad():
            return {name: m.mask(task).to(torch.int8) for name, m in self.masked_layers.items()}

    def mask_kind(self, task: str) -> MaskKind:
        self._check_task(task)
        return next(iter(self.masked_layers.values())).kinds[task]

    def mask_stats(self, task: str | None = None) -> MaskStats:
        task = self._task_or_active(task)
        masks = self.masks(task)
        layers = [LayerMaskStats.of(name, mask) for name, mask in masks.items()]
        every = torch.cat([mask.flatten() for mask in masks.values()])
        kind = self.mask_kind(task)
        return MaskStats(
            task=task,
            kind=kind,
            layers=layers,
            numel=every.numel(),
            kept=float((every != 0).float().mean()),
            packed_bits=every.numel() * bits_per_value(kind),
            entropy_bits=empirical_entropy_bits(every),
        )

    def verify_masks(self, *args: Any, **kwargs: Any) -> None:
        """Check, with one forward and backward pass of an example input, that every
        masked layer's mask reaches the output; raise ConfigError naming the layers
        whose scores get no gradient (their masks would be ignored: a parent that
        reads the weight some way piggyback does not see). Leaves the model as it was.

        Example:
            >>> model = PiggybackModel(torchvision.models.resnet18())  # doctest: +SKIP
            >>> model.verify_masks(torch.randn(1, 3, 64, 64))  # doctest: +SKIP
        """
        if torch.is_inference_mode_enabled():
            raise ConfigError("verify_masks needs gradients: call it outside torch.inference_mode")
        probe, active = "_piggyback_probe", self.active_task
        modes = {module: module.training for module in self.modules()}
        self.add_task(probe, 2, train_bn=False)
        try:
            self.set_task(probe).eval()
            with torch.enable_grad():
                output = self.backbone(*args, **kwargs)
                _logits(output).float().sum().backward()
            silent = [
                name
                for name, layer in self.masked_layers.items()
                if layer.scores[probe].grad is None
            ]
        finally:
            self.remove_task(probe)
            self.set_task(active)
            for module, training in modes.items():  # each as it was, not all alike
                module.training = training
        if silent:
            raise ConfigError(
                f"the masks of {len(silent)} layers never reach the output (e.g. "
                f"{silent[:3]}): the model reads their weights in a way piggyback does not "
                "see. Leave them out with MaskConfig(exclude_modules=[...]), or report the "
                "model so its way of reading weights can be supported"
            )

    # --------------------------------------------------------------- forward
    def forward(self, *args: Any, task_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Run the active task, or with `task_names` (one per sample) a mixed batch.

        A mixed batch runs each task's samples through the network as a group,
        so it equals a per-task loop. Its output is a tensor (the `logits` of
        backbones that return an output object); when the tasks have different
        class counts, the logits are padded on the right with -inf.
        """
        if task_names is None:
            self._derive(self.active_task)
            return self.backbone(*args, **kwargs)
        return self._forward_mixed(list(task_names), args, kwargs)

    def _forward_mixed(
        self, task_names: list[str], args: tuple, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Samples gathered by task (one index for the batch, so no transfer per group), each
        task's rows run as one contiguous slice with that task's weights derived once."""
        batch = _batch_size(args, kwargs)
        if len(task_names) != batch:
            raise ConfigError(f"{len(task_names)} task names for a batch of {batch} samples")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(task_names):
            groups.setdefault(name, []).append(row)
        for name in groups:
            self._check_task(name)
        order = [row for rows in groups.values() for row in rows]
        index = torch.tensor(order, device=_first_tensor(args, kwargs).device)
        if order != list(range(batch)):
            args = tuple(_take(a, index, batch) for a in args)
            kwargs = {k: _take(v, index, batch) for k, v in kwargs.items()}
        outputs, start = [], 0
        try:
            for task, rows in groups.items():
                rows_of = slice(start, start + len(rows))
                start += len(rows)
                self._activate(task)
                self._derive(task)
                sub_args = tuple(_rows(a, rows_of, batch) for a in args)
                sub_kwargs = {k: _rows(v, rows_of, batch) for k, v in kwargs.items()}
                outputs.append(self.backbone(*sub_args, **sub_kwargs))
        finally:
            self._activate(self.active_task)
        return _assemble(outputs, index)

    def train(self, mode: bool = True) -> PiggybackModel:
        """As nn.Module.train; also forgets cached masked weights, which training makes
        stale, and in training mode frees their memory too."""
        super().train(mode)
        for layer in self.masked_layers.values():
            layer.clear_cache(release=mode)
        return self

    # ------------------------------------------------------------ unwrapping
    def bake(self, task: str | None = None) -> nn.Module:
        """A plain model of the backbone's own class with W * mask and the task's
        head and norms baked in: inference at exactly the plain backbone's cost.
        Its tensors are its own; it is returned in eval mode."""
        if task is not None:
            self._check_task(task)
        memo: dict[int, Any] = {}
        with torch.no_grad():
            for layer in reversed(self.masked_layers.values()):  # inner layers first
                memo[id(layer)] = layer.baked(task, memo)
        for module in (self.head, *self.norms.values()):
            memo[id(module)] = copy.deepcopy(module.layer_for(task))
        baked = copy.deepcopy(self.backbone, memo)
        baked.requires_grad_(True)
        return baked.eval()

    @property
    def base(self) -> nn.Module:
        """The untouched backbone as a plain module (its original head included).

        Its parameters are the frozen ones this model uses, shared rather than
        copied; do not train them. Its buffers are copies.
        """
        memo: dict[int, Any] = {id(p): p for p in self.backbone.parameters()}
        for module in self._task_modules():
            memo[id(module)] = copy.deepcopy(module.base_layer, memo)
        return copy.deepcopy(self.backbone, memo)

    # -------------------------------------------------------------- storage
    def save_task(self, task: str, path: str | Path) -> Path:
        """Write one task to a safetensors file (atomic); see `piggyback.store`."""
        from .store import save_task

        return save_task(self, task, path)

    def load_task(self, path: str | Path, name: str | None = None) -> str:
        """Load a task file into this model; returns the task's name."""
        from .store import load_task

        return load_task(self, path, name=name)

    # -------------------------------------------------------------- helpers
    def _task_modules(self) -> Iterator[TaskModule]:
        """Every wrapper, inner ones before those that hold them (as `base` needs)."""
        yield from reversed(self.masked_layers.values())
        yield from self.norms.values()
        yield self.head

    def _activate(self, task: str | None) -> None:
        for module in self._task_modules():
            module.active_task = task

    def _store(self, name: str, masks: list[torch.Tensor], kind: MaskKind) -> None:
        """Keep `masks` (one per masked layer, in order) as `name`'s packed bits."""
        device = next(iter(self.masked_layers.values())).frozen.device
        self.bank.store(name, masks, kind, device)
        for layer in self.masked_layers.values():
            layer.stored(name, kind)

    def _derive(self, task: str | None) -> None:
        """Before a forward without autograd: every layer's stale W * mask for a stored
        `task`, off the CPU from one unpack of the whole task (layers would otherwise
        derive their own as the forward reaches them, a chain of kernels each)."""
        if task is None or torch.is_grad_enabled() or task not in self.bank:
            return
        stale = [layer for layer in self.masked_layers.values() if layer.is_stale(task)]
        keep = self.bank.keep_all(task) if stale else None
        for layer in stale:
            numel = layer.frozen.numel()
            layer.derive(task, None if keep is None else keep[layer.start : layer.start + numel])

    def _check_task(self, name: str) -> None:
        if name not in self.task_info:
            raise UnknownTaskError(f"no task {name!r}; this model holds {self.tasks}")

    def _task_or_active(self, task: str | None) -> str:
        task = task if task is not None else self.active_task
        if task is None:
            raise ConfigError("no task given and no active task; call set_task(name) first")
        self._check_task(task)
        return task


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _replace(root: nn.Module, name: str, new: nn.Module) -> Any:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    return new


def _refuse_untracked_statistics(backbone: nn.Module) -> None:
    """A layer with running statistics that piggyback does not wrap would update the
    frozen backbone's statistics in train mode: refuse it, naming it."""
    for name, module in backbone.named_modules():
        has_stats = any(b.endswith("running_mean") for b, _ in module.named_buffers(recurse=False))
        if has_stats and not isinstance(module, NORM_TYPES):
            raise ConfigError(
                f"layer {name!r} ({type(module).__name__}) keeps running statistics but is not "
                f"a norm type piggyback can freeze ({[t.__name__ for t in NORM_TYPES]}); "
                "training would change the backbone. Replace it, or subclass a supported norm"
            )


def _refuse_aliases(backbone: nn.Module, names: list[str]) -> None:
    """A layer registered under two names would be wrapped under one and run unmasked
    under the other: refuse it, naming both."""
    first: dict[int, str] = {}
    for name, module in backbone.named_modules(remove_duplicate=False):
        if first.setdefault(id(module), name) != name and first[id(module)] in names:
            raise ConfigError(
                f"layer {first[id(module)]!r} is also registered as {name!r}; piggyback "
                "masks a layer under one name only: register it once, or exclude it "
                "with MaskConfig(exclude_modules=[...])"
            )


def _find_head(backbone: nn.Module, head: str | None) -> str:
    """The classifier's module name: given, timm's get_classifier(), or the last Linear."""
    names = {id(m): n for n, m in backbone.named_modules() if n}
    if head is not None:
        if head not in set(names.values()):
            raise ConfigError(f"head={head!r} is not a module of this backbone")
        return head
    get_classifier = getattr(backbone, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        if isinstance(classifier, nn.Module) and id(classifier) in names:
            return names[id(classifier)]
    linear = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(
            "found no classifier head (no get_classifier() and no nn.Linear); "
            "name it with MaskConfig(head='module.name')"
        )
    return linear[-1]


def _select_targets(backbone: nn.Module, config: MaskConfig, head: str) -> list[str]:
    """Names of the layers to mask: supported types, picked by the config, never the head."""
    supported = [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, MASKABLE_TYPES) and n != head and not n.startswith(head + ".")
    ]
    chosen = [
        n
        for n in supported
        if (config.target_modules is None or matches(config.target_modules, n))
        and (config.exclude_modules is None or not matches(config.exclude_modules, n))
    ]
    if not chosen:
        sample = ", ".join(supported[:6]) or "none"
        raise ConfigError(
            f"no layer to mask: target_modules={config.target_modules!r}, "
            f"exclude_modules={config.exclude_modules!r}. Supported types are "
            f"{[t.__name__ for t in MASKABLE_TYPES]}; such layers here: {sample}"
        )
    return chosen


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ConfigError("a mixed-task batch needs at least one tensor input")


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    tensor = _first_tensor(args, kwargs)
    if tensor.dim() == 0:
        raise ConfigError("a mixed-task batch needs batched inputs (first dimension = samples)")
    return tensor.shape[0]


def _take(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index)
    return value


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def _logits(output: Any) -> torch.Tensor:
    """A backbone's output as a tensor: itself, or the `logits` of an output object
    (Hugging Face models return one)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"the backbone returned a {type(output).__name__}; piggyback needs a tensor of "
            "logits or an object with a `logits` tensor"
        )
    return logits


def _assemble(outputs: list[Any], index: torch.Tensor) -> torch.Tensor:
    """The groups' logits, in `index` order, put back at their rows; padded with -inf if
    their widths differ."""
    logits = [_logits(out) for out in outputs]
    if len({o.shape[1:] for o in logits}) > 1:
        if any(o.dim() != 2 for o in logits):
            raise ConfigError("tasks in a mixed batch give outputs of different shapes")
        width = max(o.shape[1] for o in logits)
        logits = [F.pad(o, (0, width - o.shape[1]), value=float("-inf")) for o in logits]
    grouped = torch.cat(logits)
    return torch.empty_like(grouped).index_copy_(0, index, grouped)
