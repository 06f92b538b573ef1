"""Hostile task files: a seeded, structure-aware fuzz of loading and inspecting them.

Three real task files (a binary mask with its own norm layers, a mostly-ones mask
stored sparse, a ternary mask) on a small convnet are damaged one way per case:

- bitflip, splice, truncate: raw damage to the bytes, never re-signed;
- field, drop-field: a JSON header field set to a hostile value (wrong type, huge
  number, infinity, deep nesting, long text...) or deleted, then re-signed;
- raw-json: the whole header text replaced (deep nesting, huge literals, not an
  object...), re-signed;
- tensor: the mask payload, a head or norm tensor replaced (random bytes, other
  dtype or shape, a zstd bomb, a missing or extra tensor), re-signed;
- sizes: declared sizes blown up consistently (layer shapes and numel), re-signed;
- codec: the codec or mask kind swapped, re-signed.

A re-signed file is what a forger can make; the checksum stops only accidents. Each
case is loaded onto the model (`load_task`) and inspected (`describe_task_file`).
Passing means: the only exceptions are piggyback's own errors, no case takes longer
than `--case-timeout`, the model holds no trace of a refused file, a file damaged
without re-signing never loads as anything but the original, and the process's
peak memory (VmHWM) stays under `--max-peak-mb`. Exit status 1 otherwise.

    python bench/fuzz.py --cases 20000     # the run docs/security.md reports
    python bench/fuzz.py --quick           # 300 cases: the CI smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zstandard
from _common import markdown_table, write_results
from safetensors.torch import save as safetensors_save
from torch import nn

from piggyback import MaskConfig, PiggybackModel
from piggyback.errors import PiggybackError
from piggyback.report import describe_task_file
from piggyback.store import read_task_file, write_task_file

Case = tuple[bytes, bool]  # the file's bytes; whether it was re-signed (a forgery)
HOSTILE_VALUES: list[Any] = [
    None, True, False, -1, 0, 1, 2**31, 2**63, 10**30, -(10**30), 1e308, float("inf"),
    float("-inf"), float("nan"), 0.5, "", "x" * 100_000, "\u0000", "../../etc/passwd", [], {},
    [[[[[]]]]], {"a": {"b": {}}}, [1, 2, 3], ["layer", [3, 3]], list(range(1000)),
]  # fmt: skip
RAW_HEADERS = [
    "[" * 50_000 + "]" * 50_000,
    '{"format_version": 3, "x": ' + "{" * 10_000 + "}" * 10_000 + "}",
    '{"format_version": 3, "num_classes": 1' + "0" * 5000 + "}",
    '{"format_version": 1e999}',
    '{"format_version": NaN}',
    '{"format_version": 3',
    "[]",
    "null",
    '"text"',
    "",
]


class SmallNet(nn.Module):
    """Convs (plain, depthwise), batch and layer norms, a hidden linear and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.depthwise(torch.relu(self.bn(self.stem(x))))).mean((2, 3))
        return self.fc(torch.relu(self.norm(self.hidden(x))))


def source_files(work: Path, generator: torch.Generator) -> tuple[PiggybackModel, list[Path]]:
    """The model and three task files to damage, all from seeded random masks."""
    torch.manual_seed(0)
    model = PiggybackModel(SmallNet().eval(), MaskConfig(train_bn=True))
    shapes = {name: layer.frozen.shape for name, layer in model.masked_layers.items()}
    specs = [("dense", 0.5, "binary", True), ("sparse", 0.97, "binary", False),
             ("ternary", 0.5, "ternary", False)]  # fmt: skip
    paths = []
    for name, kept, kind, own_norms in specs:
        masks = {n: torch.bernoulli(torch.full(s, kept), generator=generator)
                 for n, s in shapes.items()}  # fmt: skip
        if kind == "ternary":
            masks = {n: m - torch.bernoulli(torch.full_like(m, 0.2), generator=generator) * m * 2
                     for n, m in masks.items()}  # fmt: skip
        model.add_task(name, 5, class_names=list("abcde"), train_bn=own_norms, masks=masks,
                       mask_kind=kind, metadata={"size": 32, "backbone": "smallnet"})  # fmt: skip
        with torch.no_grad():
            for norm in model.norms.values():
                if name in norm.norms:
                    for tensor in norm.norms[name].parameters():
                        tensor.add_(torch.randn(tensor.shape, generator=generator))
        paths.append(model.save_task(name, work / f"{name}.safetensors"))
    empty = PiggybackModel(model.base, MaskConfig(train_bn=True)).eval()
    return empty, paths


