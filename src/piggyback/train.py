"""Training: `fit` and its phases, with the default recipe; the loop itself is `piggyback.loop`.

`fit` adds one task to a PiggybackModel with one of three methods, so they can be
compared side by side: "piggyback" (learn the mask and the head), "classifier"
(the head only) and "finetune" (every weight of a copy of the backbone).

The same functions run one process or many under torchrun: see `piggyback.distributed`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed, recipes
from .baked import recorded_spec, task_model_info, write_baked
from .checkpoint import has_checkpoint, load_checkpoint, remove_checkpoint, save_checkpoint
from .data import EpochLoader, TaskData, make_loader
from .errors import ConfigError, DegenerateTaskWarning
from .loop import evaluate, train_one_epoch
from .model import PiggybackModel
from .norms import ImagePass, recalibrate_norms, start_norms_as_backbone
from .precision import Amp, check_amp
from .recipes import DEFAULT_RECIPE
from .store import write_atomic
from .taskinfer import calibrate_task, calibrating
from .workers import Workers, check_workers, resolve_workers

Method = Literal["piggyback", "classifier", "finetune"]
RESULT = "result.json"  # written last by `fit`: the run is complete
METHODS: tuple[str, ...] = ("piggyback", "classifier", "finetune")
MIN_IMAGES_PER_CLASS = 5  # fewer training images per class cannot teach a task


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the "default" recipe (`piggyback.recipes`): Adam,
    scores lr 3e-4, head 1e-3, batch 32, 30 epochs, lr x0.1 every 15 epochs, no weight
    decay; `for_recipe("paper")` gives the paper's learning rates. `weight_decay` applies
    to the head and norm layers (and every weight when fine-tuning), never to scores.

    A task with its own BatchNorm layers starts them from `recalibrate_images` training
    images, and gets their statistics re-estimated from as many after every epoch under the
    current mask (0: never). 256 cost a quarter of 1,024's passes and gave the same
    accuracy on the 128 px benchmark (docs/benchmarks.md).

    `batch_size` is the global batch: under torchrun each of W processes takes
    batch_size / W of it. `amp` runs forward passes under torch.autocast (scores, masks
    and the optimizer stay fp32); "fp16" needs CUDA. `sync_bn` makes trainable
    BatchNorm layers compute their statistics over the global batch (CUDA only).
    `num_workers` processes decode images beside training; "auto" is 0 on the CPU and
    one per free core (up to 8) on a GPU (`piggyback.workers`).

    Example:
        >>> TrainConfig(epochs=2, method="classifier").lr_decay_every
        15
    """

    method: Method = "piggyback"
    epochs: int = 30
    batch_size: int = 32
    lr: float = DEFAULT_RECIPE.lr
    head_lr: float = DEFAULT_RECIPE.head_lr
    lr_decay: float = 0.1
    lr_decay_every: int = 15
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = 0
    device: str = "auto"
    num_workers: Workers = "auto"
    progress: bool = True
    amp: Amp | None = None
    sync_bn: bool = False
    recalibrate_images: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not known; expected one of {METHODS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer={self.optimizer!r}; expected 'adam' or 'sgd'")
        for name in ("epochs", "batch_size", "lr_decay_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("lr", "head_lr", "lr_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if (
            isinstance(self.recalibrate_images, bool)
            or not isinstance(self.recalibrate_images, int)
            or self.recalibrate_images < 0
        ):
            raise ConfigError(
                f"recalibrate_images must be an integer >= 0, got {self.recalibrate_images!r}"
            )
        check_workers(self.num_workers)
        device = resolve_device(self.device)
        check_amp(self.amp, device)
        if self.sync_bn and device.type != "cuda":
            raise ConfigError(
                f"sync_bn=True needs CUDA (PyTorch's SyncBatchNorm), the device is {device}"
            )

    @classmethod
    def for_recipe(cls, recipe: str, **settings: Any) -> TrainConfig:
        """The config of a named recipe (`piggyback.recipes.RECIPES`), `settings` on top."""
        chosen = recipes.recipe(recipe)
        return cls(**{"lr": chosen.lr, "head_lr": chosen.head_lr, **settings})


def resolve_device(device: str) -> torch.device:
    """ "auto" means CUDA when present, else the CPU; under torchrun CUDA is cuda:LOCAL_RANK."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r} is not a torch device (try 'cpu' or 'cuda')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asked for, but CUDA is not available here")
    return distributed.local_device(resolved)


@dataclass
class FitResult:
    """What a run produced: the best epoch on validation and its test metrics."""

    task: str
    method: str
    best_epoch: int
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    task_file: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task_file"] = str(self.task_file) if self.task_file else None
        return data


def setup_training(
    model: PiggybackModel,
    task: str,
    data: TaskData,
    config: TrainConfig,
    *,
    train_bn: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Add `task` and return the network to train with its optimizer parameter groups.

    The baselines start from the plain backbone whatever the mask config says: their
    task holds an all-ones mask, and the classifier trains the head alone (no norms).
    """
    baseline = config.method != "piggyback"
    masks = (
        {name: torch.ones_like(layer.frozen, dtype=torch.int8)
         for name, layer in model.masked_layers.items()}
        if baseline else None
    )  # fmt: skip
    model.add_task(
        task,
        data.num_classes,
        class_names=data.class_names,
        train_bn=False if config.method == "classifier" else train_bn,
        masks=masks,
        metadata={**(metadata or {}), "method": config.method},
    )
    model.set_task(task)
    if config.method == "finetune":
        network = model.bake(task)
        head = set(map(id, network.get_submodule(model.head_name).parameters()))
        body = [p for p in network.parameters() if id(p) not in head]
        heads = [p for p in network.parameters() if id(p) in head]
        return network, [{"params": body, "lr": config.lr}, {"params": heads, "lr": config.head_lr}]
    rest = model.trainable_parameters(task, "head") + model.trainable_parameters(task, "norm")
    groups = [{"params": rest, "lr": config.head_lr}]
    if not baseline:
        # Scores never decay: decay would pull every score toward 0, past the threshold,
        # and prune weights that get no gradient (the reference never decays them).
        scores = model.trainable_parameters(task, "scores")
        groups.insert(0, {"params": scores, "lr": config.lr, "weight_decay": 0.0})
    # Only what the optimizer trains requires grad (not the heads of earlier tasks):
    # DistributedDataParallel all-reduces exactly those.
    model.requires_grad_(False)
    for group in groups:
        for param in group["params"]:
            param.requires_grad_(True)
    return model, groups


def _verify_masks(model: PiggybackModel, images: Dataset, device: torch.device) -> None:
    """Before any training: every mask must reach the output (`PiggybackModel.verify_masks`),
    or the run would train scores that nothing reads."""
    if len(images):
        sample = torch.stack([images[i][0] for i in range(min(2, len(images)))]).to(device)
        model.verify_masks(sample)


def _norm_pass(config: TrainConfig, seed: int) -> ImagePass:
    """The images a run's norm passes see (`piggyback.norms`)."""
    return ImagePass(config.recalibrate_images, config.batch_size, seed, config.amp)


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=config.weight_decay)


@dataclass
class _Run:
    """What every phase of one `fit` reads: the task, its network and optimizer state,
    and the loaders."""

    model: PiggybackModel
    task: str
    data: TaskData
    config: TrainConfig
    out: Path
    device: torch.device
    network: nn.Module
    groups: list[dict[str, Any]]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    trainable: list[str]
    train_loader: EpochLoader
    sampler: Any
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]]
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]]

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def evaluate(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    ) -> dict[str, Any]:
        return evaluate(
            self.network, loader, self.device, self.data.num_classes, progress=False,
            amp=self.config.amp, observe=observe,
        )  # fmt: skip


