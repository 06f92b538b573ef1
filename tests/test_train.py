"""Training: methods, best-on-val selection, seeds, and resume after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from torch import nn
from torch.utils.data import TensorDataset

import piggyback.data.tasks as data_tasks
import piggyback.train as train_module
from piggyback import ConfigError, MaskConfig, PiggybackModel, fingerprint
from piggyback.backbones import InputSpec
from piggyback.data import TaskData, load_task_data, make_loader
from piggyback.errors import DataError, TaskFileError
from piggyback.loop import evaluate, train_one_epoch
from piggyback.taskinfer import calibrate_task
from piggyback.taskmeta import CALIBRATION_KEY
from piggyback.train import TrainConfig, fit, setup_training

SPEC = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")


@pytest.fixture(scope="module")
def digits() -> TaskData:
    pytest.importorskip("sklearn")
    return load_task_data("digits", SPEC, seed=0, limit=96)


def quick(method: str = "piggyback", **overrides: object) -> TrainConfig:
    settings = {"method": method, "epochs": 2, "batch_size": 16, "lr": 5e-3, "head_lr": 5e-3}
    return TrainConfig(**{**settings, "progress": False, "device": "cpu", **overrides})


def digit_net() -> nn.Module:
    """Random conv features, spatially flattened: enough for 8 px digits to be learnable."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(16 * 8 * 8, 10)).eval()


def test_piggyback_fit_writes_everything(digits: TaskData, tmp_path: Path) -> None:
    model = PiggybackModel(digit_net())
    result = fit(model, "digits", digits, quick(), tmp_path)
    assert result.task_file == tmp_path / "digits.safetensors" and result.task_file.exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert result.best_epoch == max(rows, key=lambda r: r["val_top1"])["epoch"]
    assert json.loads((tmp_path / "result.json").read_text())["test"]["top1"] == result.test["top1"]
    assert result.test["top1"] > 0.5  # 10 classes: chance is 0.1
    assert rows[-1]["kept"] < 1.0
    assert fingerprint(model.base) == fingerprint(digit_net())


def test_the_final_validation_pass_calibrates_as_a_pass_of_its_own_would(
    digits: TaskData, tmp_path: Path
) -> None:
    """fit gathers task inference's calibration during its last validation pass; the
    record equals what `calibrate_task` gives over the same validation images."""
    model = PiggybackModel(digit_net())
    fit(model, "digits", digits, quick(epochs=1), tmp_path)
    gathered = model.task_info["digits"].metadata[CALIBRATION_KEY]
    again = calibrate_task(model, "digits", make_loader(digits.val, 16, shuffle=False))
    assert gathered["samples"] == len(digits.val) and again == gathered


def test_classifier_keeps_all_weights(digits: TaskData, tmp_path: Path) -> None:
    model = PiggybackModel(make_tiny())
    fit(model, "digits", digits, quick("classifier"), tmp_path)
    assert model.mask_stats("digits").kept == 1.0


def test_baselines_start_from_the_plain_backbone(digits: TaskData, tmp_path: Path) -> None:
    """Whatever the mask config, a baseline never sees a mask or a task's own norms."""
    config = MaskConfig(init="uniform", threshold_fn="ternarizer", train_bn=True)
    model = PiggybackModel(make_tiny(), config)
    fit(model, "c", digits, quick("classifier", epochs=1), tmp_path / "c")
    assert model.mask_stats("c").kept == 1.0 and model.mask_stats("c").layers[0].negative == 0
    assert not model.task_info["c"].train_bn
    network, _ = setup_training(model, "f", digits, quick("finetune"))
    for name, layer in model.masked_layers.items():
        assert torch.equal(network.get_submodule(name).weight, layer.weight), name


def test_epoch_lr_is_the_one_it_trained_with(digits: TaskData, tmp_path: Path) -> None:
    result = fit(PiggybackModel(make_tiny()), "d", digits, quick(lr_decay_every=1), tmp_path)
    assert [row["lr"] for row in result.history] == pytest.approx([5e-3, 5e-4])


def test_finetune_trains_a_copy(digits: TaskData, tmp_path: Path) -> None:
    model = PiggybackModel(make_tiny())
    result = fit(model, "digits", digits, quick("finetune"), tmp_path)
    assert result.task_file.name == "digits.finetuned.safetensors"
    assert fingerprint(model.base) == fingerprint(make_tiny())


def test_same_seed_same_result(digits: TaskData, tmp_path: Path) -> None:
    first = fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path / "a")
    second = fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path / "b")
    assert first.history == [{**r} for r in second.history]
    assert first.test == second.test


