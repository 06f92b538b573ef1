"""What a whole training run costs per method, and where its time goes.

Classifier-only, piggyback with the default recipe, the paper's recipe and full
fine-tuning each train the same task, split and loader with `piggyback.train.fit`.
Timing hooks that this script installs around fit's parts (fit itself is unchanged)
split each run's wall-clock into: data wait (the training loop waiting for its next
batch), forward+backward (the rest of a training step: zero_grad, forward, loss,
backward, metrics), the optimizer step (the optimizer's own step hooks), the norms'
start pass, their re-estimation after each epoch, evaluation (val after each epoch,
val and test at the end), saving (checkpoint, metrics, task file) and the rest
(building the optimizer, checking the masks, freezing the task).

Loaders (`--loaders`): "default" is what `fit` uses by default (`num_workers` "auto",
images held in memory resized to the training size once); "per-item" is the loader
before it: every image resized on each access, in the training process.

Runs are interleaved (every method and loader once, then again for `--repeats`) and
the fastest of each is reported, so that the ratios compare runs made side by side.
On CUDA every phase boundary synchronizes the device, so that each phase is charged
with its own kernels.

    python bench/train_cost.py --data animals --size 96 --limit 800 --epochs 2 \
        --loaders per-item default --repeats 2
    python bench/train_cost.py --device cuda --amp bf16 --size 224 --limit 2000 --epochs 6
    python bench/train_cost.py --quick             # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from _common import markdown_table, sync, write_run
from accuracy import VARIANTS

from piggyback import MaskConfig, PiggybackModel, train
from piggyback.backbones import DEFAULT_BACKBONE, create_backbone, input_spec
from piggyback.data import TaskData, load_task_data, tasks
from piggyback.recipes import RECIPES

METHODS = ("classifier", "piggyback", "paper", "finetune")
NORM_PASS_IMAGES = train.TrainConfig.recalibrate_images  # fit's default
# Per loader: the bytes a split may take resized once, and `num_workers`.
LOADERS: dict[str, tuple[int, int | str]] = {
    "default": (tasks.RESIZE_ONCE_BYTES, "auto"),
    "per-item": (0, 0),
}
PHASES = ("data wait", "forward+backward", "optimizer step", "norm start", "norm re-estimation",
          "evaluation", "saving", "other")  # fmt: skip
# fit's parts that are timed whole, by the name `piggyback.train` calls them.
TIMED = {
    "start_norms_as_backbone": "norm start",
    "recalibrate_norms": "norm re-estimation",
    "evaluate": "evaluation",
    "save_checkpoint": "saving",
    "save_result_model": "saving",
    "write_atomic": "saving",
    "remove_checkpoint": "saving",
}


class PhaseTimer:
    """Seconds per phase of one run, filled by the hooks `installed` puts around fit."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += self.now() - start

        return wrapper

    def waited(self, loader: Iterable[Any]) -> Iterator[Any]:
        """`loader`'s batches, the time spent waiting for each counted as data wait."""
        batches = iter(loader)
        while True:
            start = self.now()
            batch = next(batches, None)
            self.seconds["data wait"] += self.now() - start
            if batch is None:
                return
            self.steps += 1
            yield batch

    def training_loop(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`train_one_epoch` with its loader and its optimizer's step timed."""

        def wrapper(model: Any, loader: Any, optimizer: torch.optim.Optimizer, *args, **kwargs):
            started: list[float] = []
            pre = optimizer.register_step_pre_hook(lambda *_: started.append(self.now()))
            post = optimizer.register_step_post_hook(
                lambda *_: self.seconds.__setitem__(
                    "optimizer step", self.seconds["optimizer step"] + self.now() - started.pop()
                )
            )
            try:
                return self.timed("training loop", fn)(
                    model, self.waited(loader), optimizer, *args, **kwargs
                )
            finally:
                pre.remove()
                post.remove()

        return wrapper

    def installed(self) -> ExitStack:
        """Patch `piggyback.train`'s names for the block: fit calls the timed versions."""
        stack = ExitStack()
        for name, phase in TIMED.items():
            stack.enter_context(
                mock.patch.object(train, name, self.timed(phase, getattr(train, name)))
            )
        loop = self.training_loop(train.train_one_epoch)
        stack.enter_context(mock.patch.object(train, "train_one_epoch", loop))
        return stack

    def breakdown(self, wall: float) -> dict[str, float]:
        """Every phase in seconds; forward+backward is the training loop's remainder."""
        phases = {phase: self.seconds[phase] for phase in PHASES[:-1]}
        loop = self.seconds["training loop"]
        phases["forward+backward"] = loop - phases["data wait"] - phases["optimizer step"]
        phases["other"] = wall - sum(phases.values())
        return phases


def load(loader: str, args: argparse.Namespace) -> TaskData:
    """The task's data as `loader` holds it: the same split for every loader."""
    spec = input_spec(create_backbone(DEFAULT_BACKBONE), size=args.size)
    with mock.patch.object(tasks, "RESIZE_ONCE_BYTES", LOADERS[loader][0]):
        return load_task_data(args.data, spec, limit=args.limit)


def run(method: str, loader: str, data: TaskData, args: argparse.Namespace) -> dict[str, Any]:
    """One fit of `method` on `data` with `loader`'s workers, timed by phase."""
    variant = VARIANTS[method]
    config = train.TrainConfig.for_recipe(
        variant.recipe,
        method=variant.method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        num_workers=LOADERS[loader][1],
        progress=False,
        recalibrate_images=args.recalibrate_images,
    )
    model = PiggybackModel(
        create_backbone(DEFAULT_BACKBONE), MaskConfig(train_bn=RECIPES[variant.recipe].train_bn)
    )
    timer = PhaseTimer(train.resolve_device(args.device))
    with tempfile.TemporaryDirectory() as out, timer.installed():
        start = timer.now()
        train.fit(model, "task", data, config, out)
        wall = timer.now() - start
    phases = timer.breakdown(wall)
    row: dict[str, Any] = {"method": method, "loader": loader, "wall s": wall, **phases}
    row["data wait %"] = 100 * phases["data wait"] / timer.seconds["training loop"]
    row["step ms"] = 1000 * (phases["forward+backward"] + phases["optimizer step"]) / timer.steps
    print(f"{method} ({loader} loader): {wall:.1f} s", flush=True)
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method's wall-clock and training step against fine-tuning's with its loader."""
    base = {r["loader"]: r for r in rows if r["method"] == "finetune"}
    return [
        {
            "method": row["method"],
            "loader": row["loader"],
            "run / finetune": row["wall s"] / base[row["loader"]]["wall s"],
            "step / finetune step": row["step ms"] / base[row["loader"]]["step ms"],
        }
        for row in rows
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="animals", help="a built-in task, folder or CSV")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--limit", type=int, default=800, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    parser.add_argument("--loaders", nargs="+", default=["default"], choices=list(LOADERS))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of each")
    parser.add_argument("--recalibrate-images", type=int, default=NORM_PASS_IMAGES,
                        help="images of each norm pass (default: fit's)")  # fmt: skip
    parser.add_argument("--out", default="bench/results/train_cost.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.size, args.limit, args.epochs = "digits", 32, 48, 1
        args.loaders = list(LOADERS)
    data = {loader: load(loader, args) for loader in args.loaders}
    pairs = [(method, loader) for method in args.methods for loader in args.loaders]
    runs = [run(m, loader, data[loader], args) for _ in range(args.repeats) for m, loader in pairs]
    best = [min((r for r in runs if (r["method"], r["loader"]) == pair), key=lambda r: r["wall s"])
            for pair in pairs]  # fmt: skip
    print(f"seconds per phase, fastest of {args.repeats} interleaved run(s) each:\n")
    columns = ["method", "loader", "wall s", *PHASES, "data wait %", "step ms"]
    print(markdown_table(best, columns))
    table = ratios(best) if "finetune" in args.methods else []
    if table:
        print(f"\nagainst fine-tuning:\n\n{markdown_table(table, list(table[0]))}")
    write_run(args, {"results": best, "ratios": table, "runs": runs})


if __name__ == "__main__":
    main()
