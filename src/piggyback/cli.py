"""The `piggyback` command: train, train-many, eval, predict, inspect, export, demo, serve.

Every bad argument ends in one line on stderr and exit code 2, never a traceback; every
warning is one `warning: ...` line. Verbs parse their flags and call the library
(`piggyback.trainrun` for training).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from . import verbs
from .errors import ConfigError, PiggybackError
from .precision import AMP_DTYPES, check_amp
from .recipes import RECIPES
from .trainrun import default_out, read_config_file, read_tasks_file, task_name
from .workers import workers

EXIT_USAGE = 2
HELP_WIDTH = 78  # columns of a description in --help, as argparse wraps flags' help
# `train-many` flags that override the tasks file for every task.
MANY_OVERRIDES = (
    "device", "amp", "sync_bn", "num_workers", "resume", "keep_checkpoint", "force", "progress",
)  # fmt: skip

# `serve` flags that set a ServeConfig field of the same default: (flag, field, help).
SERVE_LIMITS = (
    ("--max-upload-mb", "max_upload_mb", "largest request body"),
    ("--max-input-size", "max_input_size", "largest input size (px) a task may ask"),
    ("--max-request-pixels", "max_request_pixels", "decoded pixels per request"),
    ("--header-timeout", "header_timeout_s", "seconds a client may take to send a request head"),
    ("--body-timeout", "body_timeout_s", "seconds a client may take to send a request body"),
    ("--batch-window-ms", "batch_window_ms", "how long a request waits to share its batch"),
    ("--max-batch", "max_batch", "images per batch and per request"),
    ("--cache-size", "cache_size", "tasks kept baked (0: none)"),
    (
        "--images-per-thread",
        "images_per_thread",
        "CPU: one thread per this many images of a task (0: all threads)",
    ),
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        with _plain_warnings():
            if getattr(args, "config", None):
                # Settings from YAML become the defaults, so flags on the command line win.
                args = build_parser(train_defaults=read_config_file(args.config)).parse_args(argv)
            return int(args.handler(args) or 0)
    except (PiggybackError, FileNotFoundError, yaml.YAMLError) as exc:
        print(f"piggyback {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _resume_hint(args: argparse.Namespace) -> str:
    """How to go on after Ctrl-C, for the verbs that train."""
    if args.command not in ("train", "train-many"):
        return ""
    return (
        ": the same command with --resume goes on from the last completed epoch (each run "
        "folder's checkpoint/)"
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help where there is one to show (not for switches
    that are off or settings that are open); descriptions and examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_amp_flag(group: Any) -> None:
    group.add_argument("--amp", choices=tuple(AMP_DTYPES), help="mixed precision (fp16: CUDA)")


def _verb(
    commands: Any, name: str, summary: str, examples: Sequence[str], details: str = ""
) -> argparse.ArgumentParser:
    """A sub-command whose --help says what it does, each flag's default, and examples."""
    description = f"{summary[0].upper()}{summary[1:]}. {details}".strip()
    return commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, width=HELP_WIDTH),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=HelpFormatter,
    )


