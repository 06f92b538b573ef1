"""The server against hostile task files and load: issue 12's definition of done.

Starts `piggyback serve` (a subprocess, as a user would) on a folder of good tasks, uploads
one task file of each bad kind (each must be refused with a 4xx, or, for a wrong backbone
name or weights path on the right backbone, accepted and served), then sends 1,000 mixed
predictions from 64 concurrent clients, a tenth of them bad requests, while 100 clients
trickle request heads. It reads the server's memory (VmRSS, VmHWM) after the uploads and
after each half of the load, then restarts the server on the same folder, without and
with --backbone/--weights, and once more after damaged copies of the bad files were put
into the folder: each start must serve every good task and skip only the damaged files.
Prints markdown tables; with `--out`, writes the numbers as JSON. `--quick`: a tiny run.

    python bench/serve_hostile.py --out bench/results/serve-hostile.json
    python bench/serve_hostile.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import torch
from _common import markdown_table, write_results
from safetensors.torch import save as safetensors_save
from serve import free_port, png, wait_until_up, write_backbone, write_tasks

from piggyback import MaskConfig, PiggybackModel, read_task_file
from piggyback.backbones import create_backbone
from piggyback.store import FORMAT, write_task_file

TOKEN = secrets.token_hex(16)
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = "application/json"
HEADER_TIMEOUT = 2  # seconds the server gives a request head
PARTS = 4  # memory is read after each part of the load


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=64, help="input size the tasks record")
    parser.add_argument("--tasks", type=int, default=8, help="good tasks in the folder")
    parser.add_argument("--requests", type=int, default=1000, help="predictions under load")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--slow-clients", type=int, default=100, help="trickling request heads")
    parser.add_argument("--quick", action="store_true", help="tiny backbone and run (CI)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.size, args.tasks, args.requests = "timm:test_efficientnet", 32, 3, 120
        args.clients, args.slow_clients = 16, 20
    return args


# ----------------------------------------------------------------- bad files
def craft(good: Path, **changes: Any) -> bytes:
    """`good` with its metadata edited and signed again (checksum), as a forger would."""
    meta, tensors = read_task_file(good)
    with tempfile.TemporaryDirectory() as tmp:
        return write_task_file(
            Path(tmp) / "t.safetensors", {**meta, **changes}, tensors
        ).read_bytes()


def with_header(tensors: dict[str, torch.Tensor], text: str) -> bytes:
    """A task file whose JSON header is `text` (which the parser refuses)."""
    return safetensors_save(tensors, metadata={"format": FORMAT, "piggyback": text})


def bad_files(good: Path, other_backbone: bytes) -> list[tuple[str, bytes, bool]]:
    """(kind, file bytes, whether the server should accept it): renamed copies of `good`."""
    meta, tensors = read_task_file(good)
    extra = meta.get("metadata") or {}
    data = good.read_bytes()

    def renamed(suffix: str, **changes: Any) -> bytes:
        return craft(good, **{"task": f"{meta['task']}-{suffix}", **changes})

    deep = json.dumps(meta)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    fingerprint = {**meta["backbone"], "fingerprint": 7}
    return [
        ("truncated file", data[: len(data) // 2], False),
        ("bad JSON", with_header(tensors, "{not json"), False),
        ("nested JSON", with_header(tensors, deep), False),
        ("huge input size", renamed("huge", metadata={**extra, "size": 1500}), False),
        ("integer fingerprint", renamed("fp", backbone=fingerprint), False),
        ("huge mask numel", renamed("numel", mask={**meta["mask"], "numel": 10**12}), False),
        ("wrong num_classes", renamed("classes", num_classes=meta["num_classes"] + 5), False),
        ("huge num_classes", renamed("classes9", num_classes=10**9), False),
        ("other backbone", other_backbone, False),
        (
            "backbone name resnet18",
            renamed("r18", metadata={**extra, "backbone": "resnet18"}),
            True,
        ),
        (
            "weights /nonexistent",
            renamed("nowt", metadata={**extra, "weights": "/nonexistent"}),
            True,
        ),
    ]


def other_backbone_task(backbone: str, directory: Path) -> bytes:
    """A valid task file for another instance of the backbone (other weights)."""
    torch.manual_seed(1)
    net = create_backbone(backbone)
    with torch.no_grad():
        next(iter(net.parameters())).add_(1.0)  # the embedded default loads fixed weights
    model = PiggybackModel(net, MaskConfig())
    model.add_task("other", 10)
    model.freeze_task("other")
    return model.save_task("other", directory / "other.safetensors").read_bytes()


def upload_all(url: str, files: list[tuple[str, bytes, bool]]) -> list[dict[str, Any]]:
    """Upload each file over one keep-alive connection; did each get the status it should?"""
    rows = []
    headers = {"content-type": "application/octet-stream", **AUTH}
    with httpx.Client(base_url=url, timeout=120) as client:
        for kind, data, accept in files:
            start = time.perf_counter()
            try:
                response = client.post("/tasks", content=data, headers=headers)
            except httpx.TransportError as exc:  # the server dropped the connection
                status, said = 0, f"{type(exc).__name__}: {exc}"
            else:
                status, said = response.status_code, answer(response)
            rows.append({
                "kind": kind,
                "status": status,
                "expected": "201" if accept else "4xx",
                "ok": status == 201 if accept else 400 <= status < 500,
                "ms": round(1000 * (time.perf_counter() - start), 1),
                "answer": said,
            })  # fmt: skip
    return rows


def answer(response: httpx.Response) -> str:
    """The server's error message, or the name of the task it added."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error", body.get("name")))