# ------------------------------------------------------------------- mutators
def bitflip(rng: random.Random, data: bytes, _: Path) -> Case:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw), False


def splice(rng: random.Random, data: bytes, _: Path) -> Case:
    start = rng.randrange(len(data))
    size = rng.randint(1, 64)
    return data[:start] + rng.randbytes(size) + data[start + size :], False


def truncate(rng: random.Random, data: bytes, _: Path) -> Case:
    return data[: rng.randrange(len(data))], False


def field(rng: random.Random, _: bytes, path: Path) -> Case:
    meta, tensors = read_task_file(path)
    parent, key = rng.choice(_slots(meta))
    parent[key] = rng.choice(HOSTILE_VALUES)
    return _signed(meta, tensors), True


def drop_field(rng: random.Random, _: bytes, path: Path) -> Case:
    meta, tensors = read_task_file(path)
    parents = [(p, k) for p, k in _slots(meta) if isinstance(p, dict)]
    parent, key = rng.choice(parents)
    del parent[key]
    return _signed(meta, tensors), True


def raw_json(rng: random.Random, _: bytes, path: Path) -> Case:
    from piggyback.store import FORMAT, _header_checksum

    _, tensors = read_task_file(path)
    text = rng.choice(RAW_HEADERS)
    header = {"format": FORMAT, "piggyback": text, "checksum": _header_checksum(text, tensors)}
    return safetensors_save(tensors, metadata=header), True


def tensor(rng: random.Random, _: bytes, path: Path) -> Case:
    meta, tensors = read_task_file(path)
    key = rng.choice(sorted(tensors))
    choice = rng.randrange(7)
    if choice == 0:  # random bytes, same size
        old = tensors[key]
        noise = bytearray(rng.randbytes(old.numel() * old.element_size()))
        tensors[key] = torch.frombuffer(noise, dtype=old.dtype).reshape(old.shape)
    elif choice == 1:
        tensors[key] = tensors[key].to(rng.choice([torch.float64, torch.int64, torch.uint8]))
    elif choice == 2:
        tensors[key] = torch.zeros(rng.choice([(0,), (3,), (2, 2), (1, 1, 1, 1)]))
    elif choice == 3:
        del tensors[key]
    elif choice == 4:
        tensors[rng.choice(["extra", "head.extra", "norm.bn.extra", "norm.x.weight"])] = torch.ones(
            4
        )
    else:  # a zstd bomb: a tiny payload that inflates to 256 MB
        bomb = zstd_bomb()
        tensors["masks"] = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
        meta["mask"]["codec"] = rng.choice(["packed-zstd", "sparse-zstd"])
        meta["mask"]["payload_bytes"] = len(bomb)
    return _signed(meta, tensors), True


