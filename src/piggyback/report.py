"""What a task file holds, and plots of it, without needing its backbone."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .model import LayerMaskStats
from .store import read_task_file, task_masks, write_atomic


def describe_task_file(path: str | Path) -> dict[str, Any]:
    """Metadata plus per-layer mask statistics decoded from the file itself."""
    meta, tensors = read_task_file(path)
    mask = meta["mask"]
    layers = [asdict(LayerMaskStats.of(n, m)) for n, m in task_masks(meta, tensors).items()]
    head = {k: list(v.shape) for k, v in tensors.items() if k.startswith("head.")}
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "task": meta["task"],
        "num_classes": meta["num_classes"],
        "class_names": meta.get("class_names"),
        "library_version": meta.get("library_version"),
        "backbone": meta["backbone"],
        "metadata": meta.get("metadata") or {},
        "config": meta["config"],
        "train_bn": meta.get("train_bn", False),
        "head": head,
        "mask": {k: v for k, v in mask.items() if k != "layers"},
        "layers": layers,
    }


def save_figure(figure: Any, path: str | Path) -> Path:
    """Render to memory first, then write atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    path = Path(path)
    write_atomic(path, buffer.getvalue())
    return path


def plot_layer_kept(report: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of the share of weights each layer's mask zeroes out (as in the paper)."""
    layers = report["layers"]
    dropped = [100 * (1 - layer["kept"]) for layer in layers]
    figure, axis = plt.subplots(figsize=(max(6, len(layers) * 0.12), 3.5))
    axis.bar(range(len(layers)), dropped, color="#3b6ea5")
    axis.set_xlabel("masked layer (input to output)")
    axis.set_ylabel("weights masked out (%)")
    mask = report["mask"]
    axis.set_title(
        f"{report['task']}: {100 * (1 - mask['kept']):.1f}% of {mask['numel']:,} weights "
        "masked out, "
        f"{mask['bits_per_weight']:.3f} bits/weight stored"
    )
    axis.set_xlim(-1, len(layers))
    return save_figure(figure, path)


def plot_histories(histories: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """Validation accuracy per epoch, one line per run (name -> metrics rows)."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, rows in histories.items():
        axis.plot(
            [r["epoch"] for r in rows], [100 * r["val_top1"] for r in rows], marker="o", label=name
        )
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1 (%)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)
