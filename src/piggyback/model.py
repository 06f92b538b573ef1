"""PiggybackModel: one frozen backbone, many tasks, one mask per task."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .bank import MaskBank, masks_into
from .bits import MaskKind, bits_per_value, empirical_entropy_bits, pack_mask
from .config import MaskConfig
from .errors import ConfigError, TaskFileNotFoundError, UnknownTaskError
from .flatweights import FlatWeights, can_join, joined, split_into
from .layers import NORM_TYPES, MaskedLayer, TaskHead, TaskModule, TaskNorm
from .mixed import assemble, batch_size, first_tensor, logits_of, slice_rows, take_rows
from .normbank import NormBank
from .store import (
    SUFFIX,
    ModelShape,
    PreparedTask,
    TaskFileContents,
    changed_norm_tensors,
    check_fits,
    fingerprint,
    read_task,
    read_task_file,
    task_config,
    task_files,
    write_task,
)
from .targets import (
    find_head,
    get_module,
    refuse_aliases,
    refuse_untracked_statistics,
    replace_module,
    select_targets,
)

if TYPE_CHECKING:
    from .taskinfer import TaskInference

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
        self.config = config or MaskConfig()
        self.fingerprint = fingerprint(backbone)
        backbone.requires_grad_(False)
        self.head_name = find_head(backbone, self.config.head)
        targets = select_targets(backbone, self.config, self.head_name)
        self.masked_layers: dict[str, MaskedLayer]
        self.norms: dict[str, TaskNorm] = {}
        refuse_untracked_statistics(backbone)
        refuse_aliases(backbone, [*targets, self.head_name])
        # Every wrapper is made (and so checked) before the backbone changes: a refusal
        # leaves the caller's backbone as it was.
        self.masked_layers = {n: MaskedLayer(get_module(backbone, n), self.config) for n in targets}
        self.bank = MaskBank([layer.frozen.numel() for layer in self.masked_layers.values()])
        start = 0
        for layer in self.masked_layers.values():
            layer.attach(self.bank, start)
            start += layer.frozen.numel()
        head = TaskHead(get_module(backbone, self.head_name))
        for name in reversed(targets):  # innermost first: an attention's out_proj, then it
            replace_module(backbone, name, self.masked_layers[name])
        for name, module in list(backbone.named_modules()):
            if isinstance(module, NORM_TYPES) and not name.startswith(self.head_name + "."):
                self.norms[name] = replace_module(backbone, name, TaskNorm(module))
        self.head: TaskHead = replace_module(backbone, self.head_name, head)
        self.norm_bank = NormBank([norm.base_layer for norm in self.norms.values()])
        for index, norm in enumerate(self.norms.values()):
            norm.attach(self.norm_bank, index)
        self.backbone = backbone
        self.task_info: dict[str, TaskInfo] = {}
        self.active_task: str | None = None
        self._fits: ModelShape | None = None
        self._flat_weights = FlatWeights()  # the masked weights end to end, on a GPU

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
        names = None if class_names is None else [str(c) for c in class_names]

        def masked_layers_take_it() -> None:
            if masks is None:
                for layer in self.masked_layers.values():
                    layer.add_task(name)
            else:
                self._store(name, [masks[n] for n in self.masked_layers], mask_kind)

        self._add(name, TaskInfo(num_classes, names, train_bn, metadata), masked_layers_take_it)

    def _add(
        self,
        name: str,
        info: TaskInfo,
        masked_layers_take_it: Callable[[], None],
        norms_take_them: Callable[[], None] | None = None,
    ) -> None:
        """Every module takes the checked task `name`, or none does (a half-added task is
        removed before the error goes on). Its own norm layers, when `info.train_bn`:
        trainable copies of the backbone's, or what `norms_take_them` banks."""
        try:
            masked_layers_take_it()
            self.head.add_task(name, info.num_classes)
            if info.train_bn and norms_take_them is not None:
                norms_take_them()
            elif info.train_bn:
                for norm in self.norms.values():
                    norm.add_task(name)
        except BaseException:
            self._drop(name)
            raise
        self.task_info[name] = info

    def _drop(self, name: str) -> None:
        """Whatever any module or bank holds of `name`."""
        for module in self._task_modules():
            module.remove_task(name)
        self.bank.remove(name)
        self.norm_bank.remove(name)

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

    @property
    def weight_cache_size(self) -> int:
        """How many tasks' masked weights (W * mask) each layer keeps while autograd is
        off, the most recently used ones (default 1: the active task's).

        A forward of a task that is not kept derives its weights again, which costs up to
        about half a forward; a mixed batch or `infer_task` over k tasks re-derives all k
        on every call unless this is at least k. Each kept task costs one more copy of the
        masked weights in the backbone's dtype (about 18 MB for EfficientNet-Lite0 in fp32,
        100 MB for ResNet-50).
        """
        return next(iter(self.masked_layers.values())).cache_size if self.masked_layers else 1

    @weight_cache_size.setter
    def weight_cache_size(self, tasks: int) -> None:
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ConfigError(f"weight_cache_size must be an integer >= 1, got {tasks!r}")
        for layer in self.masked_layers.values():
            layer.resize_cache(tasks)

    def remove_task(self, name: str) -> None:
        self._check_task(name)
        self._drop(name)
        del self.task_info[name]
        if self.active_task == name:
            self.set_task(None)

    def freeze_task(self, name: str) -> None:
        """Turn a trained task into what its task file keeps: scores into packed masks
        (1-2 bits per weight), its own norm layers rounded to 16 bits and moved into the
        model's `NormBank` (values, not modules: `trainable_parameters` makes them
        modules again)."""
        self._check_task(name)
        if self.is_trainable(name):
            self._store(name, list(self.masks(name).values()), self.mask_kind(name))
        for norm in self.norms.values():
            norm.freeze_task(name)
        owns = [norm.own_module(name) for norm in self.norms.values()]
        if owns and all(own is not None for own in owns):
            self.norm_bank.store(name, [own.state_dict() for own in owns])
            for norm in self.norms.values():
                norm.remove_task(name)

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
                norm.thaw(task)  # a frozen task's norms train as modules of their own
            self.norm_bank.remove(task)
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
                logits_of(output).float().sum().backward()
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
            self.derive_weights(self.active_task)
            return self.backbone(*args, **kwargs)
        return self._forward_mixed(list(task_names), args, kwargs)

    def _forward_mixed(
        self, task_names: list[str], args: tuple, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Samples gathered by task (one index for the batch, so no transfer per group; none
        when they already are), each task's rows run as one contiguous slice with that
        task's weights derived once."""
        batch = batch_size(args, kwargs)
        if len(task_names) != batch:
            raise ConfigError(f"{len(task_names)} task names for a batch of {batch} samples")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(task_names):
            groups.setdefault(name, []).append(row)
        for name in groups:
            self._check_task(name)
        order = [row for rows in groups.values() for row in rows]
        index = None  # rows already grouped (task inference's k copies): nothing to move
        if order != list(range(batch)):
            # not waited for: a blocking upload would hold the host until the GPU is idle
            index = torch.tensor(order).to(first_tensor(args, kwargs).device, non_blocking=True)
            args = tuple(take_rows(a, index, batch) for a in args)
            kwargs = {k: take_rows(v, index, batch) for k, v in kwargs.items()}
        outputs, start = [], 0
        try:
            for task, rows in groups.items():
                rows_of = slice(start, start + len(rows))
                start += len(rows)
                self._activate(task)
                self.derive_weights(task)
                sub_args = tuple(slice_rows(a, rows_of, batch) for a in args)
                sub_kwargs = {k: slice_rows(v, rows_of, batch) for k, v in kwargs.items()}
                outputs.append(self.backbone(*sub_args, **sub_kwargs))
        finally:
            self._activate(self.active_task)
        return assemble(outputs, index)

    def train(self, mode: bool = True) -> PiggybackModel:
        """As nn.Module.train; also forgets cached masked weights, which training makes
        stale, and in training mode frees their memory too."""
        super().train(mode)
        for layer in self.masked_layers.values():
            layer.clear_cache(release=mode)
        if mode:
            self._flat_weights.clear()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> PiggybackModel:
        """As nn.Module's (`.to`, `.half`...); the flat copy of the masked weights is made
        again from the moved weights when next needed, not left on the old device."""
        self._flat_weights.clear()
        return super()._apply(fn, recurse)

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
        memo[id(self.head)] = copy.deepcopy(self.head.layer_for(task))
        for norm in self.norms.values():
            memo[id(norm)] = norm.own_copy(task)
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

    def infer_task(
        self,
        *inputs: Any,
        tasks: Sequence[str] | None = None,
        rule: str | None = None,
        threshold: float | None = None,
        same_task: bool = False,
        **kwargs: Any,
    ) -> TaskInference:
        """Which of `tasks` (default: all held) each sample belongs to, None where it looks
        like none of them; see `piggyback.taskinfer` (`rule` None: its DEFAULT_RULE).

        It runs every candidate: k tasks cost about k forwards. Call it on a model in
        eval mode, with `weight_cache_size` at least k if memory allows (k copies of the
        masked weights): in training mode each call switches the model to eval and back,
        which drops the cached masked weights, and with fewer cached than candidates each
        call derives them again (docs/benchmarks.md, "Task inference").

        Example:
            >>> found = model.infer_task(images)  # doctest: +SKIP
            >>> found.tasks, found.scores  # doctest: +SKIP
        """
        from .taskinfer import DEFAULT_RULE, infer_task

        return infer_task(
            self, *inputs, tasks=tasks, rule=rule or DEFAULT_RULE, threshold=threshold,
            same_task=same_task, **kwargs,
        )  # fmt: skip

    # -------------------------------------------------------------- storage
    def save_task(self, task: str, path: str | Path) -> Path:
        """Write one task to a safetensors file (atomic); see `piggyback.store`. The task's
        own norm layers are rounded to the 16 bits the file keeps, in memory too: the
        model a user keeps running is the one they saved."""
        self._check_task(task)
        for norm in self.norms.values():
            norm.freeze_task(task)
        return write_task(path, self.prepared(task))

    def load_task(
        self, path: str | Path, name: str | None = None, *, read: TaskFileContents | None = None
    ) -> str:
        """Load a task file into this model; returns the task's name. On any error the
        model is left exactly as it was. `read`: what `read_task_file(path)` returned."""
        return self.install_task(self.prepare_task(path, name=name, read=read))

    def prepare_task(
        self, path: str | Path, *, name: str | None = None, read: TaskFileContents | None = None
    ) -> PreparedTask:
        """Read, decode and check the task file at `path` against this model, leaving the
        model untouched: the slow and untrusted half of `load_task`. The masks decode
        where the model keeps them."""
        read = read_task_file(path) if read is None else read
        self.check_new_task_name(read[0]["task"] if name is None else name)
        return read_task(path, self._shape(), name=name, read=read, device=self._masks_device())

    def install_task(self, task: PreparedTask) -> str:
        """Add a task from `prepare_task`, all or nothing; returns its name."""
        self.check_new_task_name(task.name)
        norms = check_fits(f"task {task.name!r}", task, self._shape())
        info = TaskInfo(task.num_classes, task.class_names, task.train_bn, dict(task.metadata))

        def masked_layers_take_it() -> None:
            self.bank.store_bits(task.name, task.bits, task.mask_kind, self._masks_device())
            for layer in self.masked_layers.values():
                layer.stored(task.name, task.mask_kind)

        def norms_take_them() -> None:  # what was not stored is the backbone's
            self.norm_bank.store(task.name, [norms.get(layer, {}) for layer in self.norms])

        self._add(task.name, info, masked_layers_take_it, norms_take_them)
        try:
            self.head.heads[task.name].load_state_dict(task.head)
        except BaseException:
            self.remove_task(task.name)
            raise
        return task.name

    def prepared(self, task: str) -> PreparedTask:
        """`task` as its file holds it: packed masks, head, the norm tensors it changed."""
        kind = self.mask_kind(task)  # raises UnknownTaskError for a task the model lacks
        info = self.task_info[task]
        if task in self.bank:
            bits = self.bank.packed(task).cpu()
        else:
            flat = torch.cat([mask.flatten() for mask in self.masks(task).values()])
            bits = pack_mask(flat.cpu(), kind)
        norms = {
            f"{layer_name}.{key}": value
            for layer_name, norm in self.norms.items()
            if task in norm.norms
            for key, value in changed_norm_tensors(norm.layer_for(task), norm.base_layer).items()
        }
        return PreparedTask(
            name=task,
            num_classes=info.num_classes,
            class_names=info.class_names,
            train_bn=info.train_bn,
            mask_kind=kind,
            layers=self._shape().layers,
            bits=bits,
            head=self.head.heads[task].state_dict(),
            norms=norms,
            metadata=info.metadata,
            backbone={
                "fingerprint": self.fingerprint,
                "class": type(self.backbone).__name__,
                "head": self.head_name,
            },
            config=self.config.to_dict(),
        )

    def _shape(self) -> ModelShape:
        """What a task file must fit in this model: fixed once it is wrapped, so worked
        out once (it reads every norm layer's state)."""
        if self._fits is None:
            self._fits = self._work_out_shape()
        return self._fits

    def _work_out_shape(self) -> ModelShape:
        return ModelShape(
            fingerprint=self.fingerprint,
            class_name=type(self.backbone).__name__,
            head=self.head_name,
            head_shapes={k: v.shape for k, v in self.head.base_layer.state_dict().items()},
            layers=[(n, tuple(m.frozen.shape)) for n, m in self.masked_layers.items()],
            norms={
                name: {k: v.shape for k, v in norm.base_layer.state_dict().items()}
                for name, norm in self.norms.items()
            },
        )

    # -------------------------------------------------------------- helpers
    def _task_modules(self) -> Iterator[TaskModule]:
        """Every wrapper, inner ones before those that hold them (as `base` needs)."""
        yield from reversed(self.masked_layers.values())
        yield from self.norms.values()
        yield self.head

    def _activate(self, task: str | None) -> None:
        """Point every task module at `task`: a plain attribute written straight into each
        one's __dict__ (nn.Module.__setattr__'s checks for parameters, buffers and modules
        cost 2 us a module, 107 of them in ResNet-50: on a GPU a switch is its host time)."""
        for module in self._task_modules():
            module.__dict__["active_task"] = task

    def _masks_device(self) -> torch.device:
        """Where stored tasks' bits live: with the masked weights."""
        return next(iter(self.masked_layers.values())).frozen.device

    def _store(self, name: str, masks: list[torch.Tensor], kind: MaskKind) -> None:
        """Keep `masks` (one per masked layer, in order) as `name`'s packed bits."""
        self.bank.store(name, masks, kind, self._masks_device())
        for layer in self.masked_layers.values():
            layer.stored(name, kind)

    def derive_weights(self, task: str | None) -> None:
        """Derive every layer's stale W * mask for a stored `task` now, as the first forward
        of it without autograd does (a server warms a task this way). All layers at once
        (`bank.masks_into`): layers would otherwise derive their own as the forward
        reaches them, each alone. Does nothing under autograd, for a training task, or
        when the first masked layer holds the task's current weight (the common case in
        a forward: the task is derived; any other stale layer derives its own as the
        forward reaches it, each layer checking again)."""
        if task is None or torch.is_grad_enabled() or task not in self.bank:
            return
        layers = list(self.masked_layers.values())
        if not layers or not layers[0].is_stale(task):
            return
        stale = [layer for layer in layers if layer.is_stale(task)]
        outs = [layer.claim(task) for layer in stale]
        weights = [layer.frozen for layer in stale]
        if len(stale) == len(layers) and self.bank.unpacks_at_once(task) and can_join(weights):
            outs = self._select_all(task, weights, outs)
        else:
            starts = [layer.start for layer in stale]
            masks_into(self.bank, task, list(zip(weights, starts, outs, strict=True)))
        for layer, out in zip(stale, outs, strict=True):
            layer.hold(task, out)

    def _select_all(
        self, task: str, weights: list[torch.Tensor], outs: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Every layer's W * mask in one select (`flatweights`), written into the flat
        tensor the claimed memory is slices of, else into a new one; its slices."""
        total = self.bank.numel
        flat = joined(outs, total)
        if flat is None:
            flat = torch.empty(total, dtype=weights[0].dtype, device=weights[0].device)
            outs = split_into(flat, weights)
        self.bank.select_all(task, self._flat_weights.of(weights), flat)
        return outs

    def _check_task(self, name: str) -> None:
        if name not in self.task_info:
            raise UnknownTaskError(f"no task {name!r}; this model holds {self.tasks}")

    def _task_or_active(self, task: str | None) -> str:
        task = task if task is not None else self.active_task
        if task is None:
            raise ConfigError("no task given and no active task; call set_task(name) first")
        self._check_task(task)
        return task


def save(model: PiggybackModel, directory: str | Path) -> list[Path]:
    """Write every task of `model` to `directory`, one task file each."""
    directory = Path(directory)
    return [model.save_task(task, directory / f"{task}{SUFFIX}") for task in model.tasks]


def load(
    directory: str | Path, backbone: nn.Module, config: MaskConfig | None = None
) -> PiggybackModel:
    """Wrap `backbone` and load every task file in `directory` (config from the files).

    The model comes back in eval mode, ready for inference, like any loaded model.
    """
    files = task_files(directory)
    if not files:
        raise TaskFileNotFoundError(f"no {SUFFIX} task files in {str(directory)!r}")
    if config is None:
        config = task_config(read_task_file(files[0])[0])
    model = PiggybackModel(backbone, config)
    for file in files:
        model.load_task(file)
    return model.eval()