@dataclass
class _Progress:
    """Where the epochs stand: the next one, each finished one's row, the best so far."""

    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": -1, "top1": -1.0, "loss": math.inf, "state": None}
    )

    def add(self, row: dict[str, Any], run: _Run) -> None:
        """A finished epoch's row; its trained state kept if it is the best so far."""
        self.history.append(row)
        if is_better({"top1": row["val_top1"], "loss": row["val_loss"]}, self.best):
            self.best = {
                "epoch": row["epoch"],
                "top1": row["val_top1"],
                "loss": row["val_loss"],
                "state": _copy_state(run.network, run.trainable),
            }


def fit(
    model: PiggybackModel,
    task: str,
    data: TaskData,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    train_bn: bool | None = None,
    resume: bool = False,
    keep_checkpoint: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train `task` on `data`, select the epoch best on validation (`is_better`: top-1,
    then the lower loss on a tie), test it, save it. Prints a line per epoch on rank 0.

    Writes to `out_dir`: `checkpoint/` (the state after the last finished epoch, for
    `resume=True`; removed once the run is complete unless `keep_checkpoint`, since it
    holds the whole trained state, many times the task file), `metrics.jsonl` (one line
    per epoch, rewritten from the checkpoint's history, so it never records an epoch
    whose state is lost), the task file
    `TASK.safetensors` (piggyback/classifier) or `TASK.finetuned.safetensors`
    (finetune, a full model), and `result.json`.

    `resume=True` goes on from the checkpoint, wherever an earlier run was killed. Killed
    before its first checkpoint was complete, there is none: the run starts over from
    epoch 1 with a warning. A damaged checkpoint or one of another run raises
    `TaskFileError` instead (delete `out_dir/checkpoint` to start over): writes are
    atomic, so a kill cannot leave one, and it is not thrown away unseen. Without
    `resume`, a checkpoint left in `out_dir` is removed when the run starts.

    Under torchrun every process calls `fit` inside `distributed.process_group` (the CLI
    does): the network trains under DistributedDataParallel, each process on its share of
    every global batch and of val/test; all return the same result, and only rank 0
    writes files (its `task_file` is the only one set). For `resume`, every process
    reads `out_dir/checkpoint`, so it must be on a filesystem all nodes share.

    The phases, each a function of its own: `_prepare` (the network, optimizer and
    loaders), `_begin` (resume, or start the task's norms), `_train_epoch` and
    `_record_epoch` per epoch, `_finish` (the best epoch, tested, calibrated and saved).
    """
    started = time.perf_counter()
    run = _prepare(model, task, data, config, Path(out_dir), train_bn, metadata)
    progress = _begin(run, resume)
    params = [p for group in run.groups for p in group["params"]]
    trained_keys = set(run.trainable)
    buffers = [b for name, b in run.network.named_buffers() if name in trained_keys]
    with distributed.data_parallel(
        run.network, run.device, params, sync_bn=config.sync_bn
    ) as trained:
        for epoch in range(progress.start_epoch, config.epochs):
            progress.add(_train_epoch(run, trained, buffers, epoch), run)
            _record_epoch(run, progress)
    return _finish(run, progress.best, progress.history, started, keep_checkpoint)


def _prepare(
    model: PiggybackModel,
    task: str,
    data: TaskData,
    config: TrainConfig,
    out: Path,
    train_bn: bool | None,
    metadata: Mapping[str, Any] | None,
) -> _Run:
    """Add the task and build what trains it: network, optimizer, schedule, loaders."""
    world = distributed.world_size()
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch; it must split evenly "
            f"over the {world} processes"
        )
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    network, groups = setup_training(
        model, task, data, config, train_bn=train_bn, metadata=metadata
    )
    network.to(device)
    optimizer = make_optimizer(groups, config)
    feed = {"num_workers": resolve_workers(config.num_workers, device.type), "device": device}
    # One shuffle for all processes; a single process gets the same global batches.
    sampler = distributed.train_sampler(data.train, seed=config.seed * 1_000_003)
    return _Run(
        model=model,
        task=task,
        data=data,
        config=config,
        out=out,
        device=device,
        network=network,
        groups=groups,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(
            optimizer, config.lr_decay_every, config.lr_decay
        ),
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        trainable=_trainable_state_keys(network, groups),
        train_loader=EpochLoader(data.train, config.batch_size // world, sampler, **feed),
        sampler=sampler,
        val_loader=make_loader(
            distributed.shard(data.val),
            config.batch_size,
            shuffle=False,
            persistent=True,
            **feed,
        ),
        test_loader=make_loader(
            distributed.shard(data.test), config.batch_size, shuffle=False, **feed
        ),
    )


def _begin(run: _Run, resume: bool) -> _Progress:
    """Go on from the checkpoint (`resume`), or start afresh: no older run's checkpoint
    or result left behind, and for piggyback the task's norms started as the backbone."""
    progress = _Progress()
    if resume and _can_resume(run.checkpoint_dir):
        progress.start_epoch, progress.history, progress.best = load_checkpoint(
            run.checkpoint_dir, run.network, run.optimizer, run.scheduler, run.trainable,
            run.device, run.scaler,
        )  # fmt: skip
        best_epoch = progress.best["epoch"]
        progress.best["loss"] = (
            progress.history[best_epoch - 1]["val_loss"] if best_epoch > 0 else math.inf
        )
    else:
        if distributed.is_main():  # a run killed before its first checkpoint must not
            remove_checkpoint(run.checkpoint_dir)  # resume an older run's,
            (run.out / RESULT).unlink(missing_ok=True)  # nor pass for finished with its result
        if run.config.method == "piggyback":
            _verify_masks(run.model, run.data.train, run.device)
            norm_pass = _norm_pass(run.config, run.config.seed)
            start_norms_as_backbone(run.model, run.task, run.data.train, run.device, norm_pass)
    if not distributed.all_equal(progress.start_epoch):
        raise ConfigError(
            f"the processes found different checkpoints in {run.checkpoint_dir}; with "
            "--resume the output folder must be on a filesystem that every node shares"
        )
    if distributed.is_main():  # drops epochs a killed run did not checkpoint
        _write_metrics(run.metrics_path, progress.history)
    return progress


def _train_epoch(
    run: _Run, trained: nn.Module, buffers: list[torch.Tensor], epoch: int
) -> dict[str, Any]:
    """Train one epoch, re-estimate the norms under the mask, validate: the epoch's row."""
    config, world = run.config, distributed.world_size()
    # Same stream whether resumed or not; each process its own (augmentation).
    epoch_seed = (config.seed * 1_000_003 + epoch) * world + distributed.rank()
    torch.manual_seed(epoch_seed)
    run.sampler.set_epoch(epoch)
    train_metrics = train_one_epoch(
        trained,
        run.train_loader.epoch(epoch_seed),
        run.optimizer,
        run.device,
        desc=_epoch_desc(run, epoch),
        progress=config.progress and distributed.is_main(),
        amp=config.amp,
        scaler=run.scaler,
    )
    distributed.average_(buffers)
    if config.method == "piggyback":
        norm_pass = _norm_pass(config, epoch_seed)
        recalibrate_norms(run.model, run.task, run.data.train, run.device, norm_pass)
    epoch_lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    val = run.evaluate(run.val_loader)
    row = {
        "epoch": epoch + 1,
        "train_loss": train_metrics["loss"],
        "train_acc": train_metrics["acc"],
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "lr": epoch_lr,
    }
    if config.method != "finetune":
        row["kept"] = run.model.mask_stats(run.task).kept
    return row


def _epoch_desc(run: _Run, epoch: int) -> str:
    return f"{run.task} {epoch + 1}/{run.config.epochs}"


def _record_epoch(run: _Run, progress: _Progress) -> None:
    """On rank 0: the checkpoint first (metrics.jsonl never gets ahead of it), then the
    metrics and a line for the epoch (in a log too, where no bar shows progress)."""
    if not distributed.is_main():
        return
    row = progress.history[-1]
    save_checkpoint(
        run.checkpoint_dir, run.network, run.optimizer, run.scheduler, run.trainable,
        row["epoch"], progress.history, progress.best, run.scaler,
    )  # fmt: skip
    _write_metrics(run.metrics_path, progress.history)
    line = (
        f"{_epoch_desc(run, row['epoch'] - 1)}: loss {row['train_loss']:.4f} "
        f"train {row['train_acc']:.3f} val {row['val_top1']:.3f} (loss {row['val_loss']:.4f})"
        + (f" kept {row['kept']:.4f}" if "kept" in row else "")
    )
    if run.config.progress:
        tqdm.write(line)
    else:
        print(line, flush=True)


def _finish(
    run: _Run,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    started: float,
    keep_checkpoint: bool,
) -> FitResult:
    """Restore the best epoch, freeze it as its file keeps it, measure it, calibrate and
    save it, warn about a degenerate task, and write result.json (the run is complete)."""
    model, task, data, method = run.model, run.task, run.data, run.config.method
    main = distributed.is_main()
    if best["state"] is not None:
        run.network.load_state_dict(best["state"], strict=False)
    if method != "finetune":
        model.freeze_task(task)  # in every process, so that all hold the same model
    # Measured as saved: the frozen task is what its file reloads to. The final validation
    # pass also calibrates the task (how sure it is of its own validation images and what
    # their features look like: what task inference compares an input of unknown task
    # with, `piggyback.taskinfer`; saved in its file), unless each process sees a share.
    calibrate = main and method != "finetune" and len(data.val) > 0
    if calibrate and distributed.world_size() == 1:
        with calibrating(model, task) as observe:
            val = run.evaluate(run.val_loader, observe)
    else:
        val = run.evaluate(run.val_loader)
        if calibrate:
            loader = make_loader(data.val, run.config.batch_size, shuffle=False)
            calibrate_task(model, task, loader, run.device)
    test = run.evaluate(run.test_loader)
    task_file = save_result_model(model, run.network, task, method, run.out) if main else None
    kept = model.mask_stats(task).kept if method == "piggyback" else None
    problems = degenerate_task_problems(
        val["top1"], data.num_classes, kept, method=method,
        train_images=len(data.train), own_norms=bool(model.task_info[task].train_bn),
    )  # fmt: skip
    for problem in problems:
        warnings.warn(f"task {task!r}: {problem}", DegenerateTaskWarning, stacklevel=3)
    result = FitResult(
        task=task,
        method=method,
        best_epoch=best["epoch"],
        val=val,
        test=test,
        history=history,
        seconds=time.perf_counter() - started,
        task_file=task_file,
        warnings=problems,
    )
    if main:
        write_atomic(run.out / RESULT, json.dumps(result.to_dict(), indent=2).encode())
        if not keep_checkpoint:
            remove_checkpoint(run.checkpoint_dir)
    distributed.barrier()  # the files are whole before any process goes on
    return result


def _can_resume(checkpoint_dir: Path) -> bool:
    """Whether there is a checkpoint to resume from; if not, say that the run starts over."""
    if has_checkpoint(checkpoint_dir):
        return True
    if distributed.is_main():
        warnings.warn(
            f"no complete checkpoint in {checkpoint_dir}; starting over from epoch 1",
            stacklevel=4,  # the caller of fit (via _begin)
        )
    return False


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl: one JSON line per finished epoch."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in history).encode())


def is_better(val: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Whether an epoch's validation metrics beat the best so far: a higher top-1, or
    the same top-1 at a lower loss (an early epoch must not win a tie against a later
    one that fits the validation set better)."""
    return (val["top1"], -val["loss"]) > (best["top1"], -best["loss"])


def degenerate_task_problems(
    val_top1: float,
    num_classes: int,
    kept: float | None,
    *,
    method: str = "piggyback",
    train_images: int | None = None,
    own_norms: bool = False,
) -> list[str]:
    """What is wrong with a trained task, in words a user can act on (empty: nothing).

    `kept` is the fraction of weights the final mask keeps (None: no mask trained);
    `train_images` the size of the training split (None: not known).
    """
    problems = []
    chance = 1 / num_classes
    per_class = None if train_images is None else train_images / num_classes
    if num_classes > 1 and val_top1 <= chance + 0.05:
        problem = f"validation top-1 {val_top1:.3f} is at chance ({chance:.3f}): "
        if per_class is not None and per_class < MIN_IMAGES_PER_CLASS:
            problem += (
                f"{train_images} training images for {num_classes} classes are too few to "
                f"learn from; add images (at least {MIN_IMAGES_PER_CLASS} per class)"
            )
        else:
            problem += "the network learned nothing. " + _CHANCE_ADVICE[method]
        problems.append(problem)
    if kept is not None and kept >= 1.0:
        holds = "a new head and its own norm layers" if own_norms else "a new head"
        problems.append(
            f"the saved mask keeps every weight, so this task is {holds} on the unmasked "
            "backbone (no epoch with a moved mask did better on validation). Train longer "
            "(--epochs), or raise the scores' learning rate (--lr) for the mask to move"
        )
    return problems


_CHANCE_ADVICE = {
    "piggyback": "Check the labels, train longer or try another --lr; with frozen norms "
    "(--no-train-bn, --recipe paper) a moving mask can collapse the network (docs/method.md)",
    "classifier": "Check the labels, train longer or raise --head-lr: the features are "
    "frozen, so only the head can learn",
    "finetune": "Check the labels, train longer or lower --lr: fine-tuning every weight "
    "diverges when the learning rate is too high",
}


def model_file_name(task: str, method: str) -> str:
    """The file a run of `method` writes its model to: TASK.safetensors (a task file), or
    TASK.finetuned.safetensors (the whole fine-tuned network)."""
    return f"{task}.finetuned.safetensors" if method == "finetune" else f"{task}.safetensors"


def save_result_model(
    model: PiggybackModel, network: nn.Module, task: str, method: str, out: Path
) -> Path:
    """The task file for masked methods (after `model.freeze_task`); for fine-tuning, the
    whole network as a baked model file (`piggyback.baked`), which the CLI reads alike."""
    path = out / model_file_name(task, method)
    if method != "finetune":
        return model.save_task(task, path)
    spec = recorded_spec(model.task_info[task].metadata, model.backbone, path)
    info = task_model_info(model, task, spec)
    backbone = info.metadata.get("backbone") or ""
    return write_baked(path, network, info, backbone=backbone, head=model.head_name)


def _trainable_state_keys(network: nn.Module, groups: list[dict[str, Any]]) -> list[str]:
    """state_dict keys of what training changes: trained parameters and their modules' buffers."""
    ids = {id(p) for group in groups for p in group["params"]}
    keys = [name for name, p in network.named_parameters() if id(p) in ids]
    owners = {name.rpartition(".")[0] for name in keys}
    keys += [name for name, _ in network.named_buffers() if name.rpartition(".")[0] in owners]
    return keys


def _copy_state(network: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    state = network.state_dict()
    return {k: state[k].detach().clone() for k in keys}
