"""Scaling out: torchrun + DistributedDataParallel on the CPU (Gloo), AMP, train-many.

The torchrun runs use a tiny random backbone (timm's test_resnet) on 16 px digits; it
barely learns, but its masks move, which is what the comparison needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import make_tiny
from torch.utils.data import TensorDataset

from piggyback import ConfigError, MaskConfig, PiggybackModel, distributed
from piggyback.backbones import InputSpec, create_backbone, input_spec
from piggyback.cli import main
from piggyback.data import TaskData, load_task_data, make_loader
from piggyback.loop import evaluate
from piggyback.train import TrainConfig, fit, setup_training

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CPU = torch.device("cpu")
# One recipe for every run; the global batch of 16 is 8 per process under torchrun.
# Frozen norms (the paper's recipe): per-task BatchNorm computes its batch statistics per
# process unless --sync-bn (CUDA), so it could not match one process exactly.
RECIPE = {"backbone": "test_resnet", "size": 16, "limit": 100, "batch_size": 16,
          "recipe": "paper", "lr": 3e-3, "head_lr": 3e-3, "device": "cpu", "seed": 0,
          "allow_random_backbone": True}  # fmt: skip
FLAGS = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in RECIPE.items()]
ITEMS = TensorDataset(
    torch.randn(7, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
    torch.tensor([0, 1, 2, 3, 0, 1, 2]),
)  # 7 items: 2 processes cannot share them evenly
TASK = TaskData(ITEMS, ITEMS, ITEMS, ["a", "b", "c", "d"])


def piggyback(*args: str, processes: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", "-m"]
    command = [*(launcher if processes > 1 else [sys.executable, "-m"]), "piggyback", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """torchrun x2: train-many (task a: 1 epoch, task b), then `train --resume` of a to
    2 epochs; and a single process training a for 2 epochs straight."""
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("ddp")
    tasks = [
        {"data": "digits", "task": "a"},
        {"data": "digits", "task": "b", "method": "classifier"},
    ]
    (root / "tasks.yaml").write_text(yaml.safe_dump({**RECIPE, "epochs": 1, "tasks": tasks}))
    many = piggyback("train-many", str(root / "tasks.yaml"), "--out", str(root / "many"),
                     "--no-progress", "--keep-checkpoint", processes=2)  # fmt: skip
    assert many.stdout.count("test top-1") == 2, "rank 0 alone reports, once per task"
    common = ["train", "--data=digits", "--task=a", "--epochs=2", "--no-progress", *FLAGS]
    piggyback(*common, "--resume", "--out", str(root / "many" / "a"), processes=2)
    piggyback(*common, "--out", str(root / "single"))
    # A baseline's folder names its method: it never lands on a task of the same name.
    return {
        "a": root / "many" / "a",
        "b": root / "many" / "b-classifier",
        "single": root / "single",
    }


def fresh_model() -> PiggybackModel:
    torch.manual_seed(RECIPE["seed"])  # as the CLI does: the same random backbone
    return PiggybackModel(create_backbone(RECIPE["backbone"]))


@pytest.mark.slow
def test_rank_zero_writes_each_task_once(runs: dict[str, Path]) -> None:
    for task in ("a", "b"):
        assert [p.name for p in runs[task].glob("*.safetensors")] == [f"{task}.safetensors"]
    lines = (runs["a"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    model = fresh_model()  # both tasks load onto the one backbone they were trained on
    assert {model.load_task(runs[t] / f"{t}.safetensors") for t in ("a", "b")} == {"a", "b"}
    assert model.mask_stats("b").kept == 1.0 and model.mask_stats("a").kept < 1.0


@pytest.mark.slow
def test_torchrun_matches_one_process(runs: dict[str, Path]) -> None:
    """Same global batches (see distributed.train_sampler), gradients averaged over the
    processes: the run is the single-process run up to float summation order."""
    ddp, single = fresh_model(), fresh_model()
    ddp.load_task(runs["a"] / "a.safetensors")
    single.load_task(runs["single"] / "a.safetensors")
    numel = sum(m.numel() for m in single.masks("a").values())
    differing = sum(
        int((ddp.masks("a")[name] != mask).sum()) for name, mask in single.masks("a").items()
    )
    # Bit-exact in practice; a score within float rounding of the threshold could flip.
    assert differing <= numel * 1e-4, f"{differing} of {numel} mask values differ"
    for key, value in single.head.heads["a"].state_dict().items():
        torch.testing.assert_close(ddp.head.heads["a"].state_dict()[key], value)
    rows = [
        [json.loads(line) for line in (runs[r] / "metrics.jsonl").read_text().splitlines()]
        for r in ("a", "single")
    ]
    for ours, theirs in zip(*rows, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)

    # The backbone is untouched: the stored masks and head on a fresh copy of it give
    # exactly the test metrics that rank 0 recorded at the end of training.
    spec = input_spec(ddp.backbone, size=RECIPE["size"])
    test = load_task_data("digits", spec, seed=0, limit=RECIPE["limit"]).test
    ddp.set_task("a")
    metrics = evaluate(ddp, make_loader(test, 16, shuffle=False), CPU, 10)
    recorded = json.loads((runs["a"] / "result.json").read_text())["test"]
    assert metrics["samples"] == recorded["samples"] == 25  # odd: 13 + 12 on 2 processes
    assert metrics["top1"] == recorded["top1"]
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-5)


def _worker(rank: int, store: str, out: str) -> None:
    """One of 2 Gloo processes: DDP reduces only the task's tensors, and evaluation over
    shards of a 7-item set counts each item once."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
        model.add_task("old", 3)  # an earlier task: its head and norms must not be reduced
        network, groups = setup_training(model, "new", TASK, TrainConfig(device="cpu"))
        params = [p for g in groups for p in g["params"]]
        with distributed.data_parallel(network, CPU, params) as ddp:
            reduced = ddp._get_ddp_logging_data()

        shard = distributed.shard(ITEMS)
        metrics = evaluate(make_tiny(), make_loader(shard, 2, shuffle=False), CPU, 4)
        result = {
            "reduced_tensors": reduced["num_parameter_tensors"],
            "reduced_bytes": reduced["total_parameter_size_bytes"],
            "trainable": [len(params), sum(p.numel() * p.element_size() for p in params)],
            "expected": len(model.trainable_parameters("new")),
            "indices": list(shard.indices),
            "metrics": metrics,
        }
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_reduces_the_task_alone_and_evaluates_each_item_once(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        _worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True
    )
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    for result in results:
        assert [result["reduced_tensors"], result["reduced_bytes"]] == result["trainable"]
        assert result["reduced_tensors"] == result["expected"]
    assert sorted(results[0]["indices"] + results[1]["indices"]) == list(range(7))

    alone = evaluate(make_tiny(), make_loader(ITEMS, 2, shuffle=False), CPU, 4)
    for result in results:
        gathered = result["metrics"]
        assert gathered["samples"] == 7  # not 8: no padding item counted twice
        assert gathered["top1"] == alone["top1"] and gathered["per_class"] == alone["per_class"]
        assert gathered["loss"] == pytest.approx(alone["loss"], rel=1e-6)