def build_parser(train_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="piggyback",
        description="Add tasks to a frozen backbone by learning binary masks.",
        epilog="`piggyback COMMAND --help` shows a command's flags, defaults and examples.",
    )
    parser.add_argument("--version", action="version", version=f"piggyback {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _verb(
        commands,
        "train",
        "learn a task (a mask over the frozen backbone, and a head) on a dataset",
        [
            "piggyback train --data digits --size 64 --epochs 10",
            "piggyback train --backbone resnet50 --pretrained --data photos/ --out runs/photos",
            "piggyback train --config task.yaml --lr 1e-3    # flags override the file",
            "piggyback train --data digits --size 64 --resume  # go on after an interruption",
        ],
        "Writes TASK.safetensors (TASK.finetuned.safetensors with --method finetune), "
        "metrics.jsonl (one line per epoch), result.json and settings.yaml into --out, "
        "and refuses a folder holding another run's results or checkpoint unless given "
        "--resume or --force.",
    )
    train.add_argument(
        "--config", type=Path, metavar="FILE",
        help="YAML file of settings named like the flags (e.g. epochs: 10); flags win over it",
    )  # fmt: skip
    _add_backbone_flags(train)
    group = train.add_argument_group("data")
    group.add_argument(
        "--data",
        help="what to learn: fashion_mnist, animals or digits (built in, offline), a folder "
        "of class folders, a CSV of path,label rows, torchvision:NAME:ROOT or hf:PATH",
    )
    group.add_argument("--task", help="the task's name, also its file's (default: from --data)")
    group.add_argument(
        "--size", type=int, metavar="PIXELS",
        help="input size: each image's shorter side is resized to PIXELS / crop_pct (the "
        "backbone's, 1.0 as trained), then the centre PIXELS x PIXELS is cropped (default: the "
        "backbone's own size, 224 for the embedded one; at most 2,048)",
    )  # fmt: skip
    group.add_argument(
        "--limit", type=int, metavar="N",
        help="at most N training images and N/4 each for validation and test, for a quick "
        "run (default: all)",
    )  # fmt: skip
    group.add_argument(
        "--augment", action="store_true", help="train on random crops of 80-100%% of each image"
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip each with a warning)",
    )
    group.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F",
        help="share of the images held out to choose the best epoch, where the data has "
        "no validation split",
    )  # fmt: skip
    group.add_argument(
        "--test-fraction", type=float, default=0.1, metavar="F",
        help="share held out for the final test accuracy, where the data has no test split",
    )  # fmt: skip
    group = train.add_argument_group("training")
    group.add_argument(
        "--method",
        default="piggyback",
        choices=("piggyback", "classifier", "finetune"),
        help="piggyback: learn a mask and a head; the baselines: classifier trains the head "
        "alone, finetune every weight of a copy of the backbone",
    )
    group.add_argument(
        "--recipe",
        default="default",
        choices=list(RECIPES),
        help="defaults for --lr, --head-lr and --train-bn: "
        + "; ".join(f"{name}: {r.summary}" for name, r in RECIPES.items()),
    )
    group.add_argument("--epochs", type=int, default=30, help="passes over the training images")
    group.add_argument(
        "--batch-size", type=int, default=32, help="images per step (all processes' together)"
    )
    group.add_argument(
        "--lr", type=float,
        help="learning rate of the mask scores (of every weight with --method finetune) "
        "(default: the recipe's)",
    )  # fmt: skip
    group.add_argument(
        "--head-lr", type=float,
        help="learning rate of the new head and the task's norm layers (default: the recipe's)",
    )  # fmt: skip
    group.add_argument(
        "--lr-decay", type=float, default=0.1, metavar="FACTOR",
        help="multiply the learning rates by FACTOR every --lr-decay-every epochs",
    )  # fmt: skip
    group.add_argument(
        "--lr-decay-every", type=int, default=15, metavar="EPOCHS", help="see --lr-decay"
    )
    group.add_argument(
        "--weight-decay", type=float, default=0.0,
        help="L2 penalty on the head and norm layers (every weight with finetune), never on "
        "the mask scores",
    )  # fmt: skip
    group.add_argument(
        "--optimizer", default="adam", choices=("adam", "sgd"), help="sgd uses momentum 0.9"
    )
    group.add_argument(
        "--seed", type=int, default=0,
        help="seeds the split, the shuffling and the new head: the same seed, the same run",
    )  # fmt: skip
    group.add_argument(
        "--device", default="auto",
        help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N",
    )  # fmt: skip
    group.add_argument(
        "--num-workers", type=workers, default="auto",
        help="processes that decode images alongside training (0: in the training process; "
        "auto: 0 on the CPU, one per free CPU core up to 8 on a GPU)",
    )  # fmt: skip
    group = train.add_argument_group("masks")
    group.add_argument(
        "--threshold", type=float, default=5e-3,
        help="a weight is kept where its score is above this",
    )  # fmt: skip
    group.add_argument(
        "--threshold-fn",
        default="binarizer",
        choices=("binarizer", "ternarizer"),
        help="binarizer: each weight kept or zeroed; ternarizer: also negated (-1)",
    )
    group.add_argument(
        "--init",
        default="1s",
        choices=("1s", "uniform", "weight_based"),
        help="starting scores: 1s (all --init-scale: every weight kept at first), uniform "
        "(random in +-init-scale) or weight_based (each layer's mean |weight|)",
    )
    group.add_argument("--init-scale", type=float, default=1e-2, help="see --init")
    group.add_argument(
        "--train-bn",
        action=argparse.BooleanOptionalAction,
        help="give the task its own norm layers; --no-train-bn keeps the backbone's "
        "(default: the recipe's)",
    )
    group = train.add_argument_group("scaling out (torchrun; see docs/scaling.md)")
    _add_amp_flag(group)
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm with --train-bn")
    group = train.add_argument_group("output")
    group.add_argument(
        "--out", type=Path, metavar="DIR",
        help="where the run's files go (default: runs/TASK, runs/TASK-METHOD for a baseline)",
    )  # fmt: skip
    _add_run_flags(group)
    train.set_defaults(handler=_train, **(train_defaults or {}))

    many = _verb(
        commands,
        "train-many",
        "learn several tasks in turn on one backbone",
        ["piggyback train-many tasks.yaml --out runs"],
        "TASKS.yaml holds `train` settings shared by every task and a `tasks:` list of "
        "dataset names or mappings of a task's own settings (see docs/scaling.md).",
    )
    many.add_argument(
        "tasks_file", type=Path, metavar="TASKS.yaml", help="shared settings and a tasks: list"
    )
    many.add_argument(
        "--out", type=Path, metavar="DIR",
        help="task T goes to DIR/T, a baseline to DIR/T-METHOD (default: runs)",
    )  # fmt: skip
    group = many.add_argument_group(
        "for every task, overriding the file", argument_default=argparse.SUPPRESS
    )
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    _add_amp_flag(group)
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm with --train-bn")
    group.add_argument("--num-workers", type=workers, help="processes that decode images")
    _add_run_flags(group)
    many.set_defaults(handler=_train_many)

    evaluate = _verb(
        commands,
        "eval",
        "accuracy of a model file on a split of its dataset",
        [
            "piggyback eval runs/digits/digits.safetensors",
            "piggyback eval runs/digits/digits.finetuned.safetensors --split val --json",
        ],
        "Takes task files, fine-tuned models and exports alike, on the split they were "
        "trained with.",
    )
    _add_model_file(evaluate)
    evaluate.add_argument(
        "--data", help="dataset to evaluate on (default: the one it was trained on)"
    )
    evaluate.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test"),
        help="which part of the dataset, split as in training",
    )
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per step")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_open_flags(evaluate)
    evaluate.set_defaults(handler=verbs.eval_command)

    predict = _verb(
        commands,
        "predict",
        "the most probable classes of images, with a model file",
        [
            "piggyback predict runs/digits/digits.safetensors photo.png more_photos/",
            "piggyback predict baked.safetensors photo.png --topk 1 --json",
            "piggyback predict --tasks runs/demo/tasks photo.png   # which task, then classes",
        ],
        "Unreadable images are skipped with a warning each (--strict stops instead). With "
        "--tasks, no MODEL_FILE: every argument is an image, and each image's task is "
        "inferred among the task files given (or refused when it looks like none of them).",
    )
    predict.add_argument(
        "task_file", type=Path, nargs="?", metavar="MODEL_FILE",
        help="a task file, a fine-tuned model (TASK.finetuned.safetensors) or an export",
    )  # fmt: skip
    predict.add_argument("images", nargs="*", type=Path, help="image files or folders of them")
    group = predict.add_argument_group("task inference (piggyback.taskinfer)")
    group.add_argument(
        "--tasks", action="append", type=Path, metavar="PATH",
        help="a task file or a folder of them (repeat for more): infer each image's task "
        "among them",
    )  # fmt: skip
    _add_rule_flags(group, "")
    predict.add_argument(
        "--topk", type=int, default=3, metavar="K",
        help="show the K most probable classes (at most the task's classes)",
    )  # fmt: skip
    predict.add_argument("--batch-size", type=int, default=32, help="images per step")
    predict.add_argument("--strict", action="store_true", help="stop at the first unreadable image")
    predict.add_argument("--json", action="store_true", help="print the predictions as JSON")
    _add_open_flags(predict)
    predict.set_defaults(handler=verbs.predict_command)

    inspect = _verb(
        commands,
        "inspect",
        "what a model file holds",
        [
            "piggyback inspect runs/digits/digits.safetensors --plot digits_layers.png",
            "piggyback inspect baked.safetensors --json",
        ],
        "For a task file: its masks, layer by layer, read without the backbone.",
    )
    _add_model_file(inspect)
    inspect.add_argument(
        "--plot", type=Path, metavar="PNG",
        help="draw, for each masked layer of a task file, the percentage of its weights "
        "that the mask zeroes out",
    )  # fmt: skip
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(handler=verbs.inspect_command)

    export = _verb(
        commands,
        "export",
        "bake a task into a plain model file (and ONNX)",
        [
            "piggyback export runs/digits/digits.safetensors --out digits_baked.safetensors",
            "piggyback export runs/digits/digits.safetensors --out d.safetensors --onnx d.onnx",
        ],
        "Both files record the task's classes and how to prepare its images (input_spec): "
        "the baked file in its header, the ONNX file in its metadata_props.",
    )
    export.add_argument("task_file", type=Path, metavar="TASK_FILE", help="a task file")
    export.add_argument(
        "--out", type=Path, required=True, metavar="FILE",
        help="the baked model (.safetensors state_dict), which eval and predict also take",
    )  # fmt: skip
    export.add_argument(
        "--onnx", type=Path, metavar="FILE",
        help="also write an ONNX model: input 'images' (N, 3, size, size), output 'logits'",
    )  # fmt: skip
    _add_open_flags(export)
    export.set_defaults(handler=verbs.export_command)

    demo = _verb(
        commands,
        "demo",
        "the embedded end-to-end demo (CPU, minutes)",
        ["piggyback demo", "piggyback demo --quick --tasks digits --out /tmp/demo"],
        "Trains fashion_mnist, animals and digits on the embedded backbone with piggyback "
        "and the classifier baseline, and prints their table: OUT/tasks holds the task "
        "files, OUT/baselines/TASK-METHOD the baselines' runs.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("runs/demo"), metavar="DIR", help="where it writes"
    )
    demo.add_argument(
        "--full", action="store_true", help="also the full fine-tuning baseline (slower)"
    )
    demo.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    demo.add_argument(
        "--tasks", nargs="+", metavar="TASK", help="some of: fashion_mnist animals digits"
    )
    _add_progress_flag(demo)
    demo.set_defaults(handler=verbs.demo_command)

    listing = _verb(
        commands,
        "backbones",
        "list the backbone names that train, eval and serve accept",
        ["piggyback backbones", "piggyback backbones resnet"],
        "The embedded default first (pretrained, offline), then torchvision:NAME and "
        "timm:NAME; other names than the embedded one need --pretrained (a network) or "
        "--weights FILE to be trained on.",
    )
    listing.add_argument("pattern", nargs="?", help="only names containing this text")
    listing.set_defaults(handler=verbs.backbones_command)

    from .serve.config import ServeConfig

    limits = ServeConfig()
    serve = _verb(
        commands,
        "serve",
        "serve every task file of a folder over HTTP, on one backbone",
        [
            "piggyback serve --tasks runs/demo/tasks",
            "piggyback serve --tasks tasks/ --admin-token s3cret --host 0.0.0.0 --port 8080",
        ],
        "POST /predict takes images and a task name; GET /tasks and /health say what is "
        "served. Needs `pip install 'piggyback[serve]'`; what the server trusts and its "
        "limits are in docs/security.md.",
    )
    serve.add_argument("--tasks", type=Path, required=True, help="folder of task files")
    serve.add_argument(
        "--backbone", metavar="NAME",
        help="the backbone to serve on (default: the one the task files record)",
    )  # fmt: skip
    serve.add_argument(
        "--weights", type=Path, metavar="FILE", help="local state_dict file for the backbone"
    )
    serve.add_argument(
        "--size", type=int, metavar="PIXELS", help="input size (default: each task's own)"
    )
    serve.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    _add_amp_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    group = serve.add_argument_group("access (uploads and deletions are off without a token)")
    group.add_argument(
        "--admin-token",
        help="allows task upload/delete with this bearer token (or $PIGGYBACK_ADMIN_TOKEN)",
    )
    group.add_argument(
        "--allow-unauthenticated-writes",
        action="store_true",
        help="let anyone upload and delete tasks (no admin token)",
    )
    group.add_argument(
        "--read-token", help="guards /predict and GET /tasks too (or $PIGGYBACK_READ_TOKEN)"
    )
    group = serve.add_argument_group("task inference")
    group.add_argument(
        "--infer-task", action="store_true",
        help="answer a /predict without `task` by inferring each image's task (costs one "
        "forward pass per task served)",
    )  # fmt: skip
    _add_rule_flags(group, "infer-")
    group = serve.add_argument_group("limits and batching")
    for flag, field, text in SERVE_LIMITS:
        default = getattr(limits, field)
        group.add_argument(
            flag, type=type(default), default=default, dest=field, help=text,
            metavar=flag[2:].upper().replace("-", "_"),
        )  # fmt: skip
    serve.set_defaults(handler=_serve)
    return parser


