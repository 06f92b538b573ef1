"""Where a forward right after a task switch spends its time, beside a plain forward.

The masked model runs a task whose W * mask is cached, and a task it switches to before
every batch (two take turns in the weight cache's second slot, each derived afresh, as
in `speed.py`); the plain backbone runs the same batch.
Each runs `--steps` times under torch.profiler after warm-up; the table lists operators
by self time per forward: host (CPU) time, which on a GPU is where launch overhead shows,
and device time on a GPU. Wall time per forward is measured outside the profiler.

    python bench/profile_forward.py --device cuda --amp bf16 --batch 64 --model resnet50
    python bench/profile_forward.py --model resnet50 --size 224 --batch 16
    python bench/profile_forward.py --quick          # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from _common import interleaved_seconds, markdown_table, profile_parser, sync, write_run
from speed import BUILDERS, add_switching_tasks, build, inference, masked_forwards
from torch.profiler import ProfilerActivity, profile

from piggyback import PiggybackModel


def forwards(args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    """The plain backbone's forward, and the masked model's with its weights cached and
    right after a switch (`speed.masked_forwards`)."""
    device = torch.device(args.device)
    model = PiggybackModel(build(args.model, args.size, device)).to(device).eval()
    add_switching_tasks(model)
    plain = model.base.to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    masked = masked_forwards(model, x)
    fns = {"plain": lambda: plain(x), "cached": masked["cached"],
           "after_switch": masked["rederived"]}  # fmt: skip
    return {name: inference(fn, device, args.amp) for name, fn in fns.items()}


def top_ops(name: str, fn: Callable[[], None], args: argparse.Namespace) -> list[dict]:
    """`args.top` operators of `args.steps` runs of `fn`, by self host time per run."""
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            fn()
        sync(device)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    per_run = 1000 * args.steps

    def row(op: str, host_us: float, device_us: float, calls: float) -> dict[str, Any]:
        cells = {"forward": name, "op": op, "host ms": host_us / per_run}
        if on_gpu:
            cells["device ms"] = device_us / per_run
        return {**cells, "calls": calls / args.steps}

    rows = [
        row(e.key, e.self_cpu_time_total, e.self_device_time_total, e.count)
        for e in events[: args.top]
    ]
    host = sum(e.self_cpu_time_total for e in events)
    gpu = sum(e.self_device_time_total for e in prof.key_averages())
    return [*rows, row("(all)", host, gpu, sum(e.count for e in events))]


def main(argv: list[str] | None = None) -> None:
    parser = profile_parser(
        __doc__, BUILDERS, model="resnet50", top=12, out="bench/results/profile_forward.json"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.top = 32, 2, 1, 5
    fns = forwards(args)
    wall = interleaved_seconds(fns, torch.device(args.device), repeat=2 * args.steps + 1)
    rows = [row for name, fn in fns.items() for row in top_ops(name, fn, args)]
    print(markdown_table(rows, list(rows[0])))
    ratio = wall["after_switch"] / wall["plain"]
    each = ", ".join(f"{name} {1000 * seconds:.2f}" for name, seconds in wall.items())
    print(f"\nwall ms per forward: {each}; after_switch / plain {ratio:.2f}")
    write_run(args, {"wall_s": wall, "ratio": ratio, "results": rows})


if __name__ == "__main__":
    main()
