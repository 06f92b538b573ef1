"""Where a mask-training step spends its time, beside a fine-tuning step: torch.profiler.

Both methods train as in `bench/speed.py` (the default recipe's scores, per-task norms
and 10-class head against a fine-tuned copy with a new head; Adam). After warm-up steps,
`--steps` steps of each run under the profiler; the table lists each method's operators
by their own time (self time, children excluded), CUDA time on a GPU.

On a GPU a second table sets each method's wall-clock per step beside the time its
kernels kept the GPU busy, and charges every stretch the GPU sat idle to the host
operator that was running when it began (the innermost one): where a step waits on its
host. That wall-clock is under the profiler, which adds to every operator (more to the
method that runs more of them); `bench/speed.py` times the steps unprofiled. `--trace DIR`
also writes each method's Chrome trace (chrome://tracing, Perfetto).

    python bench/profile_step.py --model efficientnet_lite0 --size 224 --batch 16
    python bench/profile_step.py --device cuda --amp bf16 --batch 64 --model resnet50 --trace OUT
    python bench/profile_step.py --quick          # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from _common import markdown_table, profile_parser, sync, write_run
from speed import BUILDERS, train_step_fn, training_setup
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile

IDLE_MIN_US = 20.0  # shorter gaps between kernels are the launch rhythm, not a wait


def profiled_steps(method: str, args: argparse.Namespace) -> tuple[profile, float]:
    """`args.steps` steps of `method` under the profiler, after warm-up; their wall time."""
    device = torch.device(args.device)
    model, optimizer = training_setup(args.model, method, args.size, device)
    step = train_step_fn(model, optimizer, args.batch, args.size, args)
    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        wall = time.perf_counter() - start
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"profile_step-{method}.json.gz"))
    return prof, wall


def idle_gaps(events: EventList) -> tuple[float, list[tuple[float, float]]]:
    """The time (us) the GPU ran kernels, copies or fills, and the gaps between them, in
    time order. A user annotation on the GPU's timeline (`Optimizer.step#Adam.step`) spans
    its kernels and the gaps between them: it is no work of the GPU."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
    busy, gaps = 0.0, []
    if not spans:
        return busy, gaps
    start, end = spans[0]
    for span_start, span_end in spans[1:]:
        if span_start > end:
            busy += end - start
            if span_start - end >= IDLE_MIN_US:
                gaps.append((end, span_start))
            start = span_start
        end = max(end, span_end)
    return busy + end - start, gaps


def charged_to_host(events: EventList, gaps: list[tuple[float, float]]) -> Counter[str]:
    """Each gap's length (us) by the innermost host op running when it began: the one of
    latest start still open. One sweep over the host ops in order of start, keeping a
    stack of those begun (the gaps come in time order, so an op closed at one gap is
    closed at every later one)."""
    host = sorted(
        (e.time_range.start, -e.time_range.end, e.name)
        for e in events
        if e.device_type == DeviceType.CPU
    )  # an op before the ops it encloses that start with it
    idle: Counter[str] = Counter()
    stack: list[tuple[float, float, str]] = []
    begun = 0
    for gap_start, gap_end in gaps:
        while begun < len(host) and host[begun][0] <= gap_start:
            stack.append(host[begun])
            begun += 1
        while stack and -stack[-1][1] <= gap_start:
            stack.pop()
        idle[stack[-1][2] if stack else "(no host op)"] += gap_end - gap_start
    return idle


def timeline(method: str, prof: profile, wall: float, args: argparse.Namespace) -> dict:
    """Wall time, GPU busy time and the idle time by the host op it began in, per step."""
    events = prof.events()
    busy, gaps = idle_gaps(events)
    idle_by_op = charged_to_host(events, gaps)
    per_step = 1000 * args.steps
    on_gpu = torch.device(args.device).type == "cuda"
    return {
        "method": method,
        "wall ms per step": 1000 * wall / args.steps,
        "gpu busy ms per step": busy / per_step if on_gpu else None,
        "gpu idle ms per step": sum(end - start for start, end in gaps) / per_step
        if on_gpu
        else None,
        "idle begins in (ms per step)": {
            name: round(us / per_step, 3) for name, us in idle_by_op.most_common(args.top)
        },
    }


def top_ops(method: str, prof: profile, args: argparse.Namespace) -> list[dict[str, Any]]:
    """`args.top` operators of `method`'s profiled steps, by self time per step."""
    device = torch.device(args.device)
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
    parser = profile_parser(
        __doc__, BUILDERS, model="efficientnet_lite0", top=12, out="bench/results/profile_step.json"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", choices=("bf16", "fp16"))
    parser.add_argument("--trace", help="a folder for each method's Chrome trace")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.top = 32, 2, 1, 5
    rows, timelines = [], []
    for method in ("finetune", "mask"):
        prof, wall = profiled_steps(method, args)
        rows += top_ops(method, prof, args)
        timelines.append(timeline(method, prof, wall, args))
    print(markdown_table(rows, list(rows[0])))
    print(markdown_table(timelines, list(timelines[0])[:-1]))
    for line in timelines:
        print(f"{line['method']}: GPU idle begins in {line['idle begins in (ms per step)']}")
    write_run(args, {"results": rows, "timeline": timelines})


if __name__ == "__main__":
    main()