def _add_backbone_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument(
        "--backbone", metavar="NAME",
        help="the frozen network: efficientnet_lite0 (embedded, pretrained; the default), "
        "or a torchvision or timm model name (torchvision:NAME or timm:NAME to choose)",
    )  # fmt: skip
    group.add_argument(
        "--weights", type=Path, metavar="FILE",
        help="the backbone's weights, from a local state_dict (.pt, .pth or .safetensors)",
    )  # fmt: skip
    group.add_argument(
        "--pretrained",
        action="store_true",
        help="download the backbone's pretrained weights (torchvision or timm; needs a network)",
    )
    group.add_argument(
        "--allow-random-backbone",
        action="store_true",
        help="train on randomly initialised weights (no --pretrained or --weights) anyway: "
        "the task file then loads only onto a backbone rebuilt with the same --seed",
    )


def _add_run_flags(group: Any) -> None:
    """What `train` and `train-many` share: resuming, the checkpoint, progress bars."""
    group.add_argument(
        "--resume",
        action="store_true",
        help="go on from the run folder's checkpoint/ after an interruption; the settings "
        "that define the task (data, size, backbone, method, masks) must be the run's",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="start over in a run folder that holds another run's results or checkpoint, "
        "deleting them (without it such a folder is refused)",
    )
    group.add_argument(
        "--keep-checkpoint",
        action="store_true",
        help="keep the run folder's checkpoint/ (the whole training state) when the run "
        "completes, to --resume it with more --epochs later",
    )
    _add_progress_flag(group)


