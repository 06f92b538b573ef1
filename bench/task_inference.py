"""Task inference: which task an input belongs to, and refusing inputs of none.

Trains tasks on the embedded backbone with the default recipe (`fit`, which stores each
task's calibration), then for each rule of `piggyback.taskinfer`:

- domains: the built-in tasks (fashion_mnist when installed, animals, digits); per-sample
  and per-batch (16 same-task samples) task accuracy on the union of their test sets, and
  the end-to-end accuracy (right task and right class) against the accuracy with the task
  given;
- leave-one-out: each task held out in turn, its test images fed to the others: the share
  refused, and the share of the known tasks' own test images refused;
- split: tasks made of disjoint class halves of one data set (animals 0-4 / 5-9, digits
  0-4 / 5-9), the continual-learning case;
- cost: seconds per image of `infer_task` over k = 3 and k = 10 tasks against a plain forward.

    python bench/task_inference.py                    # 64 px, 1,000 images a task, 3 epochs
    python bench/task_inference.py --device cuda --size 224 --limit 2000 --epochs 6
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import interleaved_seconds, markdown_table, write_results
from torch.utils.data import Dataset

from piggyback import PiggybackModel
from piggyback.backbones import DEFAULT_BACKBONE, create_backbone, input_spec
from piggyback.data import TaskData, load_task_data, make_loader
from piggyback.data.builtin import FASHION_MNIST_DIR
from piggyback.taskinfer import DEFAULT_THRESHOLDS, RULES, calibrate_task
from piggyback.train import TrainConfig, fit

BATCH = 16  # samples of one task in a per-batch inference
COST_COLUMNS = ["rule", "k", "weight_cache_size", "ms_per_image", "plain_ms_per_image", "ratio"]


class ClassSubset(Dataset):
    """The items of `base` whose label is in `classes`, relabelled 0..len(classes)-1."""

    def __init__(self, base: Any, classes: list[int]) -> None:
        self.base, self.classes = base, {c: i for i, c in enumerate(classes)}
        self.items = np.flatnonzero(np.isin(np.asarray(base.labels), classes))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.base[int(self.items[index])]
        return None if item is None else (item[0], self.classes[int(item[1])])


def split_task(data: TaskData, classes: list[int]) -> TaskData:
    return TaskData(
        *(ClassSubset(getattr(data, part), classes) for part in ("train", "val", "test")),
        class_names=[data.class_names[c] for c in classes],
    )


def train_tasks(
    model: PiggybackModel, datasets: dict[str, TaskData], args: argparse.Namespace, out: Path
) -> dict[str, float]:
    """Train each task with the default recipe; returns its test top-1 with the task given."""
    accuracies = {}
    for task, data in datasets.items():
        config = TrainConfig(epochs=args.epochs, device=args.device, progress=False, amp=args.amp)
        result = fit(model, task, data, config, out / task)
        accuracies[task] = result.test["top1"]
        print(f"trained {task}: test top-1 {accuracies[task]:.4f}", flush=True)
    return accuracies


def test_images(data: TaskData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(
        *(batch for batch in make_loader(data.test, 256, shuffle=False)), strict=True
    )
    return torch.cat(images).to(device), torch.cat(labels).to(device)


def inferred(
    model: PiggybackModel, images: torch.Tensor, tasks: list[str], rule: str, **options: Any
) -> tuple[list[str | None], list[int | None]]:
    """Tasks and classes inferred for `images`, in chunks of BATCH."""
    found, classes = [], []
    for start in range(0, len(images), BATCH):
        result = model.infer_task(images[start : start + BATCH], tasks=tasks, rule=rule, **options)
        found += result.tasks
        classes += result.predicted_classes()
    return found, classes


def identification(
    model: PiggybackModel,
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
    given: dict[str, float],
    rule: str,
) -> dict[str, Any]:
    """Per-sample and per-batch task accuracy, end-to-end accuracy, over `sets` (no refusal)."""
    tasks = list(sets)
    right = batches = right_batches = both = total = 0
    for task, (images, labels) in sets.items():
        found, classes = inferred(model, images, tasks, rule, threshold=0.0)
        hits = [f == task for f in found]
        right += sum(hits)
        both += sum(h and c == int(y) for h, c, y in zip(hits, classes, labels, strict=True))
        total += len(found)
        for start in range(0, len(images) - BATCH + 1, BATCH):
            batch = images[start : start + BATCH]
            result = model.infer_task(batch, tasks=tasks, rule=rule, threshold=0.0, same_task=True)
            right_batches += result.tasks[0] == task
            batches += 1
    given_mean = sum(given[t] * len(sets[t][0]) for t in tasks) / total
    return {
        "rule": rule,
        "tasks": len(tasks),
        "per_sample": right / total,
        "per_batch": right_batches / max(batches, 1),
        "end_to_end": both / total,
        "task_given": given_mean,
        "samples": total,
    }


SWEEP = {
    "calibrated": [0.001, 0.005, 0.01, 0.02, 0.05, 0.1],
    "entropy": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "features": [0.01, 0.02, 0.03, 0.05, 0.07, 0.1],
}


def best_scores(
    model: PiggybackModel, images: torch.Tensor, tasks: list[str], rule: str
) -> torch.Tensor:
    """The best candidate's score of each image (what a threshold is compared with)."""
    chunks = [
        model.infer_task(images[start : start + BATCH], tasks=tasks, rule=rule).scores
        for start in range(0, len(images), BATCH)
    ]
    return torch.cat(chunks).cpu()