# ---------------------------------------------------------------------- load
def requests_plan(tasks: list[str], size: int, count: int) -> list[tuple[str, dict[str, Any]]]:
    """`count` predictions over `tasks` and image sizes; one in ten is a bad request."""
    rng = random.Random(0)
    images = [png(size + extra, seed) for seed, extra in enumerate([0, 16, 48, 200])]
    bad: list[tuple[str, dict[str, Any]]] = [
        ("unknown task", {"data": {"task": "nope"}, "files": {"images": images[0]}}),
        ("not an image", {"data": {"task": tasks[0]}, "files": {"images": b"garbage"}}),
        ("nested JSON", {"content": b"[" * 50_000, "headers": {"content-type": JSON}}),
        ("bad base64", {"json": {"task": tasks[0], "images": ["%%"]}}),
    ]  # fmt: skip
    plan = []
    for index in range(count):
        if index % 10 == 9:
            plan.append(rng.choice(bad))
            continue
        task, chosen = rng.choice(tasks), rng.sample(images, rng.randint(1, 3))
        if rng.random() < 0.5:
            plan.append(("ok", {"data": {"task": task}, "files": [("images", i) for i in chosen]}))
        else:
            encoded = [base64.b64encode(i).decode() for i in chosen]
            plan.append(("ok", {"json": {"task": task, "images": encoded}}))
    return plan


async def send_all(url: str, plan: list[tuple[str, dict[str, Any]]], clients: int) -> Counter[str]:
    """Send `plan` with `clients` in flight; count outcomes: as expected or not."""
    queue = iter(plan)
    outcomes: Counter[str] = Counter()

    async def client(http: httpx.AsyncClient) -> None:
        for kind, request in queue:
            try:
                response = await http.post("/predict", **request)
            except httpx.TransportError as exc:
                outcomes[f"transport error {type(exc).__name__}"] += 1
                continue
            good = response.status_code == 200 if kind == "ok" else response.status_code < 500
            outcomes["as expected" if good else f"{kind}: {response.status_code}"] += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return outcomes


@contextmanager
def predicting(url: str, task: str, image: bytes) -> Iterator[list[float]]:
    """One client predicting in a loop meanwhile; yields its latencies (seconds)."""
    latencies: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.post("/predict", data={"task": task}, files={"images": image})
                latencies.append(time.perf_counter() - start)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join()


