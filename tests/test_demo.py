"""The embedded demo end to end, at its quick size, run as `make demo` runs it: the
command, its output going to a log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).parent / "piggyback")


@pytest.mark.slow
def test_quick_demo(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    command = [SCRIPT, "demo", "--quick", "--tasks", "digits", "animals", "--out", str(tmp_path)]
    log = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert log.returncode == 0, log.stderr
    assert "\r" not in log.stdout + log.stderr and "it/s" not in log.stderr, "no progress bars"
    assert all(line.startswith("warning: ") for line in log.stderr.splitlines())
    assert "| digits | piggyback |" in log.stdout

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["backbone_unchanged"]
    assert results["fingerprint_before"] == results["fingerprint_after"]
    rows = {(r["task"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(t, m) for t in ("digits", "animals") for m in ("piggyback", "classifier")}
    for task in ("digits", "animals"):
        row = rows[(task, "piggyback")]
        assert row["reloaded_test_top1"] == row["test_top1"], "task files must reload exactly"
        assert (tmp_path / "tasks" / f"{task}.safetensors").exists()  # what `serve` takes
        recorded = json.loads((tmp_path / "tasks" / task / "result.json").read_text())
        assert Path(recorded["task_file"]).is_file(), "the run's result names its task file"
        assert (tmp_path / f"{task}_layers.png").stat().st_size > 1000
        baseline = tmp_path / "baselines" / f"{task}-classifier"
        assert rows[(task, "classifier")]["file"] == f"{baseline}/{task}-classifier.safetensors"
    assert not list(tmp_path.rglob("checkpoint")), "complete runs keep no checkpoint"
