"""Bits per masked weight of trained task files, under every codec and at the floor.

For each task file: the packed size (1 bit per weight, 2 for ternary), each
entropy-coded form, the codec the file actually stores, the empirical (order-0)
entropy of the mask (the floor of any coder that ignores the weights), and the
8 bits per weight of the reference implementation, which keeps masks as bytes.

    python bench/storage.py runs/demo/tasks runs/bench/accuracy/tasks
    python bench/storage.py --quick        # trains one tiny task first: the CI smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import markdown_table, write_results

from piggyback import MaskConfig, PiggybackModel, read_task_file
from piggyback.backbones import create_backbone, input_spec
from piggyback.bits import empirical_entropy_bits, encodings
from piggyback.data import load_task_data
from piggyback.store import task_masks
from piggyback.train import TrainConfig, fit

REFERENCE_BITS = 8.0  # the authors' code saves masks as torch.ByteTensor


def measure(path: Path) -> dict[str, Any]:
    meta, tensors = read_task_file(path)
    mask = torch.cat([m.flatten() for m in task_masks(meta, tensors).values()])
    numel = mask.numel()
    coded = encodings(mask, meta["mask"]["kind"])
    sizes = {codec: 8 * len(payload) / numel for codec, payload in coded.items()}
    return {
        "task file": "/".join(path.parts[-3:]),
        "kind": meta["mask"]["kind"],
        "masked weights": numel,
        "kept": meta["mask"]["kept"],
        **{f"{codec} bits": bits for codec, bits in sizes.items()},
        "stored codec": meta["mask"]["codec"],
        "stored bits": meta["mask"]["bits_per_weight"],
        "entropy floor": empirical_entropy_bits(mask) / numel,
        "reference bits": REFERENCE_BITS,
        "file bytes": path.stat().st_size,
    }


def quick_task(out: Path) -> Path:
    """One real, tiny training run (digits, 32 px, 1 epoch) so the smoke run has a file."""
    backbone = create_backbone("efficientnet_lite0")
    data = load_task_data("digits", input_spec(backbone, size=32), seed=0, limit=64)
    config = TrainConfig(epochs=1, lr=1e-3, head_lr=1e-3, batch_size=16, progress=False)
    fit(PiggybackModel(backbone, MaskConfig()), "digits", data, config, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="task files or folders of them")
    parser.add_argument("--quick", action="store_true", help="train one tiny task and measure it")
    parser.add_argument("--out", default="bench/results/storage.json")
    args = parser.parse_args(argv)
    paths = list(args.paths)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            paths.append(quick_task(Path(tmp)))
        files = sorted(f for p in paths for f in ([p] if p.is_file() else p.glob("*.safetensors")))
        if not files:
            parser.error("no task files: pass task files or folders, or --quick")
        rows = [measure(f) for f in files]
    columns = list(rows[0])
    print(markdown_table(rows, columns))
    print(f"\nwrote {write_results(args.out, {'results': rows})}")


if __name__ == "__main__":
    main()
