"""A training run as the command line describes it: settings from flags and YAML files,
the backbone, the checks before resuming, then `fit`.

Kept apart from `piggyback.cli`, which only parses: `train` and `train-many` both run
each task through `train_task`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, DegenerateTaskWarning, TaskFileError
from .recipes import recipe as get_recipe

if TYPE_CHECKING:
    from .model import PiggybackModel
    from .train import TrainConfig

# Flags that `train` reads from a YAML config file (the file's keys use the same names).
TRAIN_KEYS = (
    "backbone", "weights", "pretrained", "data", "task", "out", "size", "limit", "augment",
    "strict", "val_fraction", "test_fraction", "method", "epochs", "batch_size", "lr", "head_lr",
    "lr_decay", "lr_decay_every", "weight_decay", "optimizer", "seed", "device", "num_workers",
    "threshold", "threshold_fn", "init", "init_scale", "train_bn", "resume", "keep_checkpoint",
    "force", "amp", "sync_bn", "recipe", "allow_random_backbone",
)  # fmt: skip
# `train-many` settings that hold for the whole run, so only at the top of its file.
SHARED_KEYS = (
    "backbone", "weights", "pretrained", "allow_random_backbone", "threshold", "threshold_fn",
    "init", "init_scale", "device", "out",
)  # fmt: skip
# Settings that make the task what it is: `--resume` with any of them changed would
# continue one task's checkpoint on another's data, resolution or masks.
TASK_KEYS = (
    "backbone", "weights", "pretrained", "data", "task", "size", "limit", "val_fraction",
    "test_fraction", "seed", "method", "threshold", "threshold_fn", "init", "init_scale",
    "train_bn",
)  # fmt: skip


def read_config_file(path: Path) -> dict[str, Any]:
    """`train` settings from a YAML mapping whose keys are the flags' names."""
    return _checked_settings(_read_mapping(path), str(path), TRAIN_KEYS)


def read_tasks_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`train-many` settings: `train` settings shared by every task, and a `tasks:` list
    whose items are a dataset name or a mapping of that task's own settings."""
    settings = _read_mapping(path)
    tasks = settings.pop("tasks", None)
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{path} needs a non-empty `tasks:` list of dataset names or mappings")
    shared = _checked_settings(settings, str(path), TRAIN_KEYS)
    entries = []
    for number, item in enumerate(tasks, 1):
        if not isinstance(item, (str, dict)):
            raise ConfigError(
                f"{path}: task {number} is a {type(item).__name__}; expected a dataset name "
                "or a mapping of settings"
            )
        entry = _checked_settings(
            {"data": item} if isinstance(item, str) else item, f"{path} task {number}", TRAIN_KEYS
        )
        shared_only = sorted(set(entry) & set(SHARED_KEYS))
        if shared_only:
            raise ConfigError(
                f"{path}: task {number} sets {shared_only}, which every task shares; "
                "set them at the top of the file"
            )
        entries.append(entry)
    return shared, entries


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:  # its own text names "<unicode string>", not the file
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong in a YAML file and where (1-based line and column)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _checked_settings(loaded: dict[str, Any], where: str, allowed: Sequence[str]) -> dict[str, Any]:
    settings = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown settings {unknown}; allowed: {sorted(allowed)}")
    return settings


def show_progress(flag: bool | None) -> bool:
    """Progress bars as `--progress` / `--no-progress` say; by default only on a
    terminal, so that redirected logs hold no bar updates."""
    return sys.stderr.isatty() if flag is None else flag


def train_config(args: argparse.Namespace) -> TrainConfig:
    from .train import TrainConfig

    if not args.data:
        raise ConfigError("no dataset: pass --data (e.g. --data digits) or set data: in --config")
    if args.size is not None:
        check_size_flag(args.size)
    if args.resume and args.force:
        raise ConfigError("--resume goes on from a run, --force starts it over: pass one")
    _apply_recipe(args)
    return TrainConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_lr=args.head_lr, lr_decay=args.lr_decay, lr_decay_every=args.lr_decay_every,
        weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed,
        device=args.device, num_workers=args.num_workers, progress=show_progress(args.progress),
        amp=args.amp, sync_bn=args.sync_bn,
    )  # fmt: skip


