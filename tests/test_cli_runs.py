"""What a user makes with `piggyback train` is never lost, and what `train` accepts the
later commands accept: the cases a new user ran into, each as it happened."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import TINY_RUN, assert_clean_error, run, write_images

from piggyback import MaskConfig, PiggybackModel
from piggyback.backbones import InputSpec, meta_backbone
from piggyback.baked import ModelInfo
from piggyback.cli import main
from piggyback.errors import DataError
from piggyback.images import checked_image
from piggyback.memory import step_bytes
from piggyback.train import degenerate_task_problems, is_better


def digits_run(*flags: str) -> list[str]:
    return [*TINY_RUN, "--epochs", "1", *flags]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_a_baseline_never_overwrites_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 1: the default folders differ per method, a folder with results is refused,
    and --force (the user's say) replaces the run whole."""
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    assert main(digits_run()) == 0
    task_run = tmp_path / "runs" / "digits"
    before = snapshot(task_run)
    assert main(digits_run("--method", "classifier")) == 0
    assert (tmp_path / "runs" / "digits-classifier" / "digits.safetensors").is_file()
    assert snapshot(task_run) == before
    capsys.readouterr()

    assert main(digits_run("--method", "finetune", "--out", str(task_run))) == 2
    error = one_line_error(capsys)
    assert "holds a finished run (result.json, digits.safetensors)" in error
    assert "--out" in error and "--force" in error
    assert snapshot(task_run) == before

    assert main(digits_run("--method", "finetune", "--out", str(task_run), "--force")) == 0
    assert sorted(snapshot(task_run)) == [
        "digits.finetuned.safetensors", "metrics.jsonl", "result.json", "settings.yaml",
    ]  # fmt: skip
    assert yaml.safe_load((task_run / "settings.yaml").read_text())["method"] == "finetune"


def test_a_checkpoint_is_resumed_or_refused_never_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 2: a killed run's folder (a checkpoint, no result) without --resume."""
    pytest.importorskip("sklearn")
    assert main(digits_run("--out", str(tmp_path), "--keep-checkpoint")) == 0
    (tmp_path / "result.json").unlink()  # as a run killed after its first epoch leaves it
    (tmp_path / "digits.safetensors").unlink()
    state = (tmp_path / "checkpoint" / "state.safetensors").read_bytes()
    capsys.readouterr()
    assert main([*TINY_RUN, "--epochs", "3", "--out", str(tmp_path)]) == 2
    error = one_line_error(capsys)
    assert "checkpoint of an unfinished run after epoch 1" in error
    assert "--resume" in error and "--force" in error
    assert (tmp_path / "checkpoint" / "state.safetensors").read_bytes() == state
    assert main([*TINY_RUN, "--epochs", "2", "--out", str(tmp_path), "--resume"]) == 0
    assert "resuming digits" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (("--size", "2100"), ("--size must be an integer in [1, 2,048], got 2100",)),
        (("--size", "0"), ("[1, 2,048]",)),
        (("--task", "t" * 200), ("eval refuses", "'task' must be a string of at most 128")),
        (
            ("--size", "2048", "--batch-size", "100000"),
            ("GB of activations", "lower --size, or --batch-size"),
        ),
    ],
)
def test_train_refuses_before_any_work_what_later_commands_refuse(
    flags: tuple[str, ...], needles: tuple[str, ...], tmp_path: Path
) -> None:
    """Case 3: eval and inspect refuse task files above 2,048 px; a batch that cannot fit
    is refused instead of growing until the kernel kills the process."""
    result = run(*TINY_RUN, "--out", str(tmp_path / "run"), *flags)
    assert_clean_error(result, *needles)
    assert not (tmp_path / "run").exists(), "nothing is written before the checks"


