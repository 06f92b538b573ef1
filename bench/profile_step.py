"""Where a mask-training step spends its time, beside a fine-tuning step: torch.profiler.

Both methods train as in `bench/speed.py` (the default recipe's scores, per-task norms
and 10-class head against a fine-tuned copy with a new head; Adam). After warm-up steps,
`--steps` steps of each run under the profiler; the table lists each method's operators
by their own time (self time, children excluded), CUDA time on a GPU.

    python bench/profile_step.py --model efficientnet_lite0 --size 224 --batch 16
    python bench/profile_step.py --device cuda --amp bf16 --batch 64 --model resnet50
    python bench/profile_step.py --quick          # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import markdown_table, sync, write_run
from speed import BUILDERS, train_step_fn, training_setup
from torch.profiler import ProfilerActivity, profile


def top_ops(method: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`args.top` operators of `args.steps` steps of `method`, by self time per step."""
    device = torch.device(args.device)
    model, optimizer = training_setup(args.model, method, args.size, device)
    step = train_step_fn(model, optimizer, args.batch, args.size, args)
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in events)
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    return [
        {
            "method": method,
            "op": event.key,
            "ms per step": getattr(event, key) / 1000 / args.steps,
            "share %": 100 * getattr(event, key) / total,
            "calls per step": event.count / args.steps,
        }
        for event in events[: args.top]
    ] + [{"method": method, "op": "(all)", "ms per step": total / 1000 / args.steps}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=list(BUILDERS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    parser.add_argument("--out", default="bench/results/profile_step.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.top = 32, 2, 1, 5
    rows = [row for method in ("finetune", "mask") for row in top_ops(method, args)]
    print(markdown_table(rows, list(rows[0])))
    write_run(args, {"results": rows})


if __name__ == "__main__":
    main()
