"""What every benchmark script shares: timing, hardware, the table, the JSON file."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from piggyback.store import write_atomic


def hardware() -> dict[str, Any]:
    """The machine a result was measured on, recorded beside every number."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], Any], device: torch.device, repeat: int = 5, warmup: int = 1
) -> float:
    """Median wall time of `fn` over `repeat` runs after `warmup` untimed ones."""
    return interleaved_seconds({"fn": fn}, device, repeat, warmup)["fn"]


def interleaved_seconds(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each of `fns`, run in turns (A, B, A, B...) so that a machine
    whose speed drifts (other processes, clocks) moves every figure alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a markdown table; floats get 3 significant decimals, missing cells stay empty."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_run(args: Any, payload: dict[str, Any]) -> None:
    """Write a script's results to `args.out` with its settings (every argument but the
    path), and say where."""
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    print(f"\nwrote {write_results(args.out, {'settings': settings, **payload})}")


def write_results(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write the JSON result atomically, with the hardware and the command that made it."""
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["python", *sys.argv]), "hardware": hardware(), **payload}
    write_atomic(path, json.dumps(payload, indent=2).encode())
    return path


def profile_parser(
    doc: str, models: Iterable[str], *, model: str, top: int, out: str
) -> argparse.ArgumentParser:
    """The options every bench/profile_*.py takes (which model, its input size, the
    device, how many of the costliest entries to list, the JSON file, --quick); each
    script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=model, choices=list(models))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top", type=int, default=top)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=out)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    return parser
