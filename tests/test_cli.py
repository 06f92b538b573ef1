"""The installed `piggyback` command, run as a user would: a subprocess on real offline data."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HUGE_TEXT_CHUNK, png_header
from PIL import Image

from piggyback.cli import build_parser, main
from piggyback.trainrun import show_progress, train_config

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


def write_images(folder: Path, sizes: list[tuple[int, int]], colour: int = 0) -> Path:
    """Noisy RGB images of the given sizes (not square: resizing and cropping matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(colour)
    for index, (width, height) in enumerate(sizes):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        pixels[..., colour % 3] = 200
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned baseline of a 2-class folder task on a tiny random backbone: its file
    holds the whole network, so nothing needs to rebuild the random backbone."""
    root = tmp_path_factory.mktemp("finetuned")
    for colour, label in enumerate(("cat", "dog")):
        write_images(root / "data" / label, [(20 + i, 16) for i in range(6)], colour)
    result = run(
        "train", "--data", str(root / "data"), "--method", "finetune", "--backbone",
        "test_resnet", "--allow-random-backbone", "--size", "16", "--epochs", "1",
        "--out", str(root / "run"), "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "it/s" not in result.stderr, "no progress bars in a log"
    return root / "run" / "data.finetuned.safetensors"


def test_fine_tuned_models_are_read_back(finetuned: Path, tmp_path: Path) -> None:
    """What `train --method finetune` writes, eval, predict and inspect take; a 2-class
    task shows no top-5 and at most its 2 classes."""
    evaluated = run("eval", str(finetuned))
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stdout.startswith("fine-tuned model data on ")
    assert "top-1" in evaluated.stdout and "top-5" not in evaluated.stdout
    predicted = run("predict", str(finetuned), str(finetuned.parent.parent / "data"), "--json")
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout)
    assert len(rows) == 12 and all(sorted(r["labels"]) == ["cat", "dog"] for r in rows)
    inspected = run("inspect", str(finetuned))
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stdout.startswith("fine-tuned model data: 2 classes")
    assert "input: 16 px" in inspected.stdout and "(finetune)" in inspected.stdout
    assert_clean_error(run("inspect", str(finetuned), "--plot", "p.png"), "has none")
    assert_clean_error(
        run("eval", str(finetuned), "--backbone", "resnet18"), "--backbone and --weights apply"
    )


def test_predict_skips_unreadable_images_with_one_line_each(
    finetuned: Path, tmp_path: Path
) -> None:
    images = write_images(tmp_path / "images", [(18, 16), (16, 20)])
    (images / "broken.png").write_bytes(b"not a png")
    missing = tmp_path / "missing.png"
    result = run("predict", str(finetuned), str(images), str(missing))
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        str(images / "0.png"),
        str(images / "1.png"),
    ]
    assert result.stderr.splitlines() == [
        f"warning: skipped: cannot read image {images / 'broken.png'} (UnidentifiedImageError: "
        f"cannot identify image file '{images / 'broken.png'}')",
        f"warning: skipped: image {missing} does not exist",
    ]
    strict = run("predict", str(finetuned), str(images), "--strict")
    assert_clean_error(strict, "broken.png", "leave out --strict to skip")
    assert "strict=False" not in strict.stderr


def test_unreadable_training_images_give_one_clean_warning(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    for colour, label in enumerate(("a", "b")):
        write_images(tmp_path / label, [(16, 16)] * 5, colour)
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    result = run("train", "--data", str(tmp_path), "--backbone", "test_resnet",
                 "--allow-random-backbone", "--size", "8", "--epochs", "1", "--method",
                 "classifier", "--out", str(tmp_path / "run"), "--device", "cpu")  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert warnings == [
        f"warning: skipped 1 unreadable image(s) of 11; first: cannot read image "
        f"{tmp_path / 'a' / 'broken.png'} (UnidentifiedImageError: cannot identify image file "
        f"'{tmp_path / 'a' / 'broken.png'}')"
    ]
    assert "UserWarning" not in result.stderr and "Warning:" not in result.stderr


VERBS = (
    "train", "train-many", "eval", "predict", "inspect", "export", "demo", "serve", "backbones",
)  # fmt: skip


@pytest.mark.parametrize("verb", VERBS)
def test_help_tells_every_flag_its_default_and_an_example(verb: str) -> None:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    command = subparsers.choices[verb]
    text = command.format_help()
    assert f"examples:\n  piggyback {verb}" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{verb} {action.dest} has no help"
        shown = action.default not in (None, False, argparse.SUPPRESS)
        assert not shown or "%(default)s" in command.formatter_class("x")._get_help_string(
            action
        ), f"{verb} {action.dest} hides its default"


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
    config = train_config(args)
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
    from piggyback.baked import read_baked
    from piggyback.pipeline import open_task

    model, _, spec = open_task(task_file)
    info, baked = read_baked(exported)
    assert info.spec == spec and info.metadata["data"] == "digits"
    x = torch.randn(2, 3, spec.size, spec.size)
    with torch.no_grad():
        torch.testing.assert_close(baked(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_exports_are_read_back_like_task_files(trained: Path, tmp_path: Path) -> None:
    """eval, predict and inspect take a baked export as they take its task file, with
    the same data, preprocessing and numbers."""
    task_file, baked = trained / "digits.safetensors", tmp_path / "digits-baked.safetensors"
    assert run("export", str(task_file), "--out", str(baked)).returncode == 0
    images = write_images(tmp_path / "images", sizes=[(40, 24), (16, 30)])
    ours, theirs = (json.loads(run("eval", str(p), "--json").stdout) for p in (baked, task_file))
    assert ours.pop("loss") == pytest.approx(theirs.pop("loss"), abs=1e-4)
    assert ours == theirs
    ours, theirs = (
        json.loads(run("predict", str(p), str(images), "--json").stdout) for p in (baked, task_file)
    )
    assert [r["labels"] for r in ours] == [r["labels"] for r in theirs]
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-4)
    inspected = run("inspect", str(baked))
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.stdout.startswith("baked model digits: 10 classes")
    assert "input: 32 px, bicubic resize, crop_pct 1.0" in inspected.stdout


@pytest.mark.slow
def test_onnx_fed_as_its_metadata_says_gives_predicts_numbers(
    trained: Path, tmp_path: Path
) -> None:
    """The ONNX file records the preprocessing training applied (as metadata_props);
    preparing images that way, independently of piggyback, gives `predict`'s numbers."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from torchvision.transforms.v2 import functional as TF

    onnx_file, task_file = tmp_path / "digits.onnx", str(trained / "digits.safetensors")
    result = run("export", task_file, "--out", str(tmp_path / "b"), "--onnx", str(onnx_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"wrote {tmp_path / 'b'}", f"wrote {onnx_file}"]
    assert result.stderr == "", "no torch.onnx progress chatter"
    props = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    spec, names = json.loads(props["input_spec"]), json.loads(props["class_names"])
    assert spec["crop_pct"] == 1.0 and props["task"] == "digits"

    images = write_images(tmp_path / "images", sizes=[(40, 24), (16, 30), (32, 32)])
    predicted = run("predict", task_file, str(images), "--topk", "10", "--json")
    assert predicted.returncode == 0, predicted.stderr
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for row in json.loads(predicted.stdout):
        pixels = TF.pil_to_tensor(Image.open(row["image"]).convert("RGB"))
        pixels = TF.resize(
            pixels,
            math.floor(spec["size"] / spec["crop_pct"]),
            interpolation=TF.InterpolationMode(spec["interpolation"]),
            antialias=True,
        )
        pixels = TF.center_crop(pixels, spec["size"]).float() / 255
        pixels = TF.normalize(pixels, spec["mean"], spec["std"])
        (logits,) = session.run(["logits"], {"images": pixels[None].numpy()})
        probabilities = torch.from_numpy(logits[0]).softmax(0)
        expected = [round(float(probabilities[names.index(label)]), 6) for label in row["labels"]]
        assert row["probabilities"] == pytest.approx(expected, abs=1e-4)


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
        (("predict", "t.safetensors", "x.png", "--topk", "0"), ("--topk must be at least 1",)),
        (("eval", "t.safetensors", "--batch-size", "0"), ("--batch-size must be at least 1",)),
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


TINY_RUN = [
    "train", "--data", "digits", "--backbone", "test_resnet", "--allow-random-backbone",
    "--size", "16", "--limit", "32", "--device", "cpu",
]  # fmt: skip


def test_resume_without_a_checkpoint_says_so_and_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a kill while writing the first checkpoint leaves: metrics, no state file."""
    pytest.importorskip("sklearn")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert main([*TINY_RUN, "--epochs", "1", "--out", str(tmp_path), "--resume"]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"warning: --resume: nothing to resume in {tmp_path / 'checkpoint'}")
    assert first.endswith("training from epoch 1")
    assert not (tmp_path / "checkpoint").exists(), "a complete run removes its checkpoint"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_resume_says_where_it_goes_on_and_refuses_another_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    first = [*TINY_RUN, "--out", str(tmp_path), "--epochs", "1", "--keep-checkpoint"]
    assert main(first) == 0
    best = json.loads((tmp_path / "result.json").read_text())["history"][0]["val_top1"]
    capsys.readouterr()

    changed = [*TINY_RUN, "--size", "24", "--seed", "3", "--out", str(tmp_path)]
    assert main([*changed, "--epochs", "2", "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("piggyback train: error: --resume would ")
    assert "--size 24 (the run used 16), --seed 3 (the run used 0)" in error

    assert main([*first, "--epochs", "2", "--resume", "--lr", "1e-3"]) == 0, "lr may change"
    out = capsys.readouterr().out
    assert out.startswith(
        f"resuming digits from {tmp_path / 'checkpoint'}: 1 of 2 epochs done, best so far "
        f"epoch 1 (val top-1 {best:.4f})"
    )
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_progress_bars_only_on_a_terminal_or_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sklearn")
    assert main([*TINY_RUN, "--epochs", "1", "--out", str(tmp_path / "log")]) == 0
    assert "it/s" not in capsys.readouterr().err, "stderr is no terminal here: no bars"
    assert main([*TINY_RUN, "--epochs", "1", "--out", str(tmp_path / "a"), "--progress"]) == 0
    assert "it/s" in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(None) and not show_progress(False)


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


def test_resume_skips_a_run_that_completed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finished run removed its checkpoint; `--resume` (as train-many passes it to every
    task) must not train it again from epoch 1."""
    pytest.importorskip("sklearn")
    run = [*TINY_RUN, "--epochs", "1", "--out", str(tmp_path)]
    assert main(run) == 0
    task_file = next(tmp_path.glob("*.safetensors"))
    written = task_file.stat().st_mtime_ns
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0
    said = capsys.readouterr().out
    assert "already complete" in said and "--keep-checkpoint" in said and "--force" in said
    assert task_file.stat().st_mtime_ns == written