def refusal(
    model: PiggybackModel, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], rule: str
) -> list[dict[str, Any]]:
    """Leave-one-out: each task's test images fed to the others; the shares refused of
    those (unseen) and of the others' own test images (known), at each threshold."""
    unseen, known = [], []
    for held_out in sets:
        others = [task for task in sets if task != held_out]
        unseen.append(best_scores(model, sets[held_out][0], others, rule))
        known += [best_scores(model, sets[task][0], others, rule) for task in others]
    unseen_scores, known_scores = torch.cat(unseen), torch.cat(known)
    return [
        {
            "rule": rule,
            "threshold": threshold,
            "default": threshold == DEFAULT_THRESHOLDS[rule],
            "unseen_refused": float((unseen_scores < threshold).float().mean()),
            "known_refused": float((known_scores < threshold).float().mean()),
        }
        for threshold in SWEEP[rule]
    ]


def cost(
    model: PiggybackModel, images: torch.Tensor, task_file: Path, device: torch.device
) -> list[dict[str, Any]]:
    """Seconds per image of inference over k tasks, by each rule, against one plain
    forward (the task baked into a plain backbone); timed in turns, so that other
    processes on the machine slow every figure alike. Once with the default weight cache
    (each call re-derives every candidate's masked weights), once keeping all k. The
    model runs in eval mode, as the server and `piggyback predict` run it (in training
    mode each call would switch it to eval and back: two walks of every module, and the
    switch back drops the cached weights)."""
    model.eval()
    batch = images[:BATCH]
    plain = model.bake(next(iter(model.task_info))).to(device)
    rows = []
    for k in (3, 10):
        names = [f"copy{i}" for i in range(k)]
        for name in names:
            model.load_task(task_file, name=name)
        for cache in (1, k):
            model.weight_cache_size = cache
            runs = {"plain": lambda: plain(batch)}
            for rule in RULES:
                runs[rule] = lambda rule=rule, names=names: model.infer_task(
                    batch, tasks=names, rule=rule
                )
            with torch.no_grad():
                seconds = interleaved_seconds(runs, device, repeat=9)
            for rule in RULES:
                rows.append(
                    {"rule": rule, "k": k, "weight_cache_size": cache,
                     "ms_per_image": 1000 * seconds[rule] / len(batch),
                     "plain_ms_per_image": 1000 * seconds["plain"] / len(batch),
                     "ratio": seconds[rule] / seconds["plain"]}
                )  # fmt: skip
        model.weight_cache_size = 1
        for name in names:
            model.remove_task(name)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument(
        "--cost-only", action="store_true",
        help="only the cost rows, on an untrained task (cost does not depend on training)",
    )  # fmt: skip
    parser.add_argument("--out", default="bench/results/task-inference.json")
    args = parser.parse_args(argv)
    if args.quick:  # two domains, one split data set
        args.size, args.limit, args.epochs = 32, 32, 1
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    backbone = create_backbone(DEFAULT_BACKBONE)
    spec = input_spec(backbone, size=args.size)
    fashion = FASHION_MNIST_DIR.is_dir() and not args.quick
    names = ["animals", "digits"] + (["fashion_mnist"] if fashion else [])
    loaded = {name: load_task_data(name, spec, seed=args.seed, limit=args.limit) for name in names}
    halves = {
        f"{name}_{part}": split_task(loaded[name], classes)
        for name in (["digits"] if args.quick else ["animals", "digits"])
        for part, classes in (("0-4", [0, 1, 2, 3, 4]), ("5-9", [5, 6, 7, 8, 9]))
    }
    results: dict[str, Any] = {"settings": vars(args)}
    if args.cost_only:
        with tempfile.TemporaryDirectory() as scratch:
            model = PiggybackModel(create_backbone(DEFAULT_BACKBONE)).to(device)
            model.add_task("t", 10)
            model.freeze_task("t")
            calibrate_task(model, "t", [torch.randn(BATCH, 3, args.size, args.size)])
            task_file = model.save_task("t", Path(scratch) / "t.safetensors")
            images = torch.randn(BATCH, 3, args.size, args.size, device=device)
            results["cost"] = cost(model, images, task_file, device)
        print(markdown_table(results["cost"], COST_COLUMNS))
        write_results(args.out, results)
        return results
    with tempfile.TemporaryDirectory() as scratch:
        for setting, datasets in (("domains", loaded), ("split", halves)):
            model = PiggybackModel(create_backbone(DEFAULT_BACKBONE))
            given = train_tasks(model, datasets, args, Path(scratch) / setting)
            model.to(device).eval()
            sets = {task: test_images(data, device) for task, data in datasets.items()}
            results[setting] = [identification(model, sets, given, rule) for rule in RULES]
            results[f"{setting}_refusal"] = [
                row for rule in RULES for row in refusal(model, sets, rule)
            ]
            if setting == "domains":
                task_file = Path(scratch) / setting / names[0] / f"{names[0]}.safetensors"
                results["cost"] = cost(model, sets[names[0]][0], task_file, device)
    for key, columns in (
        ("domains", ["rule", "tasks", "per_sample", "per_batch", "end_to_end", "task_given"]),
        ("domains_refusal", ["rule", "threshold", "default", "unseen_refused", "known_refused"]),
        ("split", ["rule", "tasks", "per_sample", "per_batch", "end_to_end", "task_given"]),
        ("split_refusal", ["rule", "threshold", "default", "unseen_refused", "known_refused"]),
        ("cost", COST_COLUMNS),
    ):
        print(f"\n{key}\n" + markdown_table(results[key], columns))
    write_results(args.out, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