def _add_rule_flags(group: Any, prefix: str) -> None:
    """`--PREFIXrule` and `--PREFIXthreshold`: how task inference scores an image and when
    it refuses one (`piggyback.taskinfer`), for `predict --tasks` and `serve --infer-task`."""
    from .taskinfer import DEFAULT_RULE, DEFAULT_THRESHOLDS, RULES

    group.add_argument(
        f"--{prefix}rule", default=DEFAULT_RULE, choices=RULES,
        help="how a task scores an image: features (how typical its activations are of "
        "the task's validation images), entropy (of its output) or calibrated (that entropy "
        "against the validation images'); train stores what features and calibrated need",
    )  # fmt: skip
    thresholds = ", ".join(f"{value} {rule}" for rule, value in DEFAULT_THRESHOLDS.items())
    group.add_argument(
        f"--{prefix}threshold", type=float,
        help=f"refuse an image whose best score is below this (default: the rule's, {thresholds})",
    )  # fmt: skip


def _add_progress_flag(group: Any) -> None:
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bars (default: only when writing to a terminal, never into a log)",
    )


def _add_model_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task_file", type=Path, metavar="MODEL_FILE",
        help="a task file, a fine-tuned model (TASK.finetuned.safetensors) or an export",
    )  # fmt: skip


