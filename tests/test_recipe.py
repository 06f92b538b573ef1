"""The default recipe: it must not collapse where the paper's frozen norms do.

The guard is a real run of the embedded EfficientNet-Lite0 on animal silhouettes at
96 px, long enough (30 steps) for the scores to cross the threshold: with frozen
BatchNorm (the paper's recipe at scores lr 3e-4) validation falls from 61% to 26% in
epoch 2 and the best epoch is the unmasked one, so `test_default_recipe_beats_the_classifier`
fails on the code before per-task norms (new default: 91.2% test, classifier-only 83.8%).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from hostsync import host_waits
from torch.utils.data import TensorDataset

from piggyback import MaskConfig, PiggybackModel
from piggyback.backbones import create_backbone, input_spec
from piggyback.data import TaskData, load_task_data
from piggyback.errors import ConfigError, DegenerateTaskWarning
from piggyback.norms import ImagePass, recalibrate_norms, start_norms_as_backbone
from piggyback.recipes import RECIPES
from piggyback.train import FitResult, TrainConfig, degenerate_task_problems, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def silhouettes() -> TaskData:
    pytest.importorskip("animal_mnist")
    spec = input_spec(create_backbone("efficientnet_lite0"), size=96)
    return load_task_data("animals", spec, seed=0, limit=320)


def fit_embedded(data: TaskData, method: str, out: Path) -> tuple[FitResult, PiggybackModel]:
    model = PiggybackModel(create_backbone("efficientnet_lite0"))
    config = TrainConfig(method=method, epochs=3, lr_decay_every=2, device="cpu", progress=False)
    return fit(model, "animals", data, config, out), model


@pytest.mark.slow
def test_default_recipe_beats_the_classifier(silhouettes: TaskData, tmp_path: Path) -> None:
    classifier, _ = fit_embedded(silhouettes, "classifier", tmp_path / "classifier")
    masked, model = fit_embedded(silhouettes, "piggyback", tmp_path / "piggyback")
    vals = [row["val_top1"] for row in masked.history]
    falls = [epoch + 1 for epoch, val in enumerate(vals) if val < max(vals[: epoch + 1]) - 0.2]
    assert not falls, f"validation fell by over 20 points after epochs {falls}: {vals}"
    assert model.mask_stats("animals").kept < 1.0, "the mask must really have moved"
    top1, baseline = masked.test["top1"], classifier.test["top1"]
    assert top1 > baseline, f"piggyback {top1:.3f} vs classifier-only {baseline:.3f}"


def test_recipes_set_the_defaults() -> None:
    default, paper = RECIPES["default"], RECIPES["paper"]
    assert MaskConfig().train_bn is default.train_bn is True
    assert (TrainConfig().lr, TrainConfig().head_lr) == (default.lr, default.head_lr)
    config = TrainConfig.for_recipe("paper", epochs=2)
    assert (config.lr, config.head_lr, config.epochs) == (paper.lr, paper.head_lr, 2)
    assert TrainConfig.for_recipe("paper", lr=1e-3).lr == 1e-3
    with pytest.raises(ConfigError, match="recipe='fast' is not known"):
        TrainConfig.for_recipe("fast")


def test_degenerate_tasks_are_named() -> None:
    assert degenerate_task_problems(0.9, 10, 0.97) == []
    (collapsed,) = degenerate_task_problems(0.11, 10, 0.9)
    assert "at chance" in collapsed and "--lr" in collapsed and "--no-train-bn" in collapsed
    (unmasked,) = degenerate_task_problems(0.9, 10, 1.0)
    assert "keeps every weight" in unmasked and "--lr" in unmasked
    assert degenerate_task_problems(0.52, 2, None)  # two classes: 0.5 is chance


def test_recalibration_measures_the_current_mask(images: torch.Tensor) -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    dataset = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    model.add_task("a", 1)
    norm = model.norms["bn"].norms["a"]
    recalibrate_norms(model, "a", dataset, CPU, ImagePass(count=6, batch_size=6, seed=0))
    model.set_task("a")
    stem = model.masked_layers["stem"]
    with torch.no_grad():  # the statistics of the stem's output over all six images
        out = stem(images)
    torch.testing.assert_close(norm.running_mean, out.mean((0, 2, 3)))
    torch.testing.assert_close(norm.running_var, out.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert norm.momentum == 0.1  # restored after the cumulative average


def test_recalibration_averages_its_batches_as_torch_would_without_reading_the_device(
    images: torch.Tensor,
) -> None:
    """Three batches weigh alike, as BatchNorm's momentum=None average weighs them (bit for
    bit: 1/n for the n-th batch is the factor torch reads off its count), with no read of
    a device value on the way (on a GPU, torch's count read is a wait per layer)."""
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    dataset = TensorDataset(images, torch.zeros(len(images), dtype=torch.long))
    model.add_task("a", 1)
    norm = model.norms["bn"].norms["a"]
    inputs: list[torch.Tensor] = []
    hook = norm.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
    with host_waits() as seen:
        recalibrate_norms(model, "a", dataset, CPU, ImagePass(count=6, batch_size=2, seed=0))
    hook.remove()
    assert seen == [] and len(inputs) == 3
    torch_average = copy.deepcopy(norm).train()
    torch_average.reset_running_stats()
    torch_average.momentum = None
    with torch.no_grad():
        for batch in inputs:
            torch_average(batch)
    assert torch.equal(norm.running_mean, torch_average.running_mean)
    assert torch.equal(norm.running_var, torch_average.running_var)
    assert norm.momentum == 0.1


def test_warning_for_a_mask_that_never_moved(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    data = load_task_data("digits", input_spec(make_tiny(), size=8), seed=0, limit=32)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=False))
    config = TrainConfig(epochs=1, lr=1e-6, device="cpu", progress=False)
    with pytest.warns(DegenerateTaskWarning, match="keeps every weight"):
        result = fit(model, "digits", data, config, tmp_path)
    assert any("keeps every weight" in w for w in result.warnings)


def test_task_norms_start_as_the_backbone(images: torch.Tensor) -> None:
    """Re-parameterised on the task's statistics, the task's own BatchNorm layers give
    the frozen backbone's output until the mask moves: exactly with running statistics,
    and up to the variance's bias with batch statistics on the measured images."""
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    dataset = TensorDataset(images * 3 + 1, torch.zeros(len(images), dtype=torch.long))
    model.add_task("a", 4)
    model.head.heads["a"].load_state_dict(model.head.base_layer.state_dict())
    norm = model.norms["bn"].norms["a"]
    start_norms_as_backbone(model, "a", dataset, CPU, ImagePass(count=6, batch_size=6, seed=0))
    assert not torch.equal(norm.running_mean, model.norms["bn"].base_layer.running_mean)
    model.eval()
    with torch.no_grad():
        plain = model.set_task(None)(images * 3 + 1)
        evaluated = model.set_task("a")(images * 3 + 1)
        trained = model.train()(images * 3 + 1)  # batch statistics: the measured ones
    torch.testing.assert_close(evaluated, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, plain, rtol=1e-2, atol=1e-2)  # biased vs unbiased var
