"""The embedded demo end to end, at its quick size: what the README's first command runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from piggyback.demo import run_demo


@pytest.mark.slow
def test_quick_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    results = run_demo(tmp_path, quick=True, tasks=["digits", "animals"], progress=False)
    assert results["backbone_unchanged"]
    assert results["fingerprint_before"] == results["fingerprint_after"]
    rows = {(r["task"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(t, m) for t in ("digits", "animals") for m in ("piggyback", "classifier")}
    for task in ("digits", "animals"):
        row = rows[(task, "piggyback")]
        assert row["reloaded_test_top1"] == row["test_top1"], "task files must reload exactly"
        assert (tmp_path / "tasks" / f"{task}.safetensors").exists()
        assert (tmp_path / f"{task}_layers.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == results["rows"]
    assert "| digits | piggyback |" in capsys.readouterr().out
