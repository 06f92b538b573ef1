"""Task inference (`PiggybackModel.infer_task`): which task an input belongs to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from test_cli import TINY_RUN, run, write_images
from test_model import train_steps
from torch import nn

from piggyback import MaskConfig, PiggybackModel
from piggyback.errors import ConfigError
from piggyback.taskinfer import (
    CALIBRATION_KEY,
    QUANTILES,
    calibrate_task,
    calibration,
    normalised_entropy,
)


@pytest.fixture
def model() -> PiggybackModel:
    """Tasks of 3 and 5 classes with their own norms, trained a few steps each."""
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    x = torch.randn(8, 3, 16, 16)
    for task, classes in (("a", 3), ("b", 5)):
        model.add_task(task, classes)
        train_steps(model, task, x)
        model.freeze_task(task)
    return model.eval()


def test_scores_are_each_tasks_own_pass(model: PiggybackModel) -> None:
    """One mixed batch gives what a pass per task gives: 1 - normalised entropy."""
    x = torch.randn(6, 3, 16, 16)
    found = model.infer_task(x, rule="entropy", threshold=0.0)
    assert found.candidates == ["a", "b"] and found.candidate_scores.shape == (6, 2)
    for column, task in enumerate(found.candidates):
        with torch.no_grad():
            own = model.set_task(task)(x)
        torch.testing.assert_close(found.logits[task], own)
        torch.testing.assert_close(found.candidate_scores[:, column], 1 - normalised_entropy(own))
    best = found.candidate_scores.argmax(1).tolist()
    assert found.tasks == [found.candidates[i] for i in best]
    assert found.predicted_classes() == [
        int(found.logits[t][i].argmax()) for i, t in enumerate(found.tasks)
    ]


def test_normalised_entropy_compares_class_counts() -> None:
    assert normalised_entropy(torch.zeros(1, 2)).item() == pytest.approx(1.0)
    assert normalised_entropy(torch.zeros(1, 200)).item() == pytest.approx(1.0)
    assert normalised_entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0, abs=1e-6)


def test_threshold_refuses_and_a_batch_can_share_one_task(model: PiggybackModel) -> None:
    x = torch.randn(4, 3, 16, 16)
    assert model.infer_task(x, rule="entropy", threshold=1.01).tasks == [None] * 4
    assert None not in model.infer_task(x, rule="entropy", threshold=0.0).tasks
    shared = model.infer_task(x, rule="entropy", threshold=0.0, same_task=True)
    assert len(set(shared.tasks)) == 1
    alone = model.infer_task(x, tasks=["b"], rule="entropy", threshold=0.0)
    assert alone.tasks == ["b"] * 4 and alone.candidates == ["b"]


def test_calibrated_rule_reads_each_tasks_validation_quantiles(model: PiggybackModel) -> None:
    x, active = torch.randn(6, 3, 16, 16), model.active_task
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] have none"):
        model.infer_task(x, rule="calibrated")
    for task in ("a", "b"):
        record = calibrate_task(model, task, [torch.randn(5, 3, 16, 16) for _ in range(2)])
        assert len(record["quantiles"]) == QUANTILES and record["samples"] == 10
    found = model.infer_task(x, rule="calibrated", threshold=0.0)
    assert ((found.candidate_scores >= 0) & (found.candidate_scores <= 1)).all()
    for column, task in enumerate(found.candidates):  # less entropy, more typical: higher
        entropy = normalised_entropy(found.logits[task])
        order = entropy.argsort()
        assert (found.candidate_scores[order, column].diff() <= 0).all()
    assert model.active_task == active and not model.training, "calibrating restores both"


def test_calibration_is_the_distribution_it_was_read_from() -> None:
    record = calibration(torch.linspace(0, 1, 1001))
    assert record["quantiles"][0] == 0 and record["quantiles"][-1] == 1
    assert record["quantiles"][50] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="at least one"):
        calibration(torch.empty(0))


def test_token_inputs_as_keywords() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.hidden = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.hidden(self.embed(input_ids).mean(1))))

    model = PiggybackModel(Tagger())
    model.add_task("x", 2)
    model.add_task("y", 3)
    ids = torch.randint(0, 50, (5, 7))
    found = model.infer_task(input_ids=ids, rule="entropy", threshold=0.0)
    assert len(found.tasks) == 5 and found.logits["y"].shape == (5, 3)


def test_fit_stores_the_calibration_in_the_task_file(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from piggyback import read_task_file

    result = run(*TINY_RUN, "--epochs", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    meta, _ = read_task_file(tmp_path / "digits.safetensors")
    record = meta["metadata"][CALIBRATION_KEY]
    assert len(record["quantiles"]) == QUANTILES and record["samples"] == 8


def test_predict_infers_the_task_among_task_files(tmp_path: Path) -> None:
    """`predict --tasks`: two tasks on one seeded backbone, each image's task inferred."""
    pytest.importorskip("sklearn")
    for task in ("left", "right"):
        trained = run(*TINY_RUN, "--epochs", "1", "--task", task, "--out", str(tmp_path / task))
        assert trained.returncode == 0, trained.stderr
    images = write_images(tmp_path / "images", [(20, 16), (16, 16)])
    files = [str(tmp_path / t / f"{t}.safetensors") for t in ("left", "right")]
    flags = ["--tasks", files[0], "--tasks", files[1], "--rule", "entropy", "--threshold"]
    found = run("predict", *flags, "0", str(images), "--json")
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    assert len(rows) == 2 and all(r["task"] in ("left", "right") for r in rows)
    assert all(0 <= r["score"] <= 1 and len(r["labels"]) == 3 for r in rows)
    refused = run("predict", *flags, "1.5", str(images))
    assert refused.returncode == 0, refused.stderr
    assert all("no known task (closest " in line for line in refused.stdout.splitlines())