def test_the_loader_changes_no_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Images resized once or on every access, read in the training process or by worker
    processes that live for the run: the same run."""
    pytest.importorskip("sklearn")
    spec = InputSpec(12, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")  # 8 px digits, resized

    def run(name: str, data: TaskData, **overrides: object) -> tuple[object, dict]:
        model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
        result = fit(model, "d", data, quick(**overrides), tmp_path / name)
        return (result.history, result.test), model.masks("d")

    in_memory = load_task_data("digits", spec, limit=64)
    assert in_memory.train.resized is not None
    kept = run("kept", in_memory)
    monkeypatch.setattr(data_tasks, "RESIZE_ONCE_BYTES", 0)
    each = load_task_data("digits", spec, limit=64)
    assert each.train.resized is None
    for outcome, masks in (run("each", each), run("workers", each, num_workers=2)):
        assert outcome == kept[0]
        for name, mask in kept[1].items():
            assert torch.equal(masks[name], mask), name


def test_resume_after_interrupt_matches_uninterrupted(
    digits: TaskData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = quick(epochs=3)
    whole_model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    whole = fit(whole_model, "d", digits, config, tmp_path / "whole")

    real_save = train_module.save_checkpoint
    calls = {"n": 0}

    def save_then_crash(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        fit(
            PiggybackModel(make_tiny(), MaskConfig(train_bn=True)),
            "d",
            digits,
            config,
            tmp_path / "cut",
        )
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed_model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    resumed = fit(resumed_model, "d", digits, config, tmp_path / "cut", resume=True)

    assert resumed.history == whole.history
    assert resumed.test == whole.test
    for name, mask in whole_model.masks("d").items():
        assert torch.equal(resumed_model.masks("d")[name], mask), name


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_killed_before_the_first_checkpoint_starts_over(
    digits: TaskData, tmp_path: Path
) -> None:
    """What a kill while writing the first checkpoint left (before metrics.jsonl was
    written after the checkpoint): epoch 1 in metrics.jsonl, a partial temporary file."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / ".state.safetensors.x.tmp").write_bytes(b"\x00" * 10)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    fresh = fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path / "fresh")
    with pytest.warns(UserWarning, match="no complete checkpoint in .*; starting over"):
        resumed = fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path, resume=True)
    assert resumed.history == fresh.history
    assert _epochs(tmp_path) == [1, 2]


def test_resume_rewrites_metrics_from_the_checkpoint(
    digits: TaskData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """metrics.jsonl ahead of the checkpoint (as an older version could leave it) is cut
    back to the checkpoint's history as soon as the resumed run starts."""
    fit(PiggybackModel(make_tiny()), "d", digits, quick(epochs=1), tmp_path, keep_checkpoint=True)
    with (tmp_path / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"epoch": 2}) + "\n")

    monkeypatch.setattr(train_module, "train_one_epoch", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(PiggybackModel(make_tiny()), "d", digits, quick(epochs=3), tmp_path, resume=True)
    assert _epochs(tmp_path) == [1]


def test_a_fresh_run_forgets_an_older_checkpoint(
    digits: TaskData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in its first epoch, a run without --resume must not leave the older run's
    checkpoint for a later --resume to continue."""
    fit(PiggybackModel(make_tiny()), "d", digits, quick(epochs=1), tmp_path, keep_checkpoint=True)
    monkeypatch.setattr(train_module, "train_one_epoch", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path)
    assert not (tmp_path / "checkpoint" / "state.safetensors").exists()
    assert _epochs(tmp_path) == []


def test_a_complete_run_removes_its_checkpoint(digits: TaskData, tmp_path: Path) -> None:
    """The checkpoint is many times the task file; once the run is done it is only kept
    when asked for."""
    fit(PiggybackModel(make_tiny()), "d", digits, quick(epochs=1), tmp_path / "a")
    assert not (tmp_path / "a" / "checkpoint").exists()
    fit(
        PiggybackModel(make_tiny()),
        "d",
        digits,
        quick(epochs=1),
        tmp_path / "b",
        keep_checkpoint=True,
    )
    assert (tmp_path / "b" / "checkpoint" / "state.safetensors").is_file()


def test_damaged_checkpoint_is_refused_with_the_fix(digits: TaskData, tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(TaskFileError, match=r"cannot resume from .*Delete .*checkpoint"):
        fit(PiggybackModel(make_tiny()), "d", digits, quick(), tmp_path, resume=True)


def test_labels_the_head_lacks_are_refused() -> None:
    """On CUDA cross_entropy would end the process with a device-side assert."""
    items = TensorDataset(torch.randn(2, 3, 8, 8), torch.tensor([0, 7]))
    loader = make_loader(items, 2, shuffle=False)
    net = make_tiny(num_classes=4)
    words = r"labels 0\.\.7, but the head has 4 classes"
    with pytest.raises(DataError, match=words):
        evaluate(net, loader, torch.device("cpu"), 4, progress=False)
    with pytest.raises(DataError, match=words):
        train_one_epoch(net, loader, torch.optim.SGD(net.parameters()), torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "lora"}, "method='lora'"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
        ({"device": "tpu:9"}, "device='tpu:9'"),
        ({"num_workers": -1}, "num_workers must be 'auto' or an integer >= 0, got -1"),
    ],
)
def test_bad_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)