def _add_open_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("how to run it (default: as it was trained)")
    group.add_argument(
        "--backbone", metavar="NAME",
        help="load a task file onto this backbone instead of the one it records",
    )  # fmt: skip
    group.add_argument(
        "--weights", type=Path, metavar="FILE",
        help="local state_dict for the backbone a task file records",
    )  # fmt: skip
    group.add_argument(
        "--size", type=int, metavar="PIXELS", help="another input size than it trained at"
    )
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


@contextmanager
def _plain_warnings() -> Iterator[None]:
    """Every warning as one `warning: ...` line on stderr, like the errors."""
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        yield


def _print_warning(message: Warning | str, *_: Any, **__: Any) -> None:
    print(f"warning: {_one_line(message)}", file=sys.stderr)


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _train(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .train import resolve_device
    from .trainrun import build_model, train_config, train_task

    config = train_config(args)
    with process_group(resolve_device(args.device)):
        train_task(build_model(args), args, config)
    return 0


def _train_many(args: argparse.Namespace) -> int:
    from .distributed import process_group
    from .train import resolve_device
    from .trainrun import build_model, train_config, train_task

    runs = _task_runs(args)
    configs = [train_config(run) for run in runs]  # a bad setting fails before any training
    with process_group(resolve_device(runs[0].device)):
        model = build_model(runs[0])
        for run, config in zip(runs, configs, strict=True):
            train_task(model, run, config)
    return 0


def _task_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One `train` namespace per task of a `train-many` file: train's defaults, then the
    file's shared settings, the task's own, and the command's flags."""
    shared, entries = read_tasks_file(args.tasks_file)
    root = Path(args.out or shared.pop("out", "runs"))
    flags = {key: value for key, value in vars(args).items() if key in MANY_OVERRIDES}
    runs: list[argparse.Namespace] = []
    for number, entry in enumerate(entries, 1):
        run = build_parser(train_defaults={**shared, **entry, **flags}).parse_args(["train"])
        if not run.data:
            raise ConfigError(f"{args.tasks_file}: task {number} has no data: setting")
        run.task = run.task or task_name(run.data)
        if run.task in {r.task for r in runs}:
            raise ConfigError(
                f"{args.tasks_file}: two tasks are named {run.task!r}; name one with task:"
            )
        run.out = default_out(run.task, run.method, root)
        runs.append(run)
    return runs


def _serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve import ServeConfig, build_model, create_app, run, startup_lines
    except ImportError as exc:
        raise ConfigError(
            f"`piggyback serve` needs {exc.name}: pip install fastapi uvicorn python-multipart"
        ) from exc

    config = ServeConfig(
        admin_token=args.admin_token or os.environ.get("PIGGYBACK_ADMIN_TOKEN"),
        read_token=args.read_token or os.environ.get("PIGGYBACK_READ_TOKEN"),
        allow_unauthenticated_writes=args.allow_unauthenticated_writes,
        **{field: getattr(args, field) for _, field, _ in SERVE_LIMITS},
        infer_task=args.infer_task,
        infer_rule=args.infer_rule,
        infer_threshold=args.infer_threshold,
        amp=args.amp,
    )
    from .train import resolve_device

    device = resolve_device(args.device)  # validates before the backbone loads
    check_amp(config.amp, device)
    model, spec = build_model(args.tasks, backbone=args.backbone, weights=args.weights)
    model.to(device)
    app = create_app(model, spec, args.tasks, config, size=args.size)
    for line in startup_lines(app, device):
        print(line, flush=True)
    if config.allow_unauthenticated_writes and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: anyone reaching {args.host} may add or delete tasks; set --admin-token")
    run(app, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