@contextmanager
def slow_clients(url: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send half a request head and stop."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def dropped(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has closed."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        with suppress(BlockingIOError):
            count += sock.recv(1) == b""
    return count


def snapshot(url: str, pid: int) -> dict[str, float]:
    """The server's resident memory now and at its peak (MB, from /proc: no psutil), and
    how many tasks it keeps baked (each a copy of the backbone)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    memory = {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}
    return {**memory, "baked": len(httpx.get(f"{url}/health").json()["cached"])}


# ------------------------------------------------------------------- servers
@contextmanager
def server(directory: Path, log: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """`piggyback serve` on `directory`; yields its URL and process id once it answers."""
    port = free_port()
    command = [
        sys.executable, "-m", "piggyback", "serve", "--tasks", str(directory), "--port",
        str(port), "--admin-token", TOKEN, "--header-timeout", str(HEADER_TIMEOUT), *flags,
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def restart_check(
    directory: Path, log: Path, expected: set[str], skipped: set[str], *flags: str
) -> dict[str, Any]:
    """Start on `directory`: does it serve `expected`, skip `skipped`, and answer each?"""
    start = time.perf_counter()
    with server(directory, log, *flags) as (url, _):
        seconds = time.perf_counter() - start
        listing = httpx.get(f"{url}/tasks").json()
        served = {t["name"] for t in listing["tasks"]}
        image = png(64, 0)
        answered = sum(
            httpx.post(f"{url}/predict", data={"task": t}, files={"images": image}).status_code
            == 200
            for t in served
        )
    skipped_files = {s["file"] for s in listing["skipped"]}
    return {
        "start": "with --backbone/--weights" if flags else "files vote",
        "damaged_files": len(skipped),
        "served": len(served),
        "answered": answered,
        "skipped": len(skipped_files),
        "start_s": round(seconds, 1),
        "ok": served == expected and skipped_files == skipped and answered == len(served),
    }


def say(text: str) -> None:
    print(f"{time.strftime('%X')} {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    net, weights = write_backbone(args.backbone, work)
    folder = work / "tasks"
    recorded = {"backbone": args.backbone, "size": args.size, "weights": str(weights)}
    good = write_tasks(net, recorded, args.tasks, folder)
    names = {path.stem for path in good}
    files = bad_files(good[0], other_backbone_task(args.backbone, work))
    flags = ("--backbone", args.backbone, "--weights", str(weights))

    with server(folder, work / "server.log") as (url, pid):
        memory = {"started": snapshot(url, pid)}
        say("uploading one file of each bad kind, predicting meanwhile")
        with predicting(url, sorted(names)[0], png(args.size, 0)) as latencies:
            uploads = upload_all(url, files)
        memory["after uploads"] = snapshot(url, pid)
        plan = requests_plan(sorted(names), args.size, args.requests)
        asyncio.run(send_all(url, plan[: args.clients], args.clients))  # warm up
        memory["after warm-up"] = snapshot(url, pid)
        outcomes: Counter[str] = Counter()
        with slow_clients(url, args.slow_clients) as socks:
            start = time.perf_counter()
            for number in range(1, PARTS + 1):
                part = plan[(number - 1) * len(plan) // PARTS : number * len(plan) // PARTS]
                say(f"load: {len(part)} predictions, {args.clients} clients ({number}/{PARTS})")
                outcomes += asyncio.run(send_all(url, part, args.clients))
                memory[f"after {number * len(plan) // PARTS} predictions"] = snapshot(url, pid)
            seconds = time.perf_counter() - start
            time.sleep(max(0.0, HEADER_TIMEOUT + 1 - seconds))
            slow_dropped = dropped(socks)
        health = httpx.get(f"{url}/health").json()
    during_uploads = {
        "predictions": len(latencies),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "max_ms": round(1000 * max(latencies), 1),
    }
    load = {
        "requests": len(plan),
        "clients": args.clients,
        "bad_requests": sum(kind != "ok" for kind, _ in plan),
        "as_expected": outcomes.pop("as expected", 0),
        "unexpected": dict(outcomes),
        "seconds": round(seconds, 2),
        "req_per_s": round(len(plan) / seconds, 1),
        "slow_clients": args.slow_clients,
        "slow_clients_dropped": slow_dropped,
        "batches": health["batches"],
    }

    say("restarting on the same folder")
    accepted = names | {f"{good[0].stem}-r18", f"{good[0].stem}-nowt"}
    restarts = [
        restart_check(folder, work / "restart1.log", accepted, set()),
        restart_check(folder, work / "restart2.log", accepted, set(), *flags),
    ]
    damaged = {
        f"damaged-{i:02d}.safetensors": data for i, (_, data, ok) in enumerate(files) if not ok
    }
    for name, data in damaged.items():
        (folder / name).write_bytes(data)
    restarts.append(restart_check(folder, work / "restart3.log", accepted, set(damaged)))
    return {
        "uploads": uploads,
        "predictions_during_uploads": during_uploads,
        "load": load,
        "memory_mb": memory,
        "restarts": restarts,
    }


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    settings = {k: getattr(args, k) for k in ("backbone", "size", "tasks", "requests", "clients")}
    memory = [{"when": when, **mb} for when, mb in result["memory_mb"].items()]
    print(f"{args.backbone} at {args.size} px, {args.tasks} good tasks\n")
    uploads = [{**row, "ok": "yes" if row["ok"] else "NO"} for row in result["uploads"]]
    print(markdown_table(uploads, ("kind", "status", "expected", "ok", "ms")))
    during = result["predictions_during_uploads"]
    print(
        f"\n{during['predictions']} predictions during the uploads: median "
        f"{during['p50_ms']} ms, slowest {during['max_ms']} ms\n"
    )
    load = {**result["load"], "unexpected": sum(result["load"]["unexpected"].values())}
    columns = ("requests", "clients", "bad_requests", "as_expected", "unexpected", "req_per_s")
    print(markdown_table([load], (*columns, "slow_clients", "slow_clients_dropped")))
    print()
    print(markdown_table(memory, ("when", "VmRSS", "VmHWM", "baked")))
    print()
    restart_columns = ("start", "damaged_files", "served", "answered", "skipped", "start_s", "ok")
    restarts = [{**row, "ok": "yes" if row["ok"] else "NO"} for row in result["restarts"]]
    print(markdown_table(restarts, restart_columns))
    passed = (
        all(row["ok"] for row in result["uploads"] + result["restarts"])
        and not result["load"]["unexpected"]
    )
    print(f"\n{'PASS' if passed else 'FAIL'}: the server survived and restarts cleanly")
    if args.out:
        write_results(args.out, {"settings": settings, "passed": passed, **result})
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
