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

from .errors import ConfigError, DegenerateTaskWarning
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
    "amp", "sync_bn", "recipe", "allow_random_backbone",
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
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return loaded


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
    _apply_recipe(args)
    return TrainConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_lr=args.head_lr, lr_decay=args.lr_decay, lr_decay_every=args.lr_decay_every,
        weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed,
        device=args.device, num_workers=args.num_workers, progress=show_progress(args.progress),
        amp=args.amp, sync_bn=args.sync_bn,
    )  # fmt: skip


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
        "a backbone rebuilt with the same --seed and torch/timm versions (eval, predict and "
        "serve do not); pass --pretrained, --weights FILE, or --allow-random-backbone "
        "(allow_random_backbone: true in a config file) to train on it anyway"
    )


def train_task(model: PiggybackModel, args: argparse.Namespace, config: TrainConfig) -> None:
    """Load one task's data and `fit` it; rank 0 alone writes settings and prints."""
    from .backbones import DEFAULT_BACKBONE, input_spec
    from .data import load_task_data
    from .distributed import is_main
    from .taskmeta import SPEC_KEY, spec_record
    from .train import fit

    task = args.task or task_name(args.data)
    out = args.out or Path("runs") / task
    spec = input_spec(model.backbone, size=args.size)
    settings = {key: _plain(getattr(args, key)) for key in TRAIN_KEYS}
    settings.update(
        backbone=args.backbone or DEFAULT_BACKBONE, task=task, out=str(out), size=spec.size
    )
    if args.resume and _finished(out, settings):
        return
    resume = args.resume and _resume_point(out, settings, config.epochs)
    data = load_task_data(
        args.data, spec, seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, limit=args.limit, augment=args.augment,
        strict=args.strict,
    )  # fmt: skip
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=True))
    metadata = {key: settings[key] for key in ("backbone", "weights", "size", "seed", "limit")}
    metadata.update(
        data=str(args.data), val_fraction=args.val_fraction, test_fraction=args.test_fraction
    )
    metadata[SPEC_KEY] = spec_record(spec)  # what predict, eval and exports prepare images with
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
        print(f"{settings['task']}: already complete ({task_file}); --resume skips it")
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
    changed = [key for key in TASK_KEYS if key in recorded and recorded[key] != settings[key]]
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


def task_name(data: str) -> str:
    stem = Path(str(data).rstrip("/")).stem or "task"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem.split(":")[-1])
    return cleaned or "task"


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value