def test_sync_batchnorm_swaps_the_task_norms_alone() -> None:
    """SyncBatchNorm needs CUDA to run, but the swap itself can be checked here."""
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("old", 3)
    network, _ = setup_training(model, "new", TASK, TrainConfig(device="cpu"))
    norm = model.norms["bn"]
    weight, statistics = norm.norms["new"].weight, norm.norms["new"].running_mean
    restore = distributed._use_sync_batchnorm(network)
    kinds = [type(m).__name__ for m in (norm.norms["new"], norm.norms["old"], norm.base_layer)]
    assert kinds == ["SyncBatchNorm", "BatchNorm2d", "BatchNorm2d"]
    assert norm.norms["new"].weight is weight  # the optimizer's tensors, not copies
    assert norm.norms["new"].running_mean is statistics
    restore()
    assert type(norm.norms["new"]).__name__ == "BatchNorm2d" and norm.norms["new"].weight is weight


def test_bf16_autocast_keeps_scores_fp32(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    data = load_task_data("digits", InputSpec(8, (0.5,) * 3, (0.5,) * 3), limit=32)
    model = PiggybackModel(make_tiny())
    config = TrainConfig(epochs=1, batch_size=16, device="cpu", progress=False, amp="bf16")
    result = fit(model, "d", data, config, tmp_path)
    assert result.history[0]["train_loss"] > 0
    reloaded = PiggybackModel(make_tiny())
    reloaded.load_task(result.task_file)
    assert all(p.dtype == torch.float32 for p in reloaded.trainable_parameters("d"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"amp": "fp16"}, "amp='fp16' needs CUDA"),
        ({"amp": "fp8"}, "amp='fp8'"),
        ({"sync_bn": True}, "sync_bn=True needs CUDA"),
    ],
)
def test_cpu_settings_that_need_cuda(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(device="cpu", **settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"epochs": 1}, "needs a non-empty `tasks:` list"),
        ({"tasks": [{"data": "digits", "backbone": "resnet18"}]}, "which every task shares"),
        ({"tasks": ["digits", "digits"]}, "two tasks are named 'digits'"),
        ({"tasks": [{"data": "digits", "epoch": 2}]}, "unknown settings ['epoch']"),
    ],
)
def test_bad_tasks_file_gives_one_line(
    content: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump(content))
    assert main(["train-many", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and message in error
