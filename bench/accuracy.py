"""Test accuracy of piggyback against its baselines: the paper's main table, offline.

Every method learns every task on the same backbone, resolution, epochs, data split
and seeds, and gets the same small learning-rate sweep, the setting chosen on
validation for each task and seed: classifier-only (a new head on the plain backbone's
features), piggyback with the default recipe, the paper's exact recipe, the ternarizer,
and full fine-tuning (Adam at each lr, and SGD with momentum at 1e-3 as in the paper).
The baselines get more: lr 3e-3 for both, and 1e-2 for the classifier, since their best
settings sat at the top of the sweep.
Cells are the mean ± std over seeds of the chosen setting's test top-1. The grid table
lists every piggyback lr against the tuned classifier of the same task and seed.
As a control, `--methods random-classifier random-piggyback` run on a randomly
initialised backbone (masks of random weights).

    python bench/accuracy.py --size 128 --limit 600 --epochs 3   # native-resolution table
    python bench/accuracy.py --size 64 --methods classifier piggyback
    python bench/accuracy.py --quick                             # seconds: the CI smoke run

One process per seed runs them side by side (`--seeds 0 --out s0.json`, ...); `--merge
s0.json s1.json s2.json` then tabulates them together.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from _common import markdown_table, write_results
from torch import nn

from piggyback import MaskConfig, PiggybackModel, read_task_file
from piggyback.backbones import DEFAULT_BACKBONE, create_backbone, input_spec
from piggyback.data import BUILTIN_TASKS, TaskData, load_task_data
from piggyback.recipes import RECIPES
from piggyback.train import TrainConfig, fit

LRS = (1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class Variant:
    """One column of the table: a method, its recipe and mask settings, and its sweep
    (TrainConfig settings, one run each; the best on validation is reported)."""

    method: str
    recipe: str = "default"
    mask: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[dict[str, Any], ...] = ({},)
    random_backbone: bool = False


SCORES_SWEEP = tuple({"lr": lr} for lr in LRS)
# The baselines' best lr sat at the sweep's top (1e-3): fine-tuning also gets 3e-3, the
# classifier (whose best then was 3e-3) 3e-3 and 1e-2.
HEAD_SWEEP = tuple({"head_lr": lr} for lr in (*LRS, 3e-3, 1e-2))
VARIANTS: dict[str, Variant] = {
    "classifier": Variant("classifier", sweep=HEAD_SWEEP),
    "piggyback": Variant("piggyback", sweep=SCORES_SWEEP),
    "paper": Variant("piggyback", recipe="paper"),
    "ternary": Variant("piggyback", mask={"threshold_fn": "ternarizer"}),
    "finetune": Variant(
        "finetune",
        sweep=(*SCORES_SWEEP, {"lr": 3e-3}, {"optimizer": "sgd", "lr": 1e-3, "head_lr": 1e-3}),
    ),
    "random-classifier": Variant("classifier", sweep=HEAD_SWEEP, random_backbone=True),
    "random-piggyback": Variant("piggyback", random_backbone=True),
}
TABLE_METHODS = ["classifier", "piggyback", "paper", "ternary", "finetune"]


def backbone_for(variant: Variant) -> nn.Module:
    """A fresh backbone per run: wrapping one changes its modules in place."""
    if variant.random_backbone:  # the embedded architecture, randomly initialised
        return timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    return create_backbone(DEFAULT_BACKBONE)


def run(
    task: str,
    source: str,
    data: TaskData,
    name: str,
    setting: dict[str, Any],
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train variant `name` with `setting` on the task read from `source`."""
    variant = VARIANTS[name]
    config = MaskConfig(train_bn=RECIPES[variant.recipe].train_bn, **variant.mask)
    train = TrainConfig.for_recipe(
        variant.recipe,
        method=variant.method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr_decay_every=max(1, args.epochs * 3 // 4),
        seed=seed,
        progress=not args.no_progress,
        **setting,
    )
    label = label_of(setting)
    out = Path(args.work) / f"{args.size}px" / name / task / f"seed{seed}" / label
    if not (args.reuse and (out / "result.json").exists()):
        model = PiggybackModel(backbone_for(variant), config)
        # What `piggyback eval/predict` read back: the input size, the data, the backbone
        # (none for a random one, which no name recreates).
        metadata = {"size": args.size, "data": source, "seed": seed, "limit": args.limit}
        if not variant.random_backbone:
            metadata["backbone"] = DEFAULT_BACKBONE
        # bench/norms.py reads the best epoch's fp32 norm tensors from the checkpoint.
        fit(model, task, data, train, out, keep_checkpoint=True, metadata=metadata)
    result = json.loads((out / "result.json").read_text())
    row = {"task": task, "seed": seed, "method": name, "setting": label,
           "val_top1": 100 * result["val"]["top1"], "test_top1": 100 * result["test"]["top1"],
           "best_epoch": result["best_epoch"], "seconds": round(result["seconds"])}  # fmt: skip
    task_file = Path(result["task_file"])
    row["task_bytes"] = task_file.stat().st_size
    if variant.method == "piggyback":
        row["kept"] = read_task_file(task_file)[0]["mask"]["kept"]
    return row


def chosen(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, seed and method, the run best on validation (ties: the first swept)."""
    best: dict[tuple, dict[str, Any]] = {}
    for row in runs:
        key = (row["task"], row["seed"], row["method"])
        if key not in best or row["val_top1"] > best[key]["val_top1"]:
            best[key] = row
    return list(best.values())


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def summary(picked: list[dict[str, Any]], methods: list[str], tasks: list[str]) -> list[dict]:
    """One row per task (and their mean): each method's mean ± std over seeds."""
    rows = []
    for task in [*tasks, "mean"]:
        row: dict[str, Any] = {"task": task}
        for method in methods:
            if task == "mean":  # per seed, the mean over tasks; then over seeds
                seeds = sorted({r["seed"] for r in picked})
                values = [statistics.mean(r["test_top1"] for r in picked
                                          if r["method"] == method and r["seed"] == s)
                          for s in seeds]  # fmt: skip
            else:
                values = [r["test_top1"] for r in picked
                          if r["method"] == method and r["task"] == task]  # fmt: skip
            row[method] = mean_std(values) if values else None
        rows.append(row)
    return rows


def grid(runs: list[dict[str, Any]], picked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every piggyback lr against the tuned classifier of the same task and seed."""
    classifier = {(r["task"], r["seed"]): r["test_top1"] for r in picked
                  if r["method"] == "classifier"}  # fmt: skip
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        for setting in dict.fromkeys(r["setting"] for r in runs if r["method"] == "piggyback"):
            cell = [r for r in runs if r["method"] == "piggyback" and r["task"] == task
                    and r["setting"] == setting and (task, r["seed"]) in classifier]  # fmt: skip
            if not cell:
                continue
            margins = [r["test_top1"] - classifier[(task, r["seed"])] for r in cell]
            rows.append({
                "task": task, "piggyback": setting,
                "test_top1": mean_std([r["test_top1"] for r in cell]),
                "over_classifier": mean_std(margins), "worst_margin": round(min(margins), 1),
                "runs_at_or_below": sum(m <= 0 for m in margins), "runs": len(cell),
            })  # fmt: skip
    return rows


def settings_of(method: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The TrainConfig settings `method` runs with: its sweep (or its first setting, or
    the one labelled `args.setting`), the norm passes' images on top for masked methods."""
    sweep = VARIANTS[method].sweep[:1] if args.no_sweep else VARIANTS[method].sweep
    if args.setting:
        sweep = tuple(s for s in sweep if label_of(s) == args.setting) or sweep[:0]
    if args.recalibrate_images is not None and VARIANTS[method].method == "piggyback":
        sweep = tuple({**s, "recalibrate_images": args.recalibrate_images} for s in sweep)
    return list(sweep)


def label_of(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items()) or "-"


def train_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method, sweep setting, task and seed that `args` asks for, in turn."""
    spec = input_spec(create_backbone(DEFAULT_BACKBONE), size=args.size)
    runs = []
    for seed in args.seeds:
        for task in args.tasks:
            data = load_task_data(task, spec, seed=seed, limit=args.limit)
            for method in args.methods:
                for setting in settings_of(method, args):
                    runs.append(run(Path(task).name, task, data, method, setting, seed, args))
                    print(markdown_table(runs[-1:], list(runs[-1])), flush=True)
    return runs


def merged_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of earlier results files; their settings must agree but for the seeds."""
    payloads = [json.loads(path.read_text()) for path in args.merge]
    first = payloads[0]["settings"]
    same = ("size", "limit", "epochs", "batch_size", "no_sweep", "setting", "recalibrate_images")
    for path, payload in zip(args.merge, payloads, strict=True):
        if any(payload["settings"].get(key) != first.get(key) for key in same):
            raise SystemExit(f"{path} was run with other settings than {args.merge[0]}")
    for key in (*same, "tasks"):
        setattr(args, key, first.get(key))
    seeds = [seed for p in payloads for seed in p["settings"]["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"the files share seeds ({seeds}): merge runs of different seeds")
    args.seeds = sorted(seeds)
    args.methods = [m for m in VARIANTS if any(m in p["settings"]["methods"] for p in payloads)]
    return [row for payload in payloads for row in payload["runs"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS),
                        help="built-in task names, ImageFolder folders or CSV files")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=TABLE_METHODS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=600, help="training images per task")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-sweep", action="store_true", help="each method's first setting")
    parser.add_argument("--setting", help="only the sweep setting of this label, e.g. lr=0.0003")
    parser.add_argument("--recalibrate-images", type=int,
                        help="images per norm pass (TrainConfig.recalibrate_images)")  # fmt: skip
    parser.add_argument("--work", default="runs/bench/accuracy", help="task files and logs")
    parser.add_argument("--out", default="bench/results/accuracy.json")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="runs whose --work folder holds a result.json are done")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="train nothing: tabulate the runs of these results files "
                        "(e.g. one per seed, run in parallel)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.size, args.limit, args.epochs = ["digits"], 32, 64, 1
        args.seeds, args.no_sweep = [0, 1], True
    runs = merged_runs(args) if args.merge else train_all(args)
    picked = chosen(runs)
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    table = summary(picked, args.methods, tasks)
    grid_rows = grid(runs, picked) if {"classifier", "piggyback"} <= set(args.methods) else []
    settings = {k: (list(map(str, v)) if k == "merge" and v else v) for k, v in vars(args).items()
                if k not in ("out", "no_progress")}  # fmt: skip
    print(f"\nsettings: {settings}\n\ntest top-1 (%), mean ± std over seeds {args.seeds}, "
          f"each cell's setting chosen on validation:\n\n"
          f"{markdown_table(table, ['task', *args.methods])}")  # fmt: skip
    if grid_rows:
        print(f"\nevery piggyback setting against the tuned classifier:\n\n"
              f"{markdown_table(grid_rows, list(grid_rows[0]))}")  # fmt: skip
    payload = {"settings": settings, "summary": table, "grid": grid_rows, "chosen": picked,
               "runs": runs}  # fmt: skip
    print(f"\nwrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main()