@functools.cache
def zstd_bomb(megabytes: int = 256) -> bytes:
    """zstd of `megabytes` of zeros (a few KB), compressed a megabyte at a time."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj(size=megabytes << 20)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(megabytes)) + compressor.flush()


def sizes(rng: random.Random, _: bytes, path: Path) -> Case:
    meta, tensors = read_task_file(path)
    layers = meta["mask"]["layers"]
    layer = rng.choice(layers)
    layer[1] = [dim * rng.choice([2, 1000, 10**6]) for dim in layer[1]]
    meta["mask"]["numel"] = sum(_numel(shape) for _, shape in layers)
    if rng.random() < 0.5:
        meta["num_classes"] = rng.choice([10**5, 10**7])
    return _signed(meta, tensors), True


def codec(rng: random.Random, _: bytes, path: Path) -> Case:
    meta, tensors = read_task_file(path)
    meta["mask"]["codec"] = rng.choice(["packed", "packed-zstd", "sparse-zstd"])
    if rng.random() < 0.5:
        meta["mask"]["kind"] = rng.choice(["binary", "ternary"])
    return _signed(meta, tensors), True


MUTATORS: dict[str, Callable[[random.Random, bytes, Path], Case]] = {
    "bitflip": bitflip, "splice": splice, "truncate": truncate, "field": field,
    "drop-field": drop_field, "raw-json": raw_json, "tensor": tensor, "sizes": sizes,
    "codec": codec,
}  # fmt: skip


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree, so any field can be replaced."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    found = []
    for key, value in items:
        found.append((node, key))
        if isinstance(value, (dict, list)) and len(found) < 5000:
            found += _slots(value)
    return found


def _signed(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    target = Path(_WORK[0]) / "signed.safetensors"
    write_task_file(target, meta, tensors)
    return target.read_bytes()


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


_WORK: list[str] = []


# ------------------------------------------------------------------- checking
class CaseTimeout(Exception):
    """A case ran past --case-timeout (raised from SIGALRM)."""


def snapshot(model: PiggybackModel, task: str) -> dict[str, Any]:
    """Everything a loaded task consists of, to compare a load against the original."""
    info = model.task_info[task]
    state = {k: v.clone() for k, v in model.state_dict().items() if f".{task}" in k}
    return {"info": info, "masks": model.masks(task), "state": state}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    tensors_equal = all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"]) and all(
        torch.equal(a["state"][k], b["state"][k]) for k in a["state"]
    )
    return a["info"] == b["info"] and list(a["state"]) == list(b["state"]) and tensors_equal


def outcome(action: Callable[[], Any], timeout: float) -> tuple[str, Any]:
    """("ok", result) or ("refused", error class) or ("FAIL ...", where)."""
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return "ok", action()
    except CaseTimeout:
        return "FAIL hang", None
    except PiggybackError as exc:
        return "refused", type(exc).__name__
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        return f"FAIL {type(exc).__name__}", f"{Path(frame.filename).name}:{frame.lineno}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(cases: int, seed: int, work: Path, timeout: float) -> dict[str, Any]:
    _WORK[:] = [str(work)]
    rng = random.Random(seed)
    model, paths = source_files(work, torch.Generator().manual_seed(seed))
    keys = list(model.state_dict())
    originals = {}
    for path in paths:
        task = model.load_task(path)
        originals[path] = snapshot(model, task)
        model.remove_task(task)
    start_peak = peak = peak_mb()
    raised: list[dict[str, Any]] = []
    counts: Counter[tuple[str, str, str]] = Counter()
    failures: list[dict[str, Any]] = []
    slowest = 0.0
    names = sorted(MUTATORS)
    victim = work / "case.safetensors"
    started = time.perf_counter()
    for number in range(cases):
        path = rng.choice(paths)
        name = names[number % len(names)]
        data, signed = MUTATORS[name](rng, path.read_bytes(), path)
        victim.write_bytes(data)
        began = time.perf_counter()
        for action, call in (("load", lambda: model.load_task(victim)),
                             ("inspect", lambda: describe_task_file(victim))):  # fmt: skip
            result, detail = outcome(call, timeout)
            if action == "load" and result == "ok":
                loaded = snapshot(model, detail)
                model.remove_task(detail)
                if not signed and not same(loaded, originals[path]):
                    result, detail = "FAIL silent change", None
            if action == "load" and (model.tasks or list(model.state_dict()) != keys):
                result, detail = "FAIL leaked", None
                for task in model.tasks:
                    model.remove_task(task)
            counts[(name, action, result)] += 1
            if result.startswith("FAIL"):
                failures.append({"case": number, "mutator": name, "action": action,
                                 "result": result, "where": detail})  # fmt: skip
        slowest = max(slowest, time.perf_counter() - began)
        if peak_mb() > peak + 50:  # the cases that raised the peak, to find what costs memory
            peak = peak_mb()
            raised.append({"case": number, "mutator": name, "peak_mb": peak})
    return {
        "cases": cases,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "slowest_case_s": slowest,
        "peak_mb_before": start_peak,
        "peak_mb": peak_mb(),
        "counts": [
            {"mutator": m, "action": a, "result": r, "count": n}
            for (m, a, r), n in sorted(counts.items())
        ],
        "failures": failures,
        "peak_raised_by": raised,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--max-peak-mb", type=float, default=1024.0)
    parser.add_argument("--quick", action="store_true", help="300 cases (the CI smoke run)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/fuzz"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))
    args = parser.parse_args()
    cases = 300 if args.quick else args.cases

    def alarm(*_: object) -> None:
        raise CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(cases, args.seed, args.work, args.case_timeout)
    table: dict[str, Counter[str]] = {}
    for row in result["counts"]:
        key = f"{row['mutator']} / {row['action']}"
        table.setdefault(key, Counter())[row["result"]] += row["count"]
    results = sorted({r["result"] for r in result["counts"]})
    rows = [{"mutator / action": key, **counter} for key, counter in sorted(table.items())]
    print(markdown_table(rows, ["mutator / action", *results]))
    print(
        f"\n{cases} cases in {result['seconds']:.0f} s, slowest {result['slowest_case_s']:.2f} s, "
        f"peak memory {result['peak_mb']:.0f} MB (before the cases {result['peak_mb_before']:.0f})"
        f", {len(result['failures'])} failures"
    )
    for failure in result["failures"][:20]:
        print("FAIL", json.dumps(failure))
    write_results(args.out, result)
    ok = not result["failures"] and result["peak_mb"] < args.max_peak_mb
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
