"""What a model file holds, and plots of a task file's masks, without needing its backbone."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .baked import baked_kind, read_baked_header
from .model import LayerMaskStats
from .store import read_task_file, task_masks, write_atomic
from .taskmeta import spec_record

MAX_BARS = 60  # layers in the per-layer plot before it shows blocks of them


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


def describe_baked_file(path: str | Path) -> dict[str, Any]:
    """What a baked model file (an export or a fine-tuned baseline) records."""
    raw, info, tensors = read_baked_header(Path(path))
    return {
        "path": str(path),
        "kind": baked_kind(info),
        "file_bytes": Path(path).stat().st_size,
        "task": info.task,
        "num_classes": info.num_classes,
        "class_names": info.class_names,
        "backbone": raw["backbone"],
        "head": raw["head"],
        "parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "input_spec": spec_record(info.spec),
        "metadata": info.metadata,
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
    """Write `layer_figure` of a `describe_task_file` report as a PNG."""
    return save_figure(layer_figure(report), path)


def layer_figure(report: dict[str, Any]) -> Figure:
    """Bars of the share of weights each masked layer's mask zeroes out (as in the
    paper), named, input layers at the top; past `MAX_BARS` layers, one bar per block."""
    names, dropped = _masked_out_by_group(report["layers"])
    figure, axis = plt.subplots(figsize=(7, 1.4 + 0.16 * max(len(names), 4)))
    axis.barh(range(len(names)), dropped, color="#3b6ea5")
    axis.set_yticks(range(len(names)), names, fontsize=7)
    axis.set_ylim(len(names) - 0.5, -0.5)  # the input layers at the top
    axis.set_xlabel("weights masked out (%)")
    axis.set_ylabel("masked layer, input at the top")
    axis.set_xlim(0, max(1.0, 1.15 * max(dropped, default=0.0)))
    axis.grid(axis="x", alpha=0.3)
    if not any(dropped):
        axis.text(
            0.5, 0.5, "no weight is masked out:\nthe task uses the backbone as it is",
            transform=axis.transAxes, ha="center", va="center",
        )  # fmt: skip
    mask = report["mask"]
    axis.set_title(
        f"{report['task']}: {100 * (1 - mask['kept']):.2f}% of {mask['numel']:,} weights "
        f"masked out, {mask['bits_per_weight']:.3f} bits/weight stored",
        fontsize=9,
    )
    return figure


def _masked_out_by_group(layers: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    """Per layer, or per block of layers (the longest name prefix that gives at most
    `MAX_BARS` groups): its name and the percentage of its weights masked out."""
    depth = max((len(layer["name"].split(".")) for layer in layers), default=1)
    while depth > 1 and len({_prefix(layer["name"], depth) for layer in layers}) > MAX_BARS:
        depth -= 1
    groups: dict[str, list[float]] = {}
    for layer in layers:
        totals = groups.setdefault(_prefix(layer["name"], depth), [0.0, 0.0, 0.0])
        totals[0] += layer["numel"] * (1 - layer["kept"])
        totals[1] += layer["numel"]
        totals[2] += 1
    names = [name if count == 1 else f"{name} ({count:.0f} layers)"
             for name, (_, _, count) in groups.items()]  # fmt: skip
    dropped = [100 * masked / numel if numel else 0.0 for masked, numel, _ in groups.values()]
    return names, dropped


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def plot_histories(histories: dict[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """Write `history_figure` as a PNG."""
    return save_figure(history_figure(histories), path)


def history_figure(histories: dict[str, Sequence[dict[str, Any]]]) -> Figure:
    """Validation accuracy per epoch, one line per run (name -> metrics rows)."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, rows in histories.items():
        axis.plot(
            [r["epoch"] for r in rows], [100 * r["val_top1"] for r in rows], marker="o", label=name
        )
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1 (%)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return figure