def check_size_flag(size: Any) -> None:
    """`--size` within what eval, predict and serve accept from a task file (and so,
    checked before any training, the same limit)."""
    from .taskmeta import MAX_INPUT_SIZE

    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_INPUT_SIZE:
        raise ConfigError(
            f"--size must be an integer in [1, {MAX_INPUT_SIZE:,}], got {size!r}: eval, "
            "predict and serve refuse task files trained at other sizes"
        )


def _apply_recipe(args: argparse.Namespace) -> None:
    """Fill the settings the command line and config left open from the named recipe."""
    recipe = get_recipe(args.recipe)
    for key in ("lr", "head_lr", "train_bn"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))


def build_model(args: argparse.Namespace) -> PiggybackModel:
    """The backbone, wrapped. Seeded: one without pretrained weights is then the same in
    every run and in every process of a torchrun job."""
    import torch

    from .backbones import DEFAULT_BACKBONE, create_backbone
    from .config import MaskConfig
    from .model import PiggybackModel

    _check_trained_weights(args)
    mask_config = MaskConfig(
        threshold=args.threshold, threshold_fn=args.threshold_fn, init=args.init,
        init_scale=args.init_scale, train_bn=args.train_bn,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    backbone = create_backbone(
        args.backbone or DEFAULT_BACKBONE, pretrained=args.pretrained, weights=args.weights
    )
    return PiggybackModel(backbone, mask_config)


def _check_trained_weights(args: argparse.Namespace) -> None:
    """Refuse a random backbone unless asked for: eval, predict and serve build a backbone
    afresh, and a random one differs in every process, so the task file fits none."""
    from .backbones import DEFAULT_BACKBONE, has_trained_weights

    name = args.backbone or DEFAULT_BACKBONE
    if args.allow_random_backbone or has_trained_weights(
        name, pretrained=args.pretrained, weights=args.weights
    ):
        return
    raise ConfigError(
        f"backbone {name!r} would have random weights, so its task file would load only onto "
        "a backbone rebuilt with the same --seed and torch/timm versions (eval and predict "
        "do so; serve does not); pass --pretrained, --weights FILE, or --allow-random-backbone "
        "(allow_random_backbone: true in a config file) to train on it anyway"
    )


def train_task(model: PiggybackModel, args: argparse.Namespace, config: TrainConfig) -> None:
    """Load one task's data and `fit` it; rank 0 alone writes settings and prints.

    Everything a later command would refuse (the task file's fields, a batch that cannot
    fit in memory, a run folder whose results would be lost) is refused before the data
    are read."""
    from .backbones import DEFAULT_BACKBONE, has_trained_weights, input_spec
    from .data import load_task_data
    from .distributed import barrier, is_main
    from .memory import check_activation_memory
    from .store import write_atomic
    from .taskmeta import RANDOM_KEY, SPEC_KEY, check_task_fields, spec_record
    from .train import fit

    task = args.task or task_name(args.data)
    out = Path(args.out) if args.out else default_out(task, args.method)
    spec = input_spec(model.backbone, size=args.size)
    data_name = absolute_data(args.data)
    settings = {key: _plain(getattr(args, key)) for key in TRAIN_KEYS}
    backbone = args.backbone or DEFAULT_BACKBONE
    settings.update(backbone=backbone, task=task, out=str(out), size=spec.size, data=data_name)
    metadata = {key: settings[key] for key in ("backbone", "weights", "size", "seed", "limit")}
    metadata.update(
        data=data_name, val_fraction=args.val_fraction, test_fraction=args.test_fraction
    )
    if not has_trained_weights(backbone, pretrained=args.pretrained, weights=args.weights):
        metadata[RANDOM_KEY] = True  # eval and predict rebuild it from the recorded seed
    metadata[SPEC_KEY] = spec_record(spec)  # what predict, eval and exports prepare images with
    try:
        check_task_fields(task, metadata)
    except TaskFileError as exc:
        raise ConfigError(f"this run would write a task file that eval refuses: {exc}") from exc
    check_activation_memory(
        backbone, spec.size, config.batch_size, method=args.method, amp=args.amp,
        device=config.device,
    )  # fmt: skip
    if args.resume and _finished(out, settings):
        return
    check_run_folder(out, task, resume=args.resume, force=args.force)
    # Under torchrun every process has looked at the folder before rank 0 writes into it:
    # else a process slower to start a task of train-many saw rank 0's settings.yaml and
    # refused the folder as another run's.
    barrier()
    resume = args.resume and _resume_point(out, settings, config.epochs)
    data = load_task_data(
        args.data, spec, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, limit=args.limit, augment=args.augment,
        strict=args.strict,
    )  # fmt: skip
    if is_main():
        print(
            f"{task}: {data.num_classes} classes, {len(data.train)} train / {len(data.val)} "
            f"val / {len(data.test)} test images at {spec.size} px ({args.method}) -> {out}",
            flush=True,
        )
        warn_small_data(data)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "settings.yaml", yaml.safe_dump(settings, sort_keys=True).encode())
    with warnings.catch_warnings():  # a degenerate task is reported after the result
        warnings.simplefilter("ignore", DegenerateTaskWarning)
        result = fit(
            model, task, data, config, out, train_bn=args.train_bn, resume=resume,
            keep_checkpoint=args.keep_checkpoint, metadata=metadata,
        )  # fmt: skip
    if is_main():
        print(
            f"{task} ({args.method}): best epoch {result.best_epoch}, val top-1 "
            f"{result.val['top1']:.4f}, test top-1 {result.test['top1']:.4f} -> "
            f"{result.task_file}"
        )
        for problem in result.warnings:
            print(f"warning: {problem}", file=sys.stderr)


