"""The host's work on piggyback's paths, measured on the CPU: a stand-in for a GPU's.

On a GPU these backbones' forwards and steps at batch 16-64 cost about what Python takes to
launch their kernels, so every microsecond of host work per layer shows there. Thin
replicas (the same layers and operators, a few channels each) at 32 px on one CPU thread
leave the arithmetic nearly nil, so what a step or a forward costs here is its host's
work. Two figures, each against its plain counterpart in the same run:

- a mask-training step (the default recipe: scores, per-task norms, 10-class head) against
  a fine-tuning step, phase by phase (zero_grad, forward, backward, optimizer step);
- a mixed batch of k frozen tasks with their own norms (serving's mix, task inference's k
  passes) against k forwards of the plain backbone, and k of one of the tasks; and task
  inference over the k tasks (the default rule, each task calibrated, a weight cache of k)
  against the same k plain forwards.

    python bench/host_time.py
    python bench/host_time.py --quick          # seconds: the CI smoke run

The ResNet-50 here is timm's (the same blocks as torchvision's, whose widths are fixed).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from _common import interleaved_seconds, markdown_table, write_run
from speed import CLASSES, autocast, method_setup
from timm.models.efficientnet import _gen_efficientnet_lite
from torch import nn

from piggyback import PiggybackModel
from piggyback.taskinfer import calibrate_task

THIN: dict[str, Callable[[], nn.Module]] = {
    "resnet50": lambda: timm.create_model("resnet50", channels=(4, 8, 16, 32), stem_width=4),
    "efficientnet_lite0": lambda: _gen_efficientnet_lite("efficientnet_lite0", 0.05, 1.0),
    "vit_small": lambda: timm.create_model(
        "vit_small_patch16_224", img_size=32, embed_dim=24, num_heads=6
    ),
}
SIZE = 32
PHASES = ("zero_grad", "forward", "backward", "optimizer")


def thin(name: str) -> nn.Module:
    torch.manual_seed(0)
    return THIN[name]().eval()


def step_phases(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Median ms of each phase of a step of either method, the methods in turns."""
    device, batch = torch.device("cpu"), 2  # BatchNorm needs 2 samples in training
    x, labels = torch.randn(batch, 3, SIZE, SIZE), torch.randint(0, CLASSES, (batch,))
    setups = {method: method_setup(thin(name), method) for method in ("finetune", "mask")}
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in PHASES} for m in setups}
    for turn in range(args.warmup + args.repeat):
        for method, (model, optimizer) in setups.items():
            marks = [time.perf_counter()]
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            with autocast(device, args.amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            optimizer.step()
            marks.append(time.perf_counter())
            if turn >= args.warmup:
                for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                    times[method][phase].append(end - start)
    rows = []
    for method, phases in times.items():
        row: dict[str, Any] = {"model": name, "method": method}
        row.update({f"{p} ms": 1000 * statistics.median(phases[p]) for p in PHASES})
        row["step ms"] = sum(row[f"{p} ms"] for p in PHASES)
        rows.append(row)
    rows[1]["mask / finetune"] = rows[1]["step ms"] / rows[0]["step ms"]
    return rows


def mixed_batch(k: int, args: argparse.Namespace) -> dict[str, Any]:
    """A mixed batch of `k` frozen tasks (own norms), 16 images each, against `k` forwards
    of the plain backbone and against `k` forwards of one cached task; and `infer_task`
    over the `k` tasks for 16 images (the masked weights of all `k` cached)."""
    plain = thin("efficientnet_lite0")
    model = PiggybackModel(copy.deepcopy(plain)).eval()  # it wraps the layers it is given
    generator = torch.Generator().manual_seed(1)
    for index in range(k):
        masks = {
            name: (torch.rand(layer.frozen.shape, generator=generator) < 0.95).to(torch.int8)
            for name, layer in model.masked_layers.items()
        }
        model.add_task(f"t{index}", CLASSES, masks=masks, train_bn=True)
        model.freeze_task(f"t{index}")
        calibrate_task(model, f"t{index}", [torch.randn(16, 3, SIZE, SIZE, generator=generator)])
    x = torch.randn(16, 3, SIZE, SIZE)
    tasks = [f"t{i}" for i in range(k)]
    mixed_x, names = x.repeat(k, 1, 1, 1), [task for task in tasks for _ in range(16)]
    model.set_task("t0")
    inferring = copy.deepcopy(model)  # as infer_task's docstring says: eval mode, a cache of k
    inferring.weight_cache_size = k
    fns = {
        "plain": lambda: [plain(x) for _ in range(k)],
        "one task": lambda: [model(x) for _ in range(k)],
        "mixed": lambda: model(mixed_x, task_names=names),
        "infer_task": lambda: inferring.infer_task(x, tasks=tasks),
    }
    with torch.no_grad():
        seconds = interleaved_seconds(fns, torch.device("cpu"), args.repeat, args.warmup)
    ms = {name: 1000 * value for name, value in seconds.items()}
    return {
        "k": k,
        "plain ms": ms["plain"],
        "one task ms": ms["one task"],
        "mixed ms": ms["mixed"],
        "infer_task ms": ms["infer_task"],
        "mixed / plain": ms["mixed"] / ms["plain"],
        "mixed / one task": ms["mixed"] / ms["one task"],
        "infer_task / plain": ms["infer_task"] / ms["plain"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(THIN), choices=list(THIN))
    parser.add_argument("--k", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", choices=["bf16"], default="bf16", help="as on a GPU")
    parser.add_argument("--out", default="bench/results/host_time.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.k, args.repeat, args.warmup = ["efficientnet_lite0"], [2], 2, 1
    torch.set_num_threads(1)  # one thread: a GPU's host launches from one
    steps = [row for name in args.models for row in step_phases(name, args)]
    mixed = [mixed_batch(k, args) for k in args.k]
    print(markdown_table(steps, [*steps[0], "mask / finetune"]))
    print()
    print(markdown_table(mixed, list(mixed[0])))
    write_run(args, {"steps": steps, "mixed": mixed})


if __name__ == "__main__":
    main()