def test_activation_estimate_grows_with_size_and_batch() -> None:
    network = meta_backbone("test_resnet")
    small = step_bytes(network, 32, 4, method="piggyback", amp=None)
    assert small > 0
    assert step_bytes(network, 64, 4, method="piggyback", amp=None) > 3 * small
    assert step_bytes(network, 32, 8, method="piggyback", amp=None) == 2 * small
    assert step_bytes(network, 32, 4, method="piggyback", amp="bf16") == small // 2
    assert step_bytes(network, 32, 4, method="classifier", amp=None) < small


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A task trained on a folder given as a relative path, on a seeded random backbone."""
    root = tmp_path_factory.mktemp("folder")
    for colour, label in enumerate(("cat", "dog")):
        write_images(root / "photos" / label, [(20, 16)] * 10, colour)
    result = run(
        "train", "--data", "photos", "--backbone", "test_resnet", "--allow-random-backbone",
        "--size", "16", "--epochs", "1", "--device", "cpu", cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root


def test_a_task_file_works_from_any_folder(folder_run: Path, tmp_path: Path) -> None:
    """Case 4 (and a random backbone, rebuilt from the recorded seed: point 8)."""
    task_file = folder_run / "runs" / "photos" / "photos.safetensors"
    evaluated = run("eval", str(task_file), "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["samples"] == 2
    predicted = run("predict", str(task_file), str(folder_run / "photos" / "cat"), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr

    moved = tmp_path / "task.safetensors"
    shutil.copy(task_file, moved)
    (folder_run / "photos").rename(folder_run / "elsewhere")
    try:
        missing = run("eval", str(moved), cwd=tmp_path)
        assert_clean_error(missing, str(folder_run / "photos"), "not found here", "--data")
        given = run("eval", str(moved), "--data", str(folder_run / "elsewhere"), cwd=tmp_path)
        assert given.returncode == 0, given.stderr
    finally:
        (folder_run / "elsewhere").rename(folder_run / "photos")


def test_a_forced_wrong_backbone_is_one_short_line(folder_run: Path) -> None:
    """Case 5."""
    task_file = folder_run / "runs" / "photos" / "photos.safetensors"
    image = folder_run / "photos" / "cat" / "0.png"
    result = run("predict", str(task_file), str(image), "--backbone", "efficientnet_lite0")
    assert_clean_error(result, "trained on backbone 'test_resnet'", "leave out --backbone")
    assert len(result.stderr) < 200


def test_a_tie_in_top1_goes_to_the_lower_loss() -> None:
    """Case 6: epoch 1 (val loss 0.030) must not beat epoch 3 (0.0039) at the same top-1."""
    first = {"top1": 1.0, "loss": 0.030}
    assert is_better({"top1": 1.0, "loss": 0.0039}, first)
    assert not is_better({"top1": 1.0, "loss": 0.031}, first)
    assert is_better({"top1": 0.9, "loss": 0.5}, {"top1": -1.0, "loss": float("inf")})


def test_degenerate_warnings_say_what_the_task_holds_per_method() -> None:
    (pig,) = degenerate_task_problems(0.9, 10, 1.0, own_norms=True)
    assert "a new head and its own norm layers" in pig
    assert "only a new head" not in pig and "--method classifier" not in pig
    (classifier,) = degenerate_task_problems(0.1, 10, None, method="classifier")
    assert "mask" not in classifier and "--head-lr" in classifier
    (finetune,) = degenerate_task_problems(0.1, 10, None, method="finetune")
    assert "mask" not in finetune and "lower --lr" in finetune
    (tiny,) = degenerate_task_problems(0.0, 2, 1.0 - 1e-3, train_images=2)
    assert "too few" in tiny and "collapse" not in tiny


def test_the_exported_input_spec_states_the_crop() -> None:
    """Case 7: a user feeding the ONNX file reads that images are cropped, not squashed."""
    spec = InputSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", crop_pct=0.875)
    header = ModelInfo("t", 2, None, spec).header()
    assert "resize its shorter side to 36 px" in header["preprocessing"]
    assert "crop the centre 32x32" in header["preprocessing"]


def test_logs_get_a_data_summary_and_a_line_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Case 8: no terminal, no progress bar, still a line per epoch."""
    pytest.importorskip("sklearn")
    assert main([*TINY_RUN, "--epochs", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"digits: 10 classes, 32 train / 8 val / 8 test images at 16 px (piggyback) -> {tmp_path}"
    )
    assert [line.split(":")[0] for line in out[1:3]] == ["digits 1/2", "digits 2/2"]


def test_too_little_data_is_named_as_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for colour, label in enumerate(("a", "b", "c")):
        write_images(tmp_path / "data" / label, [(16, 16)] * 3, colour)
    run_flags = ["--backbone", "test_resnet", "--allow-random-backbone", "--size", "8"]
    args = ["train", "--data", str(tmp_path / "data"), *run_flags, "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "run"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "training images for 3 classes" in err and "too few" in err


def test_ctrl_c_tells_how_to_go_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(_: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr("piggyback.cli._train", interrupted)
    assert main(["train", "--data", "digits"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_backbones_are_listed_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backbones", "resnet1"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert "torchvision:resnet18" in names and "efficientnet_lite0" not in names
    assert_clean_error(run("train", "--data", "digits", "--backbone", "resnt18"), "backbones")


def test_an_undecodable_upload_names_no_python_object() -> None:
    with pytest.raises(DataError) as caught, checked_image(io.BytesIO(b"junk"), "image 1"):
        pass
    assert "BytesIO" not in str(caught.value) and "0x" not in str(caught.value)
    assert str(caught.value).startswith("cannot read image 1 (UnidentifiedImageError")


def test_a_broken_yaml_file_is_named(tmp_path: Path) -> None:
    config = tmp_path / "task.yaml"
    config.write_text("data: digits\nepochs: [3\n")
    result = run("train", "--config", str(config))
    assert_clean_error(result, f"{config} is not valid YAML", "line 3")
    assert "unicode string" not in result.stderr


def test_what_save_task_writes_is_what_keeps_running(tmp_path: Path) -> None:
    """Per-task norms are kept at 16 bits: saving rounds the model in memory too."""
    from conftest import make_tiny

    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("t", 3)
    with torch.no_grad():
        for parameter in model.trainable_parameters("t", "norm"):
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.set_task("t").eval()
    model.save_task("t", tmp_path / "t.safetensors")
    loaded = PiggybackModel(model.base, MaskConfig(train_bn=True))
    loaded.load_task(tmp_path / "t.safetensors")
    loaded.set_task("t").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
