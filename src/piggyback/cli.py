"""The `piggyback` command: train, train-many, eval, predict, inspect, export, demo, serve.

Every bad argument ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, DegenerateTaskWarning, PiggybackError
from .recipes import RECIPES
from .recipes import recipe as get_recipe

if TYPE_CHECKING:
    from .model import PiggybackModel
    from .train import TrainConfig

EXIT_USAGE = 2

# Flags that `train` reads from a YAML config file (the file's keys use the same names).
TRAIN_KEYS = (
    "backbone", "weights", "pretrained", "data", "task", "out", "size", "limit", "augment",
    "strict", "val_fraction", "test_fraction", "method", "epochs", "batch_size", "lr", "head_lr",
    "lr_decay", "lr_decay_every", "weight_decay", "optimizer", "seed", "device", "num_workers",
    "threshold", "threshold_fn", "init", "init_scale", "train_bn", "resume", "amp", "sync_bn",
    "recipe", "allow_random_backbone",
)  # fmt: skip
# `train-many` settings that hold for the whole run, so only at the top of its file.
SHARED_KEYS = (
    "backbone", "weights", "pretrained", "allow_random_backbone", "threshold", "threshold_fn",
    "init", "init_scale", "device", "out",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "config", None):
            # Settings from YAML become the defaults, so flags on the command line win.
            args = build_parser(train_defaults=read_config_file(args.config)).parse_args(argv)
        return int(args.handler(args) or 0)
    except (PiggybackError, FileNotFoundError, yaml.YAMLError) as exc:
        print(f"piggyback {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="piggyback", description="Add tasks to a frozen backbone by learning binary masks."
    )
    parser.add_argument("--version", action="version", version=f"piggyback {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="learn a task (mask + head) on a dataset")
    train.add_argument("--config", type=Path, help="YAML file of settings; flags override it")
    _add_backbone_flags(train)
    group = train.add_argument_group("data")
    group.add_argument("--data", help="fashion_mnist | animals | digits | FOLDER | FILE.csv | ...")
    group.add_argument("--task", help="task name (default: derived from --data)")
    group.add_argument("--size", type=int, help="input resolution (default: the backbone's)")
    group.add_argument("--limit", type=int, help="at most this many training images")
    group.add_argument("--augment", action="store_true", help="light training augmentation")
    group.add_argument("--strict", action="store_true", help="fail on unreadable images")
    group.add_argument("--val-fraction", type=float, default=0.1)
    group.add_argument("--test-fraction", type=float, default=0.1)
    group = train.add_argument_group("training")
    group.add_argument(
        "--method", default="piggyback", choices=("piggyback", "classifier", "finetune")
    )
    group.add_argument(
        "--recipe",
        default="default",
        choices=list(RECIPES),
        help="defaults for --lr, --head-lr and --train-bn: "
        + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()),
    )
    group.add_argument("--epochs", type=int, default=30)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument("--lr", type=float, help="scores (or all weights: finetune); see --recipe")
    group.add_argument("--head-lr", type=float, help="the new head (and norms); see --recipe")
    group.add_argument("--lr-decay", type=float, default=0.1)
    group.add_argument("--lr-decay-every", type=int, default=15)
    group.add_argument(
        "--weight-decay", type=float, default=0.0, help="head and norms only; never the scores"
    )
    group.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.add_argument("--num-workers", type=int, default=0)
    group = train.add_argument_group("masks")
    group.add_argument("--threshold", type=float, default=5e-3)
    group.add_argument("--threshold-fn", default="binarizer", choices=("binarizer", "ternarizer"))
    group.add_argument("--init", default="1s", choices=("1s", "uniform", "weight_based"))
    group.add_argument("--init-scale", type=float, default=1e-2)
    group.add_argument(
        "--train-bn",
        action=argparse.BooleanOptionalAction,
        help="per-task norm layers (default: the recipe's; --no-train-bn freezes them)",
    )
    group = train.add_argument_group("scaling out (torchrun; see docs/scaling.md)")
    group.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16: CUDA)")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm with --train-bn")
    group = train.add_argument_group("output")
    group.add_argument("--out", type=Path, help="output folder (default: runs/TASK)")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint; with none yet (killed in epoch 1) start over; "
        "a damaged one is an error",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train, **(train_defaults or {}))

    many = commands.add_parser("train-many", help="learn several tasks in turn on one backbone")
    many.add_argument(
        "tasks_file", type=Path, metavar="TASKS.yaml", help="shared settings and a tasks: list"
    )
    many.add_argument("--out", type=Path, help="task T goes to OUT/T (default: runs)")
    group = many.add_argument_group("overriding the file for every task")
    group.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    group.add_argument("--amp", choices=("bf16", "fp16"))
    group.add_argument("--sync-bn", action="store_true")
    group.add_argument("--num-workers", type=int)
    group.add_argument("--resume", action="store_true", help="continue each from OUT/T/checkpoint")
    group.add_argument("--no-progress", action="store_true")
    many.set_defaults(handler=_train_many)

    evaluate = commands.add_parser("eval", help="accuracy of a task file on a dataset split")
    evaluate.add_argument("task_file", type=Path)
    evaluate.add_argument("--data", help="dataset (default: the one it was trained on)")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_open_flags(evaluate)
    evaluate.set_defaults(handler=_eval)

    predict = commands.add_parser("predict", help="labels for images with a task file")
    predict.add_argument("task_file", type=Path)
    predict.add_argument("images", nargs="+", type=Path, help="image files or folders")
    predict.add_argument("--topk", type=int, default=3)
    predict.add_argument("--json", action="store_true")
    _add_open_flags(predict)
    predict.set_defaults(handler=_predict)

    inspect = commands.add_parser("inspect", help="what a task file holds")
    inspect.add_argument("task_file", type=Path)
    inspect.add_argument("--plot", type=Path, help="write a PNG of the kept fraction per layer")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(handler=_inspect)

    export = commands.add_parser("export", help="bake a task into a plain model file")
    export.add_argument("task_file", type=Path)
    export.add_argument("--out", type=Path, required=True, help="FILE.safetensors (state_dict)")
    export.add_argument("--onnx", type=Path, help="also write an ONNX file")
    _add_open_flags(export)
    export.set_defaults(handler=_export)

    demo = commands.add_parser("demo", help="the embedded end-to-end demo (CPU, minutes)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--full", action="store_true", help="also full fine-tuning (slower)")
    demo.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    demo.add_argument("--tasks", nargs="+", help="subset of fashion_mnist animals digits")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_demo)

    serve = commands.add_parser("serve", help="serve a folder of task files over HTTP")
    serve.add_argument("--tasks", type=Path, required=True, help="folder of task files")
    serve.add_argument("--backbone", help="default: what the task files record")
    serve.add_argument("--weights", type=Path, help="local state_dict file for the backbone")
    serve.add_argument("--size", type=int, help="input size (default: each task's own)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    group = serve.add_argument_group("access (uploads and deletions are off without a token)")
    group.add_argument("--admin-token", help="allows task upload/delete with this bearer token")
    group.add_argument(
        "--allow-unauthenticated-writes",
        action="store_true",
        help="let anyone upload and delete tasks (no admin token)",
    )
    group.add_argument("--read-token", help="guards /predict and GET /tasks too")
    group = serve.add_argument_group("limits and batching (defaults: piggyback.serve.ServeConfig)")
    group.add_argument("--max-upload-mb", type=float, help="largest request body")
    group.add_argument("--max-input-size", type=int, help="largest input size (px) a task may ask")
    group.add_argument("--max-request-pixels", type=int, help="decoded pixels per request")
    group.add_argument("--header-timeout", type=float, help="seconds to send a request head")
    group.add_argument("--body-timeout", type=float, help="seconds to send a request body")
    group.add_argument("--batch-window-ms", type=float, help="wait this long to fill a batch")
    group.add_argument("--max-batch", type=int, help="images per batch and per request")
    group.add_argument("--cache-size", type=int, help="tasks kept baked (0: none)")
    serve.set_defaults(handler=_serve)
    return parser


def _add_backbone_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--backbone", help="embedded efficientnet_lite0 (default), torchvision or timm name"
    )
    group.add_argument("--weights", type=Path, help="local state_dict file for the backbone")
    group.add_argument("--pretrained", action="store_true", help="download pretrained weights")
    group.add_argument(
        "--allow-random-backbone",
        action="store_true",
        help="train on randomly initialised weights (no --pretrained or --weights) anyway: "
        "the task file then loads only onto a backbone rebuilt with the same --seed",
    )


def _add_open_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone (default: what the task file records)")
    group.add_argument("--backbone")
    group.add_argument("--weights", type=Path)
    group.add_argument("--size", type=int)
    group.add_argument("--device", default="auto")


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


def _train(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .train import resolve_device

    config = _train_config(args)
    with process_group(resolve_device(args.device)):
        _train_task(_build_model(args), args, config)
    return 0


def _train_many(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .train import resolve_device

    runs = _task_runs(args)
    configs = [_train_config(run) for run in runs]  # a bad setting fails before any training
    with process_group(resolve_device(runs[0].device)):
        model = _build_model(runs[0])
        for run, config in zip(runs, configs, strict=True):
            _train_task(model, run, config)
    return 0


def _task_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One `train` namespace per task of a `train-many` file: train's defaults, then the
    file's shared settings, the task's own, and the command's flags."""
    shared, entries = read_tasks_file(args.tasks_file)
    root = Path(args.out or shared.pop("out", "runs"))
    flags = {
        key: getattr(args, key)
        for key in ("device", "amp", "sync_bn", "num_workers", "resume", "no_progress")
        if getattr(args, key) not in (None, False)
    }
    runs: list[argparse.Namespace] = []
    for number, entry in enumerate(entries, 1):
        run = build_parser(train_defaults={**shared, **entry, **flags}).parse_args(["train"])
        if not run.data:
            raise ConfigError(f"{args.tasks_file}: task {number} has no data: setting")
        run.task = run.task or _task_name(run.data)
        if run.task in {r.task for r in runs}:
            raise ConfigError(
                f"{args.tasks_file}: two tasks are named {run.task!r}; name one with task:"
            )
        run.out = root / run.task
        runs.append(run)
    return runs


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from .train import TrainConfig

    if not args.data:
        raise ConfigError("no dataset: pass --data (e.g. --data digits) or set data: in --config")
    _apply_recipe(args)
    return TrainConfig(
        method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        head_lr=args.head_lr, lr_decay=args.lr_decay, lr_decay_every=args.lr_decay_every,
        weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed,
        device=args.device, num_workers=args.num_workers, progress=not args.no_progress,
        amp=args.amp, sync_bn=args.sync_bn,
    )  # fmt: skip


