"""Serving throughput and latency, 1 vs 20 tasks in the request mix, on loopback.

Starts `piggyback serve` in a subprocess (as a user would), uploads 20 task files with
random masks through `POST /tasks`, then keeps `--clients` concurrent HTTP clients busy
with one-image predictions: first all for one task, then spread over 20. Prints a
markdown table and, with `--out`, writes the numbers as JSON. `--quick` is a tiny smoke
run for CI.

    python bench/serve.py --out runs/bench-serve.json
    python bench/serve.py --device cuda --amp bf16 --out bench/results/serve-cuda.json
    python bench/serve.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from _common import markdown_table, median_seconds, write_results
from PIL import Image
from safetensors.torch import save_file

from piggyback import MaskConfig, PiggybackModel
from piggyback.backbones import create_backbone
from piggyback.precision import autocast
from piggyback.train import resolve_device

MIXES = (1, 20)
ADMIN_TOKEN = secrets.token_hex(16)  # uploads need one: writes are off without it


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224, help="input size the tasks record")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per mix")
    parser.add_argument("--cache-size", type=int, default=4)
    parser.add_argument("--images-per-thread", type=int, default=2, help="the server's flag")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads, server and baseline")
    parser.add_argument("--device", default="auto", help="the server's --device")
    parser.add_argument("--amp", choices=("bf16", "fp16"), help="the server's --amp")
    parser.add_argument("--quick", action="store_true", help="tiny backbone and run (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.clients, args.requests = "timm:test_efficientnet", 32, 8, 80
    return args


def write_backbone(backbone: str, directory: Path) -> tuple[torch.nn.Module, Path]:
    """The backbone, with its weights in a file so the server rebuilds exactly it."""
    torch.manual_seed(0)
    net = create_backbone(backbone)
    weights = directory / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return net, weights


def write_tasks(
    net: torch.nn.Module, metadata: dict[str, Any], count: int, out: Path
) -> list[Path]:
    """`count` tasks with random masks (~5% of the weights dropped) and random heads, each
    recording `metadata` (backbone name, input size, ...)."""
    model = PiggybackModel(net, MaskConfig())
    paths = []
    for index in range(count):
        name = f"task{index:02d}"
        model.add_task(name, 10, metadata=metadata)
        with torch.no_grad():
            for layer in model.masked_layers.values():
                layer.scores[name].uniform_(0.004, 0.024)  # threshold 0.005: ~5% dropped
        model.freeze_task(name)
        paths.append(model.save_task(name, out / f"{name}.safetensors"))
    return paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(
    args: argparse.Namespace, directory: Path, weights: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `piggyback serve` on an empty task folder (tasks are uploaded); yields its URL
    and process."""
    port = free_port()
    (directory / "served").mkdir()
    command = [
        sys.executable, "-m", "piggyback", "serve", "--tasks", str(directory / "served"),
        "--backbone", args.backbone, "--weights", str(weights), "--port", str(port),
        "--cache-size", str(args.cache_size), "--images-per-thread", str(args.images_per_thread),
        "--batch-window-ms", str(args.batch_window_ms),
        "--max-batch", str(args.max_batch), "--admin-token", ADMIN_TOKEN,
        "--device", args.device, *(["--amp", args.amp] if args.amp else []),
    ]  # fmt: skip
    with (directory / "server.log").open("w") as log:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            process.wait(timeout=30)


def wait_until_up(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    """Wait for `/health` to answer; exit with the server's log if it does not start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the server did not start:\n{log.read_text()}")


def png(size: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


async def load(url: str, plan: list[tuple[str, bytes]], clients: int) -> dict[str, Any]:
    """Send `plan` with `clients` requests in flight; latency of each, wall time of all."""
    queue = iter(plan)
    latencies: list[float] = []
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for task, image in queue:
            start = time.perf_counter()
            response = await http.post(
                "/predict", data={"task": task}, files={"images": ("i.png", image, "image/png")}
            )
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(plan),
        "errors": errors,
        "seconds": round(seconds, 3),
        "req_per_s": round(len(plan) / seconds, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
    }


def run_mix(url: str, args: argparse.Namespace, mix: int, images: list[bytes]) -> dict[str, Any]:
    rng = random.Random(mix)
    tasks = [f"task{index:02d}" for index in range(mix)]
    warmup = [(task, images[0]) for task in tasks for _ in range(2)]
    asyncio.run(load(url, warmup, args.clients))
    before = httpx.get(f"{url}/health").json()
    plan = [(rng.choice(tasks), rng.choice(images)) for _ in range(args.requests)]
    row = {"tasks": mix, "clients": args.clients, **asyncio.run(load(url, plan, args.clients))}
    after = httpx.get(f"{url}/health").json()
    row["mean_batch"] = round(
        (after["images"] - before["images"]) / max(after["batches"] - before["batches"], 1), 2
    )
    return row


def plain_forward_ms(args: argparse.Namespace) -> float:
    """One image through the plain backbone in this process, on the server's device and
    precision: the speed to compare with."""
    device = resolve_device(args.device)
    net = create_backbone(args.backbone).eval().to(device)
    x = torch.randn(1, 3, args.size, args.size, device=device)
    with torch.no_grad(), autocast(device, args.amp):
        seconds = median_seconds(lambda: net(x), device, repeat=10)
    return round(1000 * seconds, 2)


COLUMNS = ("tasks", "clients", "requests", "errors", "req_per_s", "p50_ms", "p99_ms", "mean_batch")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = [png(args.size + 32, seed) for seed in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        net, weights = write_backbone(args.backbone, directory)
        with server(args, directory, weights) as (url, process):
            # Written while the server starts, then uploaded as a user would.
            recorded = {"backbone": args.backbone, "size": args.size}
            files = write_tasks(net, recorded, max(MIXES), directory / "tasks")
            wait_until_up(url, process, directory / "server.log")
            for path in files:
                headers = {
                    "content-type": "application/octet-stream",
                    "authorization": f"Bearer {ADMIN_TOKEN}",
                }
                httpx.post(
                    f"{url}/tasks", content=path.read_bytes(), headers=headers
                ).raise_for_status()
            rows = [run_mix(url, args, mix, images) for mix in MIXES]
    keys = ("backbone", "size", "cache_size", "images_per_thread", "batch_window_ms",
            "max_batch", "threads", "device", "amp")  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    plain = plain_forward_ms(args)
    mix_ratio = round(rows[-1]["req_per_s"] / rows[0]["req_per_s"], 3)
    print(
        f"{args.backbone} at {args.size} px on {args.device} (amp {args.amp}), cache "
        f"{args.cache_size}, {args.images_per_thread} images per thread, window "
        f"{args.batch_window_ms} ms; one image through the plain "
        f"backbone: {plain} ms\n"
    )
    print(markdown_table(rows, COLUMNS))
    print(f"\nrequests/s, {MIXES[-1]}-task mix / single task: {mix_ratio} (issue 18: >= 0.8)")
    if args.out:
        payload = {"settings": settings, "plain_forward_ms": plain, "rows": rows,
                   "mix_ratio": mix_ratio}  # fmt: skip
        write_results(args.out, payload)


if __name__ == "__main__":
    main()
