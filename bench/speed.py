"""Speed and memory of piggyback against its alternatives, side by side in one run.

For each backbone: a training step (mask training vs full fine-tuning: time and
peak memory), inference (baked task, masked model with its cached weight, the
masked model switching task before every batch, and torch.nn.utils.parametrize
as the reference implementation, each against the plain backbone), a task switch
from a task file to ready-to-run weights, a mixed batch of 8 tasks against 8
single-task forwards, and the memory that N resident tasks add to the backbone.

    python bench/speed.py                       # resnet50, efficientnet_lite0, vit_small
    python bench/speed.py --device cuda --amp bf16
    python bench/speed.py --quick               # seconds: the CI smoke run

Peak training memory on the CPU is the growth of the resident set of a fresh child
process from before the model is built through two steps (VmHWM); on CUDA it is
torch's allocator peak over the same span. Both methods learn the same 10-class head.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision
from _common import interleaved_seconds, markdown_table, median_seconds, write_results
from torch import nn
from torch.nn.utils import parametrize

from piggyback import PiggybackModel, read_task_file
from piggyback.backbones import create_backbone

BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet50": lambda size: torchvision.models.resnet50(),
    "efficientnet_lite0": lambda size: create_backbone("efficientnet_lite0"),
    "vit_small": lambda size: timm.create_model("vit_small_patch16_224", img_size=size),
}
KEEP = 0.95  # masks keep ~95% of the weights, as trained masks do
CLASSES = 10  # the head both training methods learn


def build(name: str, size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name](size).to(device).eval()


def random_masks(model: PiggybackModel, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(layer.frozen.shape, generator=generator) < KEEP).to(torch.int8)
        for name, layer in model.masked_layers.items()
    }


def autocast(device: torch.device, amp: str | None) -> AbstractContextManager:
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


# ------------------------------------------------------------------ training
def training_setup(
    name: str, method: str, size: int, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Either method as it trains a 10-class task: fine-tuning a copy with a new 10-class
    head, or the default recipe's scores, norms and 10-class head on the frozen backbone."""
    return method_setup(build(name, size, device), method)


