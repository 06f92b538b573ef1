"""The installed `piggyback` command, run as a user would: a subprocess on real offline data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HUGE_TEXT_CHUNK, png_header
from PIL import Image

from piggyback.cli import _train_config, build_parser, main

SCRIPT = str(Path(sys.executable).parent / "piggyback")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=600, check=False
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run: the embedded backbone learns digits at 32 px, from a YAML config."""
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("cli")
    config = root / "task.yaml"
    config.write_text(
        yaml.safe_dump({"data": "digits", "size": 32, "limit": 64, "epochs": 3, "lr": 1e-2})
    )
    result = run(
        "train", "--config", str(config), "--epochs", "1", "--batch-size", "16",
        "--head-lr", "1e-2", "--out", str(root / "run"), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test top-1" in result.stdout
    return root / "run"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (3e-4, 1e-3, True)),
        (["--recipe", "paper"], (1e-4, 1e-4, False)),
        (["--recipe", "paper", "--lr", "1e-3", "--train-bn"], (1e-3, 1e-4, True)),
        (["--no-train-bn", "--head-lr", "0.01"], (3e-4, 1e-2, False)),
    ],
)
def test_recipe_fills_what_flags_leave_open(flags: list[str], expected: tuple) -> None:
    args = build_parser().parse_args(["train", "--data", "digits", *flags])
    config = _train_config(args)
    assert (config.lr, config.head_lr, args.train_bn) == expected


@pytest.mark.slow
def test_train_writes_resolved_settings(trained: Path) -> None:
    settings = yaml.safe_load((trained / "settings.yaml").read_text())
    assert settings["epochs"] == 1, "a flag must override the config file"
    assert settings["lr"] == 1e-2 and settings["size"] == 32
    assert settings["backbone"] == "efficientnet_lite0"
    assert settings["recipe"] == "default" and settings["train_bn"] is True
    assert (trained / "digits.safetensors").exists()
    assert (trained / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.slow
def test_eval_predict_inspect_export(trained: Path, tmp_path: Path) -> None:
    task_file = str(trained / "digits.safetensors")
    evaluated = run("eval", task_file, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    result = json.loads((trained / "result.json").read_text())
    assert metrics["top1"] == pytest.approx(result["test"]["top1"], abs=1e-9)
    assert len(metrics["per_class"]) == 10

    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (16, 16), color=(index * 200, 30, 30)).save(images / f"{index}.png")
    predicted = run("predict", task_file, str(images), "--topk", "2", "--json")
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)
    assert len(rows) == 2 and all(len(r["labels"]) == 2 for r in rows)
    assert all(r["labels"][0] in [str(i) for i in range(10)] for r in rows)

    plot = tmp_path / "layers.png"
    inspected = run("inspect", task_file, "--plot", str(plot))
    assert inspected.returncode == 0, inspected.stderr
    assert "bits/weight" in inspected.stdout and plot.stat().st_size > 1000

    exported = tmp_path / "baked.safetensors"
    result = run("export", task_file, "--out", str(exported))
    assert result.returncode == 0, result.stderr
    from piggyback.export import load_exported
    from piggyback.pipeline import open_task

    model, _, spec = open_task(task_file)
    x = torch.randn(2, 3, spec.size, spec.size)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(exported)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_onnx_matches_torch(trained: Path, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from piggyback.pipeline import open_task

    onnx_file = tmp_path / "digits.onnx"
    result = run("export", str(trained / "digits.safetensors"), "--out", str(tmp_path / "b"),
                 "--onnx", str(onnx_file))  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, _, spec = open_task(trained / "digits.safetensors")
    x = torch.randn(3, 3, spec.size, spec.size)  # batch 3: the batch axis is dynamic
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_eval_on_a_dataset_with_other_classes(trained: Path, tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.new("RGB", (8, 8), color=(index * 40, 0, 0)).save(
                tmp_path / label / f"{index}.png"
            )
    result = run("eval", str(trained / "digits.safetensors"), "--data", str(tmp_path))
    assert_clean_error(result, "has 10 classes", "has 2")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("train", "--data", "digits", "--backbone", "resnet9000"), ("resnet9000",)),
        (("train", "--data", "/no/such/folder"), ("/no/such/folder",)),
        (("train", "--data", "digits", "--epochs", "0"), ("epochs",)),
        (
            ("train", "--data", "digits", "--backbone", "test_resnet", "--epochs", "1"),
            ("'test_resnet' would have random weights", "--allow-random-backbone"),
        ),
        (("train",), ("--data",)),
        (("inspect", "/no/such.safetensors"), ("does not exist",)),
        (("train", "--config", "/no/such.yaml"), ("no/such.yaml",)),
    ],
)
def test_bad_arguments_give_one_line(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_clean_error(run(*args), *needles)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        pytest.param("a.png,caf\xe9\n".encode("latin-1"), "save it as UTF-8", id="latin-1"),
        pytest.param(f"a.png,0\nb.png,{10**30}\n".encode(), "not a class index", id="label"),
    ],
)
def test_bad_csv_gives_one_line(content: bytes, words: str, tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_bytes(content)
    assert_clean_error(run("train", "--data", str(tmp_path / "list.csv")), "list.csv", words)


def test_resume_without_a_checkpoint_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a kill while writing the first checkpoint leaves: metrics, no state file."""
    pytest.importorskip("sklearn")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    args = [
        "train", "--data", "digits", "--backbone", "test_resnet", "--allow-random-backbone",
        "--size", "16", "--limit", "32", "--epochs", "1", "--out", str(tmp_path), "--resume",
        "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"warning: no complete checkpoint in {tmp_path / 'checkpoint'};")
    assert (tmp_path / "checkpoint" / "state.safetensors").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_corrupt_task_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    assert_clean_error(run("inspect", str(bad)), "not a readable safetensors file")
    assert_clean_error(run("eval", str(bad), "--data", "digits"), "bad.safetensors")


def test_unknown_config_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("data: digits\nepoch: 3\n")
    assert_clean_error(run("train", "--config", str(config)), "unknown settings ['epoch']")


@pytest.mark.parametrize(
    ("encoded", "words"),
    [
        pytest.param(png_header(20_000, 20_000), "at most 50,000,000 pixels", id="bomb"),
        pytest.param(
            png_header(100_000, 1), "100000x1 pixels, more elongated than 64:1", id="strip"
        ),
        pytest.param(
            png_header(4, 4, HUGE_TEXT_CHUNK),
            "too large",
            id="text",
        ),
    ],
)
def test_predict_refuses_oversized_images(encoded: bytes, words: str, tmp_path: Path) -> None:
    """Checked before the task file is even opened, so none is needed."""
    image = tmp_path / "huge.png"
    image.write_bytes(encoded)
    result = run("predict", str(tmp_path / "t.safetensors"), str(image))
    assert_clean_error(result, str(image), words)
