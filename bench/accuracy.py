"""Test accuracy of piggyback against its baselines: the paper's main table, offline.

Every method learns every task on the same backbone, resolution, epochs, data
split and seed: classifier-only (a new head on frozen features), piggyback with
the binarizer, with the ternarizer, with per-task BatchNorm, and full
fine-tuning (a whole network per task). As a control, piggyback and the
classifier also run on a randomly initialised backbone (masks of random weights).

    python bench/accuracy.py                                 # the three offline tasks
    python bench/accuracy.py --tasks animals path/to/imagefolder --epochs 8 --size 96
    python bench/accuracy.py --quick                         # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from _common import markdown_table, write_results
from torch import nn

from piggyback import MaskConfig, PiggybackModel
from piggyback.backbones import DEFAULT_BACKBONE, create_backbone, input_spec
from piggyback.data import BUILTIN_TASKS, TaskData, load_task_data
from piggyback.train import TrainConfig, fit


@dataclass(frozen=True)
class Variant:
    """One column of the table: a training method and its mask settings."""

    method: str
    mask: dict[str, Any] = field(default_factory=dict)
    random_backbone: bool = False


VARIANTS: dict[str, Variant] = {
    "classifier": Variant("classifier"),
    "piggyback": Variant("piggyback"),
    "piggyback-ternary": Variant("piggyback", {"threshold_fn": "ternarizer"}),
    "piggyback-bn": Variant("piggyback", {"train_bn": True}),
    "finetune": Variant("finetune"),
    "random-classifier": Variant("classifier", random_backbone=True),
    "random-piggyback": Variant("piggyback", random_backbone=True),
}


def backbone_for(variant: Variant) -> nn.Module:
    """A fresh backbone per run: wrapping one changes its modules in place."""
    if variant.random_backbone:  # the embedded architecture, randomly initialised
        return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    return create_backbone(DEFAULT_BACKBONE)


def run(
    task: str, source: str, data: TaskData, name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Train `name` on the task read from `source` (a built-in name, folder or CSV)."""
    variant = VARIANTS[name]
    config = MaskConfig(**variant.mask)
    train = TrainConfig(
        method=variant.method,  # type: ignore[arg-type]
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.finetune_lr if variant.method == "finetune" else args.lr,
        head_lr=args.head_lr,
        lr_decay_every=max(1, args.epochs * 3 // 4),
        seed=args.seed,
        progress=not args.no_progress,
    )
    model = PiggybackModel(backbone_for(variant), config)
    started = time.perf_counter()
    out = Path(args.work) / name / task
    # What `piggyback eval/predict` read back: the input size, the data, the backbone
    # (none for a random one, which no name recreates).
    metadata = {"size": args.size, "data": source, "seed": args.seed, "limit": args.limit}
    if not variant.random_backbone:
        metadata["backbone"] = DEFAULT_BACKBONE
    result = fit(model, task, data, train, out, train_bn=config.train_bn, metadata=metadata)
    row = {"task": task, "method": name, "test_top1": 100 * result.test["top1"],
           "best_epoch": result.best_epoch}  # fmt: skip
    row["seconds"] = round(time.perf_counter() - started)
    if result.task_file is not None:
        row["task_bytes"] = result.task_file.stat().st_size
    if variant.method != "finetune":
        row["kept"] = model.mask_stats(task).kept
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS),
                        help="built-in task names, ImageFolder folders or CSV files")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=2000, help="training images per task")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4, help="scores (piggyback)")
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/bench/accuracy", help="task files and logs")
    parser.add_argument("--out", default="bench/results/accuracy.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.size, args.limit, args.epochs = ["digits"], 32, 64, 1
    spec = input_spec(create_backbone(DEFAULT_BACKBONE), size=args.size)
    rows = []
    for task in args.tasks:
        data = load_task_data(task, spec, seed=args.seed, limit=args.limit)
        name = Path(task).name
        for method in args.methods:
            rows.append(run(name, task, data, method, args))
            print(markdown_table(rows[-1:], list(rows[-1])), flush=True)
    means = [{"task": "mean", "method": m,
              "test_top1": statistics.mean(r["test_top1"] for r in rows if r["method"] == m)}
             for m in args.methods]  # fmt: skip
    columns = ["task", "method", "test_top1", "kept", "task_bytes", "best_epoch", "seconds"]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "no_progress")}
    print(f"\nsettings: {settings}\n\n{markdown_table(rows + means, columns)}")
    print(f"\nwrote {write_results(args.out, {'settings': settings, 'results': rows + means})}")


if __name__ == "__main__":
    main()
