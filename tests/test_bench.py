"""Each benchmark script runs end to end at a tiny size (a smoke test, not a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    command = [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|---|" in result.stdout  # the markdown table
    payload = json.loads(out.read_text())
    assert payload["hardware"]["cores"] >= 1 and payload["command"].startswith("python")
    return payload


@pytest.mark.slow
def test_speed_bench(tmp_path: Path) -> None:
    rows = run_bench("speed", tmp_path)["results"]
    assert [r["model"] for r in rows] == ["resnet50", "efficientnet_lite0", "vit_small"]
    for row in rows:
        assert row["plain_forward_s"] > 0 and row["mask_step_s"] > 0
        assert row["tasks3_bits_per_weight"] == pytest.approx(1.0, abs=0.01)  # packed in memory


@pytest.mark.slow
def test_accuracy_bench(tmp_path: Path) -> None:
    payload = run_bench("accuracy", tmp_path, "--work", str(tmp_path / "work"))
    runs = payload["runs"]
    methods = {"classifier", "piggyback", "paper", "ternary", "finetune"}
    assert {r["method"] for r in runs} == methods
    assert {r["seed"] for r in runs} == {0, 1} and all(0 <= r["val_top1"] <= 100 for r in runs)
    for row in payload["chosen"]:  # the setting best on validation, per task, seed and method
        rivals = [r for r in runs if (r["task"], r["seed"], r["method"]) ==
                  (row["task"], row["seed"], row["method"])]  # fmt: skip
        assert row["val_top1"] == max(r["val_top1"] for r in rivals)
    assert [r["task"] for r in payload["summary"]] == ["digits", "mean"]
    assert " ± " in payload["summary"][0]["piggyback"]
    assert payload["grid"][0]["runs"] == 2


@pytest.mark.slow
def test_storage_bench(tmp_path: Path) -> None:
    (row,) = run_bench("storage", tmp_path)["results"]
    assert row["entropy floor"] <= row["stored bits"] <= row["packed bits"] == 1.0
    assert row["stored bits"] == min(
        row[f"{c} bits"] for c in ("packed", "packed-zstd", "sparse-zstd")
    )


@pytest.mark.slow
def test_task_inference_bench(tmp_path: Path) -> None:
    payload = run_bench("task_inference", tmp_path)
    rules = ["calibrated", "entropy", "features"]
    for setting in ("domains", "split"):
        assert [row["rule"] for row in payload[setting]] == rules
        for row in payload[setting]:
            assert 0 <= row["per_sample"] <= 1 and 0 <= row["end_to_end"] <= row["per_sample"]
    refusals = payload["domains_refusal"]
    assert sum(row["default"] for row in refusals) == 3, "one default threshold per rule"
    assert [(row["rule"], row["k"], row["weight_cache_size"]) for row in payload["cost"]] == [
        (rule, k, cache) for k in (3, 10) for cache in (1, k) for rule in rules
    ]


def test_train_cost_bench(tmp_path: Path) -> None:
    payload = run_bench("train_cost", tmp_path)
    rows = {(row["method"], row["loader"]): row for row in payload["results"]}
    methods = ["classifier", "piggyback", "paper", "finetune"]
    assert list(rows) == [(m, loader) for m in methods for loader in ("default", "per-item")]
    phases = ("data wait", "forward+backward", "optimizer step", "norm start",
              "norm re-estimation", "evaluation", "saving", "other")  # fmt: skip
    for (method, _), row in rows.items():
        assert sum(row[p] for p in phases) == pytest.approx(row["wall s"])
        assert row["other"] >= 0  # no phase is counted twice
        assert min(row[p] for p in ("data wait", "forward+backward", "evaluation", "saving")) > 0
        assert 0 < row["data wait %"] < 100
        norms = row["norm start"], row["norm re-estimation"]
        if method == "piggyback":
            assert min(norms) > 0
        elif method != "paper":  # the baselines have no norm passes: fit never calls them
            assert norms == (0, 0)
    for row in payload["ratios"]:
        if row["method"] == "finetune":
            assert row["run / finetune"] == row["step / finetune step"] == 1.0


@pytest.mark.slow
def test_profile_step_bench(tmp_path: Path) -> None:
    payload = run_bench("profile_step", tmp_path)
    rows = payload["results"]
    for method in ("finetune", "mask"):
        ops = [row for row in rows if row["method"] == method]
        assert ops[-1]["op"] == "(all)" and len(ops) == 6  # the top 5 and the total
        assert sum(row["ms per step"] for row in ops[:-1]) <= ops[-1]["ms per step"]
    assert any("convolution" in row["op"] for row in rows)
    for line in payload["timeline"]:  # no GPU here: the wall time alone
        assert line["wall ms per step"] > 0 and line["gpu busy ms per step"] is None


@pytest.mark.slow
def test_host_time_bench(tmp_path: Path) -> None:
    payload = run_bench("host_time", tmp_path)
    finetune, mask = payload["steps"]
    assert (finetune["method"], mask["method"]) == ("finetune", "mask")
    assert mask["mask / finetune"] == pytest.approx(mask["step ms"] / finetune["step ms"])
    (mixed,) = payload["mixed"]
    assert mixed["k"] == 2 and mixed["mixed ms"] > 0 and mixed["plain ms"] > 0


def test_gpu_idle_gaps_merge_overlapping_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's busy time is the union of its spans; a wait is a gap of 20 us or more."""
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import idle_gaps
    from torch.autograd import DeviceType

    def event(device: DeviceType, start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(device_type=device, time_range=SimpleNamespace(start=start, end=end))

    spans = [(0, 10), (5, 30), (35, 40), (100, 150), (120, 130)]  # a 5 us and a 60 us gap
    annotation = event(DeviceType.CUDA, 0, 150)  # e.g. Optimizer.step#Adam.step
    annotation.is_user_annotation = True
    events = [event(DeviceType.CUDA, a, b) for a, b in spans] + [annotation]
    assert idle_gaps(events) == (30 + 5 + 50, [(40, 100)])
    assert idle_gaps([event(DeviceType.CPU, 0, 9)]) == (0.0, [])


def test_gpu_idle_time_is_charged_to_the_innermost_host_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import charged_to_host
    from torch.autograd import DeviceType

    def host_op(name: str, start: float, end: float) -> SimpleNamespace:
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(device_type=DeviceType.CPU, time_range=span, name=name)

    ops = [
        host_op("step", 0, 100),
        host_op("forward", 0, 40),  # starts with step, inside it
        host_op("where", 10, 12),
        host_op("backward", 50, 90),
        host_op("BinaryMaskedBackward", 60, 70),
    ]
    gaps = [(5, 8), (11, 14), (45, 48), (65, 69), (95, 97), (120, 130)]
    assert charged_to_host(ops, gaps) == {
        "forward": 3,
        "where": 3,
        "step": 3 + 2,
        "BinaryMaskedBackward": 4,
        "(no host op)": 10,
    }


@pytest.mark.slow
def test_profile_load_bench(tmp_path: Path) -> None:
    rows = run_bench("profile_load", tmp_path)["results"]
    assert len(rows) == 8 and rows[0]["calls"] == 1  # the top 8; one load profiled
    assert any("load_task" in row["function"] for row in rows)
    assert all(row["own ms"] <= row["cumulative ms"] + 1e-9 for row in rows)


@pytest.mark.slow
def test_profile_forward_bench(tmp_path: Path) -> None:
    payload = run_bench("profile_forward", tmp_path)
    for name in ("plain", "cached", "after_switch"):
        ops = [row for row in payload["results"] if row["forward"] == name]
        assert ops[-1]["op"] == "(all)" and 1 < len(ops) <= 6  # the top 5 and the total
        assert sum(row["host ms"] for row in ops[:-1]) <= ops[-1]["host ms"]
    assert payload["ratio"] == payload["wall_s"]["after_switch"] / payload["wall_s"]["plain"]
