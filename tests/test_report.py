"""The plots read on their own: named layers, the quantity `inspect --help` names, sane
axes when nothing is masked, whole epochs."""

from __future__ import annotations

import pytest

from piggyback.cli import build_parser
from piggyback.report import MAX_BARS, history_figure, layer_figure


def report(layers: list[tuple[str, int, float]]) -> dict:
    """A `describe_task_file` report with just what the plot reads: (name, numel, kept)."""
    numel = sum(n for _, n, _ in layers)
    kept = sum(n * k for _, n, k in layers) / numel
    return {
        "task": "t",
        "layers": [{"name": name, "numel": n, "kept": k} for name, n, k in layers],
        "mask": {"kept": kept, "numel": numel, "bits_per_weight": 0.5},
    }


def labels(figure: object) -> list[str]:
    return [tick.get_text() for tick in figure.axes[0].get_yticklabels()]


def test_each_layer_is_named_with_the_share_masked_out() -> None:
    figure = layer_figure(report([("stem", 100, 0.9), ("blocks.0.conv", 200, 0.8), ("fc", 50, 1)]))
    axis = figure.axes[0]
    assert labels(figure) == ["stem", "blocks.0.conv", "fc"]
    assert [bar.get_width() for bar in axis.patches] == pytest.approx([10, 20, 0])
    assert axis.get_xlabel() == "weights masked out (%)"
    inspect_help = _inspect_help()
    assert "percentage of its weights that the mask zeroes out" in " ".join(inspect_help.split())


def _inspect_help() -> str:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    return commands.choices["inspect"].format_help()


def test_nothing_masked_gives_a_readable_empty_chart() -> None:
    axis = layer_figure(report([("a", 10, 1.0), ("b", 10, 1.0)])).axes[0]
    assert axis.get_xlim() == (0.0, 1.0)
    assert any("no weight is masked out" in text.get_text() for text in axis.texts)


def test_more_layers_than_bars_are_grouped_by_block() -> None:
    layers = [(f"blocks.{b}.{i}.conv", 10, 0.5 if b else 1.0) for b in range(8) for i in range(9)]
    assert len(layers) > MAX_BARS
    figure = layer_figure(report(layers))
    assert labels(figure) == [f"blocks.{b} (9 layers)" for b in range(8)]
    assert [bar.get_width() for bar in figure.axes[0].patches] == pytest.approx([0] + [50] * 7)


def test_epoch_ticks_are_whole_numbers() -> None:
    rows = [{"epoch": e, "val_top1": 0.1 * e} for e in (1, 2, 3)]
    axis = history_figure({"a": rows, "b": rows[:2]}).axes[0]
    low, high = axis.get_xlim()
    ticks = [t for t in axis.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)