def method_setup(backbone: nn.Module, method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`training_setup` for a backbone already built (and on its device)."""
    if method == "finetune":
        if hasattr(backbone, "reset_classifier"):  # timm
            backbone.reset_classifier(CLASSES)
        else:  # torchvision's ResNet
            device = backbone.fc.weight.device
            backbone.fc = nn.Linear(backbone.fc.in_features, CLASSES, device=device)
        backbone.requires_grad_(True)
        return backbone.train(), torch.optim.Adam(backbone.parameters(), lr=1e-4)
    model = PiggybackModel(backbone)
    model.add_task("task", CLASSES)
    model.set_task("task").train()
    return model, torch.optim.Adam(model.trainable_parameters("task"), lr=1e-4)


def train_step_fn(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: int, size: int, args: Any
) -> Callable[[], None]:
    device = torch.device(args.device)
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def held_bytes(device: torch.device) -> int:
    """What this process holds where the tasks live: torch's allocated memory on a GPU
    (the tasks' bits, heads and norms are there), the resident set on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return rss_bytes()


def release_free_memory() -> None:
    """Hand the memory that malloc holds free back to the system (glibc), so that the
    resident set grows with what is allocated next."""
    with suppress(OSError, AttributeError):  # not glibc: the growth may read low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> None:
    """Start the high-water mark afresh (Linux >= 4.0), so imports do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM). Not ru_maxrss: a child process
    inherits its parent's ru_maxrss through fork and exec, which hid every child's own peak
    behind the parent's (all six measured the same 2,128 MB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_train_memory(args: argparse.Namespace) -> None:
    """In a fresh process: peak memory growth from before the model is built through two
    training steps, so it counts everything the method allocates (weights, scores,
    gradients, optimizer state, activations)."""
    reset_peak_rss()
    before = rss_bytes()
    model, optimizer = training_setup(args.child, args.method, args.size, torch.device("cpu"))
    step = train_step_fn(model, optimizer, args.batch, args.size, args)
    step()
    step()
    print(json.dumps({"peak_growth": peak_rss_bytes() - before}))


def train_memory(name: str, method: str, args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model, optimizer = training_setup(name, method, args.size, device)
        step = train_step_fn(model, optimizer, args.batch, args.size, args)
        step()
        step()
        return torch.cuda.max_memory_allocated() - before
    command = [sys.executable, __file__, "--child", name, "--method", method,
               "--size", str(args.size), "--batch", str(args.batch)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def bench_training(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    times = {}
    for method in ("finetune", "piggyback"):
        model, optimizer = training_setup(name, method, args.size, device)
        step = train_step_fn(model, optimizer, args.batch, args.size, args)
        times[method] = median_seconds(step, device, args.repeat)
        del model, optimizer
    memory = {method: train_memory(name, method, args) for method in ("finetune", "piggyback")}
    return {
        "finetune_step_s": times["finetune"],
        "mask_step_s": times["piggyback"],
        "step_time_ratio": times["piggyback"] / times["finetune"],
        "finetune_peak_mb": memory["finetune"] / 2**20,
        "mask_peak_mb": memory["piggyback"] / 2**20,
        "peak_memory_ratio": memory["piggyback"] / max(memory["finetune"], 1),
    }


# ----------------------------------------------------------------- inference
class FixedMask(nn.Module):
    """The parametrize reference: W * mask recomputed on every access."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def parametrized(backbone: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    reference = copy.deepcopy(backbone)
    for name, mask in masks.items():
        layer = reference.get_submodule(name)
        parametrize.register_parametrization(layer, "weight", FixedMask(mask.to(layer.weight)))
    return reference


def add_switching_tasks(model: PiggybackModel) -> dict[str, torch.Tensor]:
    """Tasks "task", "other1" and "other2" (random masks, the plain model's head), for
    `masked_forwards`; returns the masks of "task"."""
    masks = random_masks(model, seed=1)
    num_classes = model.head.base_layer.weight.shape[0]  # same head size as the plain model
    for task, seed in (("task", 1), ("other1", 4), ("other2", 5)):
        model.add_task(task, num_classes, masks=masks if seed == 1 else random_masks(model, seed))
        with torch.no_grad():
            model.head.heads[task].load_state_dict(model.head.base_layer.state_dict())
    return masks


def masked_forwards(model: PiggybackModel, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The masked model's forward of a task whose W * mask is cached ("cached"), and of a
    task it switches to before every batch ("rederived"): "task" stays cached; "other1"
    and "other2" take turns in the weight cache's second slot, each derived afresh into
    the memory of the one before (`add_switching_tasks` adds them)."""
    model.weight_cache_size = 2
    turn = ["other2"]

    def cached() -> Any:
        model.set_task("task")
        return model(x)

    def rederived() -> Any:
        turn[0] = "other1" if turn[0] == "other2" else "other2"
        model.set_task(turn[0])
        return model(x)

    return {"cached": cached, "rederived": rederived}


def inference(fn: Callable[[], Any], device: torch.device, amp: str | None) -> Callable[[], None]:
    """`fn` without autograd, under autocast when `amp` is set."""

    def run() -> None:
        with torch.no_grad(), autocast(device, amp):
            fn()

    return run


def bench_inference(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    backbone = build(name, args.size, device)
    model = PiggybackModel(backbone).to(device).eval()
    masks = add_switching_tasks(model)
    plain = model.base.to(device).eval()
    baked = model.bake("task").to(device)
    reference = parametrized(plain, {n: m.float() for n, m in masks.items()})
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    fns = {"plain": lambda: plain(x), "baked": lambda: baked(x), **masked_forwards(model, x),
           "parametrize": lambda: reference(x)}  # fmt: skip
    times = interleaved_seconds(
        {k: inference(f, device, args.amp) for k, f in fns.items()}, device, args.repeat
    )
    base = times["plain"]
    return {
        "plain_forward_s": base,
        "baked_ratio": times["baked"] / base,
        "masked_cached_ratio": times["cached"] / base,
        "masked_rederived_ratio": times["rederived"] / base,
        "parametrize_ratio": times["parametrize"] / base,
    }


# ------------------------------------------------------------ tasks at once
def derive_all(model: PiggybackModel, task: str) -> None:
    """Make `task` ready: active, with every layer's W * mask derived (what its first
    forward would do before any convolution)."""
    model.set_task(task)
    with torch.no_grad():
        model.derive_weights(task)


def bench_switch(model: PiggybackModel, masks: dict[str, torch.Tensor], args: Any) -> dict:
    """A switch between two resident tasks against its floor: writing every masked
    weight of the backbone once into memory that already exists (a copy; torch's on
    both cores or numpy's on one, whichever is faster)."""
    device = torch.device(args.device)
    for task in ("switch_a", "switch_b"):
        model.add_task(task, 10, masks=masks)
    model.to(device).eval()
    weights = [layer.frozen for layer in model.masked_layers.values()]
    targets = [torch.empty_like(w) for w in weights]
    turn = ["switch_a"]

    def switch() -> None:
        turn[0] = "switch_b" if turn[0] == "switch_a" else "switch_a"
        derive_all(model, turn[0])

    def switch_one_thread() -> None:  # what the CPU's threads bring to the switch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            switch()
        finally:
            torch.set_num_threads(threads)

    def floor() -> None:
        for target, weight in zip(targets, weights, strict=True):
            target.copy_(weight)

    def floor_numpy() -> None:
        for target, weight in zip(targets, weights, strict=True):
            np.copyto(target.numpy(), weight.numpy())

    fns = {"switch": switch, "floor": floor}
    if device.type == "cpu":
        fns["floor_numpy"] = floor_numpy
        fns["switch_one_thread"] = switch_one_thread
    times = interleaved_seconds(fns, device, 2 * args.repeat + 1)
    times["floor"] = min(times["floor"], times.get("floor_numpy", times["floor"]))
    for task in ("switch_a", "switch_b"):
        model.remove_task(task)
    return {
        "switch_ms": 1000 * times["switch"],
        "write_floor_ms": 1000 * times["floor"],
        "switch_floor_ratio": times["switch"] / times["floor"],
        **(
            {"switch_one_thread_floor_ratio": times["switch_one_thread"] / times["floor"]}
            if "switch_one_thread" in times
            else {}
        ),
    }


def bench_load(model: PiggybackModel, masks: dict[str, torch.Tensor], args: Any) -> dict:
    """A task file to ready weights: reading it (with its checksum and header checks),
    loading it (checks against the model, decoding, adding), then a switch to it."""
    model.add_task("file", 10, masks=masks)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_task("file", Path(tmp) / "file.safetensors")
        model.remove_task("file")
        file_bytes = path.stat().st_size
        read_s, load_s, ready_s = [], [], []
        for index in range(args.repeat + 1):
            start = time.perf_counter()
            read_task_file(path)
            read_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            task = model.load_task(path, name=f"loaded{index}")
            load_s.append(time.perf_counter() - start)
            derive_all(model, task)
            ready_s.append(time.perf_counter() - start)
            model.set_task(None)
            model.remove_task(task)
    return {
        "task_file_kb": file_bytes / 1024,
        "read_ms": 1000 * min(read_s[1:]),
        "load_ms": 1000 * min(load_s[1:]),
        "file_to_ready_ms": 1000 * min(ready_s[1:]),
    }


def bench_tasks(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = PiggybackModel(build(name, args.size, device)).eval()
    masks = random_masks(model, seed=2)
    row = {**bench_load(model, masks, args), **bench_switch(model, masks, args)}
    row["file_to_ready_target_ms"] = 20 + row["switch_ms"]
    row.update(mixed_batch(model, masks, args))
    if name in args.resident_models:
        row.update(resident_memory(model, masks, args.resident))
    return row


def mixed_batch(
    model: PiggybackModel, masks: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """One batch of 8 tasks against 8 single-task forwards of the same samples, each
    task's weights derived afresh in both (they take turns)."""
    device = torch.device(args.device)
    tasks = [f"mix{i}" for i in range(8)]
    for task in tasks:
        model.add_task(task, 10, masks=masks)
    model.to(device).eval()
    per_task = max(1, args.batch // 8)
    x = torch.randn(per_task * 8, 3, args.size, args.size, device=device)
    names = [task for task in tasks for _ in range(per_task)]

    def separately() -> None:
        for index, task in enumerate(tasks):
            model.set_task(task)
            model(x[index * per_task : (index + 1) * per_task])

    def mixed() -> None:
        model(x, task_names=names)

    with torch.no_grad(), autocast(device, args.amp):
        times = interleaved_seconds({"mixed": mixed, "separate": separately}, device, args.repeat)
    for task in tasks:
        model.remove_task(task)
    return {"mixed8_s": times["mixed"], "mixed8_ratio": times["mixed"] / times["separate"]}


def bytes_by_task(model: PiggybackModel, tasks: set[str]) -> dict[str, int]:
    """Bytes of every tensor in the model's state that belongs to one of `tasks` (its
    masks, head and norm layers), whatever the layout that holds them; each tensor once
    (the state_dict has a task's head twice: as the model's `head` and in the backbone)."""
    held = dict.fromkeys(tasks, 0)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        for part in tasks.intersection(key.split(".")):
            held[part] += value.numel() * value.element_size()
    return held


def resident_memory(
    model: PiggybackModel, masks: dict[str, torch.Tensor], counts: list[int]
) -> dict[str, Any]:
    """What N tasks loaded from task files (as a server holds them; default recipe: each
    with its own norm layers) add beside the backbone: their tensors' bytes, and the
    growth of what the process holds where they live (`held_bytes`: the resident set, or
    the GPU's allocated memory) against the issue's budget N x (bits/8 x masked weights
    + head + norms)."""
    device = next(model.parameters()).device
    backbone_bytes = sum(t.numel() * t.element_size() for t in model.base.state_dict().values())
    masked = sum(layer.frozen.numel() for layer in model.masked_layers.values())
    row: dict[str, Any] = {"backbone_mb": backbone_bytes / 2**20}
    model.add_task("resident", 10, masks=masks)
    per_task = bytes_by_task(model, {"resident"})["resident"]
    heads_norms = per_task - math.ceil(masked / 8)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_task("resident", Path(tmp) / "resident.safetensors")
        model.remove_task("resident")
        gc.collect()
        release_free_memory()  # else the tasks fill what the parts before freed, unseen
        before, added = held_bytes(device), 0
        for count in sorted(counts):
            while added < count:
                model.load_task(path, name=f"resident{added}")
                added += 1
            grown = held_bytes(device) - before
            held = sum(bytes_by_task(model, {f"resident{i}" for i in range(count)}).values())
            row[f"tasks{count}_mb"] = held / 2**20
            row[f"tasks{count}_rss_mb"] = grown / 2**20
            row[f"tasks{count}_rss_budget_ratio"] = grown / (count * per_task)
            row[f"tasks{count}_bits_per_weight"] = (
                8 * (held - count * heads_norms) / (count * masked)
            )
    for index in range(added):
        model.remove_task(f"resident{index}")
    return row


TARGETS = [  # figure, target on the CPU, target on CUDA (the list)
    ("masked_rederived_ratio", "<= 1.15 (batch 16)", "<= 1.15 (bf16, batch 64)"),
    ("switch_floor_ratio", "<= 1.5 (ResNet-50)", "switch_ms <= 2 (ResNet-50)"),
    ("file_to_ready_ms", "<= 20 + switch_ms (ResNet-50)", "<= 10 (ResNet-50)"),
    ("mixed8_ratio", "<= 1.05", "<= 1.3 at batch 16, <= 1.1 at batch 64"),
    ("tasks1000_rss_budget_ratio", "<= 1.1 (EfficientNet-Lite0)", "<= 1.1"),
]
CUDA_COMMANDS = [
    "python bench/speed.py --device cuda --amp bf16 --batch 64 --parts inference tasks "
    "--models resnet50 efficientnet_lite0 --resident-models efficientnet_lite0 "
    "--out bench/results/speed-cuda-b64.json",
    "python bench/speed.py --device cuda --amp bf16 --batch 16 --parts tasks "
    "--models resnet50 efficientnet_lite0 --resident-models "
    "--out bench/results/speed-cuda-b16.json",
]


def target_rows(results: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Each figure of the issue's target list beside its target, per model measured."""
    rows = []
    for figure, cpu, cuda in TARGETS:
        for result in results:
            if figure in result:
                target = cuda if device == "cuda" else cpu
                rows.append({"figure": figure, "model": result["model"], "target": target,
                             "measured": result[figure]})  # fmt: skip
    return rows


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--resident", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--resident-models", nargs="*", default=["efficientnet_lite0"])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--out", default="bench/results/speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeat, args.resident = 32, 8, 1, [1, 3]
        args.resident_models = args.models
    return args


PARTS: dict[str, Callable[[str, argparse.Namespace], dict[str, Any]]] = {
    "training": bench_training,
    "inference": bench_inference,
    "tasks": bench_tasks,
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_train_memory(args)
        return
    results = []
    for name in args.models:
        print(f"== {name}", flush=True)
        row: dict[str, Any] = {"model": name}
        for part in args.parts:
            row.update(PARTS[part](name, args))
        results.append(row)
    resident = [f"tasks{n}_{what}" for n in args.resident for what in ("mb", "rss_mb")]
    tables = {
        "training step (ratio to full fine-tuning)": [
            "model", "finetune_step_s", "mask_step_s", "step_time_ratio",
            "finetune_peak_mb", "mask_peak_mb", "peak_memory_ratio",
        ],
        "inference (ratio to the plain backbone)": [
            "model", "plain_forward_s", "baked_ratio", "masked_cached_ratio",
            "masked_rederived_ratio", "parametrize_ratio",
        ],
        "tasks": [
            "model", "task_file_kb", "read_ms", "load_ms", "file_to_ready_ms", "switch_ms",
            "write_floor_ms", "switch_floor_ratio", "switch_one_thread_floor_ratio",
            "mixed8_ratio",
        ],
        "resident tasks": [
            "model", "backbone_mb", *resident, f"tasks{args.resident[-1]}_rss_budget_ratio",
            f"tasks{args.resident[-1]}_bits_per_weight",
        ],
    }  # fmt: skip
    settings = {k: getattr(args, k) for k in ("size", "batch", "repeat", "device", "amp")}
    print(f"\nsettings: {settings}")
    for title, columns in tables.items():
        if any(column in row for row in results for column in columns[1:]):
            print(f"\n### {title}\n\n{markdown_table(results, columns)}")
    targets = target_rows(results, args.device)
    print(f"\n### targets\n\n{markdown_table(targets, ['figure', 'model', 'target', 'measured'])}")
    if args.device != "cuda":
        print("\nCUDA rows: " + "\n           ".join(CUDA_COMMANDS))
    payload = {"settings": settings, "results": results, "targets": targets}
    print(f"\nwrote {write_results(args.out, payload)}")


if __name__ == "__main__":
    main()