def default_out(task: str, method: str, root: Path = Path("runs")) -> Path:
    """A run's folder when --out is not given: ROOT/TASK for piggyback, ROOT/TASK-METHOD
    for a baseline, so that a baseline never lands on the task it is compared with."""
    return root / (task if method == "piggyback" else f"{task}-{method}")


def check_run_folder(out: Path, task: str, *, resume: bool, force: bool) -> None:
    """Refuse to start over in a folder holding another run's results or checkpoint,
    unless `force` (the user's say: they are deleted) or `resume` (a checkpoint goes on)."""
    from .checkpoint import checkpoint_progress, has_checkpoint, remove_checkpoint
    from .distributed import is_main
    from .train import METHODS, RESULT, model_file_name

    directory = out / "checkpoint"
    files = dict.fromkeys(model_file_name(task, method) for method in METHODS)
    results = [out / name for name in (RESULT, *files)]
    records = [out / name for name in ("settings.yaml", "metrics.jsonl")]
    if force:
        if is_main():
            remove_checkpoint(directory)
            for path in results + records:
                path.unlink(missing_ok=True)
        return
    if resume:
        return
    if has_checkpoint(directory):
        try:
            done = f" after epoch {checkpoint_progress(directory)['epoch']}"
        except TaskFileError:
            done = ""
        raise ConfigError(
            f"{out} holds the checkpoint of an unfinished run{done}: add --resume to go on "
            "from it, or --force to start over (its checkpoint is deleted), or train into "
            "another --out"
        )
    present = [path.name for path in results if path.is_file()]
    kind = "a finished run" if present else "another run's records"
    present = present or [path.name for path in records if path.is_file()]
    if present:
        raise ConfigError(
            f"{out} holds {kind} ({', '.join(present)}): train into another --out, or pass "
            "--force to replace it"
        )


def absolute_data(data: str) -> str:
    """`--data` as a task file records it: a local path made absolute, so that eval finds
    it from any folder; built-in names, and paths not found here, stay as given."""
    from .data import source_path

    prefix, local = source_path(data)
    return f"{prefix}{local.resolve()}" if local is not None and local.exists() else str(data)


