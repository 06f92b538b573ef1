"""What storing a task's own norm layers at 16 bits costs: bytes saved, accuracy lost.

For each task file trained with per-task norms (and its run's checkpoint, which keeps the
best epoch's fp32 tensors): test top-1 with the norms as stored (float16, only the
tensors that differ from the backbone's), with bfloat16 instead, and with the fp32
originals; and the file's size against the same task written as format 1 did (every
norm tensor in fp32, the batch counter included).

    python bench/norms.py runs/bench/accuracy/128px/piggyback/*/seed0/lr=0.0003/*.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _common import markdown_table, write_results
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from piggyback.data import load_task_data, make_loader
from piggyback.loop import evaluate
from piggyback.pipeline import open_task, task_source
from piggyback.store import read_safetensors, read_task_file


def fp32_norms(checkpoint: Path, task: str) -> dict[str, dict[str, torch.Tensor]]:
    """The best epoch's own norm tensors, in fp32, by norm layer name."""
    marker = f".norms.{task}."
    norms: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(checkpoint), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            if key.startswith("best.") and marker in key:
                layer, tensor = key[len("best.backbone.") :].split(marker)
                norms.setdefault(layer, {})[tensor] = handle.get_tensor(key)
    return norms


def top1(model: Any, task: str, source: dict[str, Any], spec: Any) -> float:
    data = load_task_data(source["data"], spec, seed=source.get("seed", 0),
                          limit=source.get("limit"))  # fmt: skip
    loader = make_loader(data.test, 64, shuffle=False)
    return 100 * evaluate(model.set_task(task), loader, torch.device("cpu"), data.num_classes,
                          progress=False)["top1"]  # fmt: skip


def measure(path: Path) -> dict[str, Any]:
    model, task, spec = open_task(path)
    source = task_source(read_task_file(path)[0])
    originals = fp32_norms(path.parent / "checkpoint" / "state.safetensors", task)
    row: dict[str, Any] = {"task file": "/".join(path.parts[-4:]), "norm layers": len(originals)}
    row["fp16 stored"] = top1(model, task, source, spec)
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for layer, state in originals.items():
            own = model.norms[layer].norms[task]
            rounded = {k: v.to(dtype).float() if v.is_floating_point() else v
                       for k, v in state.items()}  # fmt: skip
            own.load_state_dict(rounded)
        row[label] = top1(model, task, source, spec)
    header, tensors = read_safetensors(path, "task file")
    old = {k: v for k, v in tensors.items() if not k.startswith("norm.")}
    for layer, state in originals.items():
        old.update({f"norm.{layer}.{k}": v.contiguous() for k, v in state.items()})
    row["bytes"] = path.stat().st_size
    row["bytes as format 1"] = len(safetensors_save(old, metadata=header))
    row["norm bytes"] = sum(v.numel() * v.element_size() for k, v in tensors.items()
                            if k.startswith("norm."))  # fmt: skip
    row["norm bytes as format 1"] = sum(v.numel() * v.element_size() for k, v in old.items()
                                        if k.startswith("norm."))  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_files", nargs="+", type=Path)
    parser.add_argument("--out", default="bench/results/norms.json")
    args = parser.parse_args(argv)
    rows = [measure(path) for path in args.task_files]
    print(markdown_table(rows, list(rows[0])))
    print(f"\nwrote {write_results(args.out, {'results': rows})}")


if __name__ == "__main__":
    main()
