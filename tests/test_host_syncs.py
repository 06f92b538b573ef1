"""The paths that run per batch make the host wait for the device at most where they must
(`hostsync`): a forward of a task, a switch, a mixed batch, task inference and a mask
training step, with the accelerators' switch forced on the CPU. On a GPU,
`test_paths_make_no_synchronising_call_on_cuda` checks the same with CUDA's own detector."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from hostsync import host_waits
from torch.utils.data import DataLoader, TensorDataset

import piggyback.bank
from piggyback import MaskConfig, PiggybackModel
from piggyback.bank import MaskBank
from piggyback.loop import evaluate, train_one_epoch
from piggyback.taskinfer import calibrate_task

TASKS = {"a": 3, "b": 5, "c": 4}
# The one read task inference makes: each sample's chosen task, handed back as names.
CHOICE = [("tolist", "taskinfer.py:choose")]


@pytest.fixture
def accelerator_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch as it runs on a GPU (one select for every layer, torch's unpack), not
    numpy's CPU path, which reads the weights on the host by design."""
    monkeypatch.setattr(MaskBank, "unpacks_at_once", lambda self, t: self.kinds[t] == "binary")
    monkeypatch.setattr(piggyback.bank, "_numpy_select", lambda weight, out: False)


def held_tasks(device: str = "cpu") -> PiggybackModel:
    """Three frozen tasks with their own norms and calibration (the features rule's too)."""
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True)).to(device)
    for task, classes in TASKS.items():
        model.add_task(task, classes)
        model.freeze_task(task)
        calibrate_task(model, task, [torch.randn(8, 3, 16, 16, device=device)])
    return model.eval()


def paths(model: PiggybackModel, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    names = list(TASKS)
    interleaved = [names[i % len(names)] for i in range(len(x))]

    def switches() -> None:
        for task in ("b", "a", "c"):
            model.set_task(task)(x)

    return {
        "cached forward": lambda: model.set_task("a")(x),
        "forward after each switch": switches,
        "mixed batch, rows interleaved": lambda: model(x, task_names=interleaved),
        "mixed batch, rows grouped": lambda: model(x, task_names=sorted(interleaved)),
        **{
            f"infer_task, {rule}": lambda rule=rule: model.infer_task(x, rule=rule)
            for rule in ("features", "entropy", "calibrated")
        },
    }


@pytest.mark.usefixtures("accelerator_paths")
def test_per_batch_paths_wait_for_the_device_only_to_hand_back_the_choice() -> None:
    model, x = held_tasks(), torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        for name, run in paths(model, x).items():
            run()  # first call: the switch's flat copy and the statistics' upload
            with host_waits() as seen:
                run()
            assert seen == (CHOICE if name.startswith("infer_task") else []), name


@pytest.mark.usefixtures("accelerator_paths")
def test_a_mask_training_step_waits_for_nothing() -> None:
    """forward, backward and the optimizer's step of a task with its own norms under
    bf16 autocast: piggyback's code reads no device value (Adam reads its step
    counters, which torch keeps on the CPU)."""
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("t", 4)
    model.set_task("t").train()
    optimizer = torch.optim.Adam(model.trainable_parameters("t"), lr=1e-3)
    x, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    step()
    with host_waits() as seen:
        step()
    assert seen == []


def test_the_recorder_sees_each_kind_of_wait() -> None:
    """What `host_waits` is held to: it records reads, value-sized ops and blocking
    uploads made from piggyback's code, and nothing from elsewhere."""
    from piggyback.taskinfer import choose

    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    with host_waits() as seen:
        choose(["a", "b"], scores, 0.5)
        scores.tolist()  # the test's own read
    assert seen == CHOICE
    with host_waits() as seen:
        piggyback.taskfeatures.on_device.__wrapped__((1.0, 2.0), torch.device("cpu"))
    assert seen == []  # an upload through `.to`: not a blocking torch.tensor(device=...)


def cuda_syncs(run: Callable[[], object]) -> int:
    """How many synchronising calls CUDA's detector sees while `run` runs."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_paths_make_no_synchronising_call_on_cuda() -> None:
    """CUDA's own detector (`set_sync_debug_mode`) over the same paths on a GPU: no
    synchronising call but task inference's one read of its choice."""
    model, x = held_tasks("cuda"), torch.randn(6, 3, 16, 16, device="cuda")
    with torch.no_grad():
        for name, run in paths(model, x).items():
            run()
            assert cuda_syncs(run) == (1 if name.startswith("infer_task") else 0), name


def test_training_and_evaluation_read_their_metrics_once_per_pass() -> None:
    """An epoch's loss and accuracy, and an evaluation's, are summed where the batches
    run and read back at the end of the pass, not after every batch (the label check
    reads the loader's labels, which are on the host)."""
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("t", 4)
    model.set_task("t")
    optimizer = torch.optim.Adam(model.trainable_parameters("t"), lr=1e-3)
    data = TensorDataset(torch.randn(12, 3, 16, 16), torch.randint(0, 4, (12,)))
    loader = DataLoader(data, batch_size=4)
    cpu = torch.device("cpu")
    for run in (
        lambda: train_one_epoch(model, loader, optimizer, cpu, progress=False),
        lambda: evaluate(model, loader, cpu, 4, progress=False),
    ):
        with host_waits() as seen:
            hook = model.register_forward_hook(lambda *_: seen.append(("forward", "")))
            try:
                run()
            finally:
                hook.remove()
        kinds = [what for what, where in seen if "_check_batch_labels" not in where]
        batches = len(loader)
        assert kinds[:batches] == ["forward"] * batches and "forward" not in kinds[batches:]