def warn_small_data(data: Any) -> None:
    """Warn when the splits are too small to learn or measure anything: a run that then
    ends at chance is about the data, not a collapsing network."""
    from .train import MIN_IMAGES_PER_CLASS

    per_class = len(data.train) / max(data.num_classes, 1)
    empty = [name for name in ("val", "test") if len(getattr(data, name)) < 2]
    if per_class >= MIN_IMAGES_PER_CLASS and not empty:
        return
    warnings.warn(
        f"{len(data.train)} training images for {data.num_classes} classes "
        f"({per_class:.1f} per class), {len(data.val)} to validate and {len(data.test)} to "
        f"test: too few to learn the task or to measure it; add images (at least "
        f"{MIN_IMAGES_PER_CLASS} per class) or lower --val-fraction/--test-fraction",
        stacklevel=2,
    )


def _finished(out: Path, settings: dict[str, Any]) -> bool:
    """Whether the run in `out` completed (no checkpoint left, and its result names a task
    file that exists): `--resume` then skips it, saying so, as train-many needs."""
    from .checkpoint import has_checkpoint
    from .distributed import is_main
    from .train import RESULT

    result = out / RESULT
    if has_checkpoint(out / "checkpoint") or not result.is_file():
        return False
    try:
        task_file = Path(json.loads(result.read_text())["task_file"])
    except (ValueError, KeyError, TypeError):
        return False
    if not task_file.is_file():
        return False
    _check_same_task(out / "settings.yaml", settings)
    if is_main():
        print(
            f"{settings['task']}: already complete ({task_file}); --resume skips it. To "
            "train it for more epochs, run it again with --force (it starts over) and "
            "--keep-checkpoint, whose checkpoint a later --resume with more --epochs goes on from"
        )
    return True


def _resume_point(out: Path, settings: dict[str, Any], epochs: int) -> bool:
    """Whether `--resume` has a checkpoint in `out` to go on from, said in one line
    either way; a checkpoint of another task (see TASK_KEYS) is refused."""
    from .checkpoint import checkpoint_progress, has_checkpoint
    from .distributed import is_main

    directory = out / "checkpoint"
    if not has_checkpoint(directory):
        if is_main():
            warnings.warn(
                f"--resume: nothing to resume in {directory} (no epoch was completed, or the "
                "run finished and removed its checkpoint; --keep-checkpoint keeps it); "
                "training from epoch 1",
                stacklevel=2,
            )
        return False
    _check_same_task(out / "settings.yaml", settings)
    done = checkpoint_progress(directory)
    if is_main():
        print(
            f"resuming {settings['task']} from {directory}: {done['epoch']} of {epochs} epochs "
            f"done, best so far epoch {done['best_epoch']} (val top-1 {done['best_top1']:.4f})"
        )
    return True


def _check_same_task(path: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume when `settings` define another task than the run's settings.yaml."""
    if not path.is_file():
        return  # a run `fit` made without the command line: nothing recorded to compare
    recorded = yaml.safe_load(path.read_text())
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path} holds no mapping of settings; delete it to resume anyway")
    changed = [
        key
        for key in TASK_KEYS
        if key in recorded and _comparable(key, recorded[key]) != _comparable(key, settings[key])
    ]
    if changed:
        differences = ", ".join(
            f"--{key.replace('_', '-')} {settings[key]} (the run used {recorded[key]})"
            for key in changed
        )
        raise ConfigError(
            f"--resume would continue the run in {path.parent} as another task: "
            f"{differences}. Resume with the run's settings (in {path}), or train into "
            "another --out"
        )


def _comparable(key: str, value: Any) -> Any:
    """A setting as `--resume` compares it: data paths recorded relative (by older
    versions) or absolute name the same data."""
    return absolute_data(value) if key == "data" and isinstance(value, str) else value


def task_name(data: str) -> str:
    stem = Path(str(data).rstrip("/")).stem or "task"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem.split(":")[-1])
    return cleaned or "task"


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