def _apply_recipe(args: argparse.Namespace) -> None:
    """Fill the settings the command line and config left open from the named recipe."""
    recipe = get_recipe(args.recipe)
    for key in ("lr", "head_lr", "train_bn"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(recipe, key))


def _build_model(args: argparse.Namespace) -> PiggybackModel:
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


def _train_task(model: PiggybackModel, args: argparse.Namespace, config: TrainConfig) -> None:
    """Load one task's data and `fit` it; rank 0 alone writes settings and prints."""
    from .backbones import DEFAULT_BACKBONE, input_spec
    from .data import load_task_data
    from .distributed import is_main
    from .train import fit

    backbone_name = args.backbone or DEFAULT_BACKBONE
    task = args.task or _task_name(args.data)
    out = args.out or Path("runs") / task
    spec = input_spec(model.backbone, size=args.size)
    with _plain_warnings():
        data = load_task_data(
            args.data, spec, seed=args.seed, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, limit=args.limit, augment=args.augment,
            strict=args.strict,
        )  # fmt: skip
    settings = {key: _plain(getattr(args, key)) for key in TRAIN_KEYS}
    settings.update(backbone=backbone_name, task=task, out=str(out), size=spec.size)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "settings.yaml").write_text(yaml.safe_dump(settings, sort_keys=True))
    metadata = {
        "backbone": backbone_name,
        "weights": str(args.weights) if args.weights else None,
        "size": spec.size,
        "data": str(args.data),
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "limit": args.limit,
    }
    with _plain_warnings():
        result = fit(
            model, task, data, config, out, train_bn=args.train_bn, resume=args.resume,
            metadata=metadata,
        )  # fmt: skip
    if is_main():
        print(
            f"{task} ({args.method}): best epoch {result.best_epoch}, val top-1 "
            f"{result.val['top1']:.4f}, test top-1 {result.test['top1']:.4f} -> "
            f"{result.task_file}"
        )
        for problem in result.warnings:
            print(f"warning: {problem}", file=sys.stderr)


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """The library's warnings as one `warning: ...` line each on stderr, like the errors;
    a degenerate task is left out here and reported after the result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateTaskWarning)
        warnings.showwarning = _print_warning
        yield


def _print_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _eval(args: argparse.Namespace) -> int:
    from .data import load_task_data, make_loader
    from .pipeline import open_task, task_source
    from .train import evaluate, resolve_device

    source = task_source(args.task_file)
    model, task, spec = open_task(
        args.task_file, backbone=args.backbone, weights=args.weights, size=args.size
    )
    data_name = args.data or source.get("data")
    if not data_name:
        raise ConfigError(f"{args.task_file} records no dataset; pass --data")
    with _plain_warnings():
        data = load_task_data(
            data_name, spec, seed=source.get("seed", 0), limit=source.get("limit"),
            val_fraction=source.get("val_fraction", 0.1),
            test_fraction=source.get("test_fraction", 0.1),
        )  # fmt: skip
    info = model.task_info[task]
    if data.num_classes != info.num_classes:
        raise ConfigError(
            f"task {task!r} has {info.num_classes} classes but {data_name!r} has "
            f"{data.num_classes}: evaluate it on the dataset it was trained for"
        )
    device = resolve_device(args.device)
    model.to(device)
    loader = make_loader(getattr(data, args.split), args.batch_size, shuffle=False)
    metrics = evaluate(model, loader, device, info.num_classes, progress=False)
    if args.json:
        print(json.dumps({"task": task, "split": args.split, **metrics}, indent=2))
        return 0
    print(f"task {task} on {data_name} [{args.split}, {metrics['samples']} images]")
    print(f"top-1 {metrics['top1']:.4f}   top-5 {metrics['top5']:.4f}   loss {metrics['loss']:.4f}")
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    for name, accuracy in zip(names, metrics["per_class"], strict=True):
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        print(f"  {name:<24} {shown}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .data import IMAGE_EXTENSIONS
    from .pipeline import open_task, predict, read_image
    from .train import resolve_device

    paths: list[Path] = []
    for path in args.images:
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(path)
    if not paths:
        raise ConfigError(f"no images found in {[str(p) for p in args.images]}")
    images = [read_image(p) for p in paths]
    model, _, spec = open_task(
        args.task_file, backbone=args.backbone, weights=args.weights, size=args.size
    )
    model.to(resolve_device(args.device))
    results = predict(model, images, spec, topk=args.topk)
    if args.json:
        print(
            json.dumps(
                [{"image": str(p), **r.to_dict()} for p, r in zip(paths, results, strict=True)],
                indent=2,
            )
        )
        return 0
    for path, result in zip(paths, results, strict=True):
        ranked = ", ".join(
            f"{label} {p:.3f}" for label, p in zip(result.labels, result.probabilities, strict=True)
        )
        print(f"{path}: {ranked}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .report import describe_task_file, plot_layer_kept

    report = describe_task_file(args.task_file)
    if args.plot:
        plot_layer_kept(report, args.plot)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mask = report["mask"]
    backbone = report["backbone"]
    print(f"task {report['task']}: {report['num_classes']} classes, ", end="")
    print(f"file {report['file_bytes']:,} bytes")
    print(f"backbone {backbone['class']} fingerprint {backbone['fingerprint'][:16]}")
    print(
        f"mask: {mask['kind']}, {mask['numel']:,} weights, kept {mask['kept']:.4f}, "
        f"{mask['bits_per_weight']:.4f} bits/weight stored ({mask['codec']}), "
        f"entropy floor {mask['entropy_bits_per_weight']:.4f}"
    )
    for layer in report["layers"]:
        print(f"  {layer['name']:<48} {layer['numel']:>10,}  kept {layer['kept']:.4f}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_task

    written = export_task(
        args.task_file, args.out, onnx_path=args.onnx, backbone=args.backbone,
        weights=args.weights, size=args.size,
    )  # fmt: skip
    for path in written:
        print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        args.out, full=args.full, quick=args.quick, tasks=args.tasks, progress=not args.no_progress
    )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve import ServeConfig, build_model, create_app, run
    except ImportError as exc:
        raise ConfigError(
            f"`piggyback serve` needs {exc.name}: pip install fastapi uvicorn python-multipart"
        ) from exc

    flags = {
        "max_upload_mb": args.max_upload_mb,
        "max_input_size": args.max_input_size,
        "max_request_pixels": args.max_request_pixels,
        "header_timeout_s": args.header_timeout,
        "body_timeout_s": args.body_timeout,
        "batch_window_ms": args.batch_window_ms,
        "max_batch": args.max_batch,
        "cache_size": args.cache_size,
    }
    config = ServeConfig(
        admin_token=args.admin_token or os.environ.get("PIGGYBACK_ADMIN_TOKEN"),
        read_token=args.read_token or os.environ.get("PIGGYBACK_READ_TOKEN"),
        allow_unauthenticated_writes=args.allow_unauthenticated_writes,
        **{key: value for key, value in flags.items() if value is not None},
    )
    from .train import resolve_device

    device = resolve_device(args.device)  # validates before the backbone loads
    model, spec = build_model(args.tasks, backbone=args.backbone, weights=args.weights)
    model.to(device)
    app = create_app(model, spec, args.tasks, config, size=args.size)
    print(config.access, flush=True)
    if config.allow_unauthenticated_writes and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: anyone reaching {args.host} may add or delete tasks; set --admin-token")
    run(app, host=args.host, port=args.port)
    return 0


def _task_name(data: str) -> str:
    stem = Path(str(data).rstrip("/")).stem or "task"
    cleaned = "".join(c if c.isalnum() or c in "_-" else "_" for c in stem.split(":")[-1])
    return cleaned or "task"


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


if __name__ == "__main__":
    sys.exit(main())
