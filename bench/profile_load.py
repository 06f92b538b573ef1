"""Where a task file's way to ready weights spends its time: cProfile of `load_task`.

Saves a task of random masks (a ~95% keep rate, as trained masks) for the backbone, then
loads it `--loads` times under cProfile, each followed by the switch that makes it ready
(every layer's W * mask derived) and its removal. The table lists the functions of
piggyback, torch and the standard library by their own time (tottime) and with what they
call (cumtime), in ms per load.

    python bench/profile_load.py --device cuda --model resnet50
    python bench/profile_load.py --model resnet50
    python bench/profile_load.py --quick          # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import torch
from _common import markdown_table, profile_parser, sync, write_run
from speed import BUILDERS, build, derive_all, random_masks

from piggyback import PiggybackModel


def profiled_loads(args: argparse.Namespace) -> pstats.Stats:
    device = torch.device(args.device)
    model = PiggybackModel(build(args.model, args.size, device)).to(device).eval()
    model.add_task("file", 10, masks=random_masks(model, seed=3))
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_task("file", Path(tmp) / "file.safetensors")
        model.remove_task("file")
        for index in range(args.loads + 1):
            if index:  # the first load warms caches: not profiled
                profiler.enable()
            task = model.load_task(path, name=f"loaded{index}")
            derive_all(model, task)
            sync(device)
            profiler.disable()
            model.set_task(None)
            model.remove_task(task)
    return pstats.Stats(profiler)


def rows(stats: pstats.Stats, loads: int, top: int) -> list[dict]:
    """The `top` functions by cumulative time, each with its own time, per load."""
    table = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = Path(file).name if file != "~" else ""
        table.append({"function": f"{where}:{line}({name})" if where else name,
                      "calls": calls / loads, "own ms": 1000 * own / loads,
                      "cumulative ms": 1000 * cumulative / loads})  # fmt: skip
    table.sort(key=lambda row: row["cumulative ms"], reverse=True)
    return table[:top]


def main(argv: list[str] | None = None) -> None:
    parser = profile_parser(
        __doc__, BUILDERS, model="resnet50", top=30, out="bench/results/profile_load.json"
    )
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.loads, args.top = 32, 1, 8
    table = rows(profiled_loads(args), args.loads, args.top)
    print(markdown_table(table, list(table[0])))
    write_run(args, {"results": table})


if __name__ == "__main__":
    main()
