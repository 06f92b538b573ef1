"""Frozen tasks' norm layers held as values in the model's NormBank, not as modules: every
path that reads them gives, bit for bit, what a module of the task's own gives.

The reference is the same task with modules of its own: `trainable_parameters` turns a
frozen task's norms back into modules, the way every task held them before.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors import safe_open
from test_bank import same_bits
from test_model import train_steps
from timm.layers import BatchNormAct2d
from torch import nn

from piggyback import MaskConfig, PiggybackModel, normbank, read_task_file
from piggyback.errors import ConfigError
from piggyback.store import task_config


class NormZoo(nn.Module):
    """The norm types a backbone may hold: timm's BatchNorm with its activation as a
    child, GroupNorm, InstanceNorm with running statistics, and LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_act = BatchNormAct2d(8)
        self.group = nn.GroupNorm(2, 8)
        self.instance = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.hidden = nn.Linear(8, 8)
        self.layer = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.instance(self.group(self.bn_act(self.stem(x)))).mean((2, 3))
        return self.fc(self.layer(self.hidden(x)))


def make_zoo() -> NormZoo:
    torch.manual_seed(0)
    return NormZoo().eval()


NETS: dict[str, Callable[[], nn.Module]] = {"tiny": make_tiny, "zoo": make_zoo}


def task_files(net: str, tmp_path: Path, images: torch.Tensor) -> tuple[PiggybackModel, dict]:
    """A model that trained tasks a and b (own norms) and froze them, and their files."""
    model = PiggybackModel(NETS[net](), MaskConfig(train_bn=True))
    paths = {}
    for task in ("a", "b"):
        model.add_task(task, 3)
        train_steps(model, task, images)
        model.freeze_task(task)
        paths[task] = model.save_task(task, tmp_path / task)
    return model, paths


def loaded(net: str, paths: dict, *, modules: bool = False) -> PiggybackModel:
    """The tasks loaded from their files; with `modules`, their norms as modules of their
    own (the old way)."""
    config = task_config(read_task_file(next(iter(paths.values())))[0])
    model = PiggybackModel(NETS[net](), config).eval()
    for path in paths.values():
        task = model.load_task(path)
        if modules:
            model.trainable_parameters(task)
    return model


def run(model: PiggybackModel, task: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.set_task(task)(x)


Trained = tuple[str, PiggybackModel, dict]


@pytest.fixture(params=list(NETS))
def trained(request: pytest.FixtureRequest, tmp_path: Path, images: torch.Tensor) -> Trained:
    """(the net's name, the model that trained and froze tasks a and b, their files)"""
    return (request.param, *task_files(request.param, tmp_path, images))


def test_a_loaded_or_frozen_tasks_norms_are_values_in_the_bank(trained: Trained) -> None:
    net, trained_model, paths = trained
    model = loaded(net, paths)
    for holder in (trained_model, model):
        for norm in holder.norms.values():
            assert norm.own_module("a") is norm.own_module("b") is None
            assert sorted(norm.norms) == ["a", "b"]
        assert holder.norm_bank.tasks == ["a", "b"]
    assert loaded(net, paths, modules=True).norm_bank.tasks == []


def test_outputs_equal_the_module_path_bit_for_bit_in_eval_and_train_mode(
    trained: Trained, images: torch.Tensor
) -> None:
    net, _, paths = trained
    banked, modules = loaded(net, paths), loaded(net, paths, modules=True)
    for task in ("a", "b", "a"):
        assert same_bits(run(banked, task, images), run(modules, task, images)), task
        assert same_bits(run(banked, task, images), banked.bake(task)(images).detach())
    outputs = []
    for model in (banked, modules):  # batch statistics, and running ones updated in place
        model.train()
        outputs.append([run(model, task, images[i:]) for i, task in enumerate("abba")])
        model.eval()
    assert all(map(same_bits, *outputs))
    for task in ("a", "b"):
        assert same_bits(run(banked, task, images), run(modules, task, images)), task
        for layer, norm in banked.norms.items():
            theirs = modules.norms[layer].norms[task].state_dict()
            assert all(torch.equal(v, theirs[k]) for k, v in norm.norms[task].state_dict().items())


def test_a_mixed_batch_equals_the_per_task_loop_bit_for_bit(
    trained: Trained, images: torch.Tensor
) -> None:
    net, _, paths = trained
    model = loaded(net, paths)
    names = ["b", "a", "a", "b", "a", "b"]
    with torch.no_grad():
        mixed = model(images, task_names=names)
    for task in ("a", "b"):
        rows = torch.tensor([row for row, name in enumerate(names) if name == task])
        assert same_bits(mixed[rows], run(model, task, images[rows])), task


def test_save_load_save_gives_the_same_file(tmp_path: Path, images: torch.Tensor) -> None:
    """The same header and tensors to the bit (safetensors orders a header's keys as it
    likes, so the bytes may differ). The trained model's config selects layers by type, a
    loaded one's by name: only the first file's config differs from the next."""
    _, paths = task_files("zoo", tmp_path, images)
    once = {t: loaded("zoo", paths).save_task(t, tmp_path / "1" / t) for t in paths}
    twice = {t: loaded("zoo", once).save_task(t, tmp_path / "2" / t) for t in paths}
    for task in paths:
        first, second, third = (contents(p[task]) for p in (paths, once, twice))
        assert second == third, task
        assert first[1] == second[1] and first[0].keys() == second[0].keys()


def contents(path: Path) -> tuple[dict, dict]:
    """A file's header and its tensors' bytes."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        header = handle.metadata()
    meta = json.loads(header.pop("piggyback"))
    meta.pop("config")
    raw = {k: (v.dtype, v.shape, v.numpy().tobytes()) for k, v in tensors.items()}
    return {**header, **meta}, raw


def test_train_freeze_then_go_on_training_and_freeze_again(
    tmp_path: Path, images: torch.Tensor
) -> None:
    trained, paths = task_files("tiny", tmp_path, images)
    fresh = loaded("tiny", paths)
    assert same_bits(run(trained, "a", images), run(fresh, "a", images))  # as its file
    before_b = run(trained, "b", images)
    train_steps(trained, "a", images)  # its head and norms: modules of their own again
    assert all(norm.own_module("a") is not None for norm in trained.norms.values())
    assert "a" not in trained.norm_bank
    assert not same_bits(run(trained, "a", images), run(fresh, "a", images))
    trained.freeze_task("a")
    assert trained.norm_bank.tasks == ["b", "a"]
    assert same_bits(run(trained, "b", images), before_b)
    refrozen = trained.save_task("a", tmp_path / "refrozen" / "a")
    again = loaded("tiny", {"a": refrozen})
    assert same_bits(run(trained, "a", images), run(again, "a", images))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_move_moves_the_bank_with_the_model(
    dtype: torch.dtype, tmp_path: Path, images: torch.Tensor
) -> None:
    _, paths = task_files("zoo", tmp_path, images)
    banked, modules = loaded("zoo", paths), loaded("zoo", paths, modules=True)
    run(banked, "a", images)  # the runner holds views of the float32 values: made afresh
    for model in (banked, modules):
        model.to(dtype)
    x = images.to(dtype)
    for task in ("a", "b"):
        assert same_bits(run(banked, task, x), run(modules, task, x)), task


def test_a_frozen_task_costs_its_tensors_and_a_few_objects(
    tmp_path: Path, images: torch.Tensor
) -> None:
    _, paths = task_files("zoo", tmp_path, images)
    model = PiggybackModel(make_zoo(), MaskConfig(train_bn=True)).eval()
    modules, tensors = len(list(model.modules())), distinct_tensors(model)
    for copy_number in range(5):
        model.load_task(paths["a"], name=f"a{copy_number}")
    # per task: the head (a module, weight and bias), masks, one flat tensor per dtype
    assert len(list(model.modules())) - modules == 5 * 2
    assert distinct_tensors(model) - tensors == 5 * (2 + 1 + model.norm_bank.groups)
    norm_numel = sum(
        t.numel() for n in model.norms.values() for t in n.base_layer.state_dict().values()
    )
    assert sum(t.numel() for t in model.norm_bank.flat("a3")) == norm_numel


def distinct_tensors(model: nn.Module) -> int:
    """Tensors in the state_dict (the head is there twice: as `head`, and in the backbone)."""
    return len({t.data_ptr() for t in model.state_dict().values()})


def test_the_layer_a_frozen_task_reads_is_written_through(
    tmp_path: Path, images: torch.Tensor
) -> None:
    _, paths = task_files("tiny", tmp_path, images)
    model = loaded("tiny", paths)
    before = run(model, "a", images)
    norm = model.norms["bn"]
    with torch.no_grad():
        norm.norms["a"].weight.mul_(2)  # a copy of the layer, holding the bank's tensors
    assert not same_bits(run(model, "a", images), before)
    copied = copy.deepcopy(model)
    assert same_bits(run(copied, "a", images), run(model, "a", images))
    keys = [k for k in model.state_dict() if k.startswith("norm_bank.")]
    assert keys == [f"norm_bank.flats.{t}.{g}" for t in "ab" for g in range(2)]
    model.remove_task("a")
    assert "a" not in norm.norms and norm._bound is None
    assert not any(".a." in k for k in model.state_dict())


def test_the_views_of_the_tasks_used_last_are_kept(
    tmp_path: Path, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixed batch asks for each of its tasks in turn: their views are made once."""
    _, paths = task_files("tiny", tmp_path, images)
    model = loaded("tiny", paths)
    bank = model.norm_bank
    a_views, b_views = bank.views("a", 0), bank.views("b", 0)
    assert bank.views("a", 0) is a_views and bank.views("b", 0) is b_views
    monkeypatch.setattr(normbank, "VIEWS_KEPT", 1)
    assert bank.views("a", 0) is a_views  # b's views, the least recently used, go
    assert bank.views("b", 0) is not b_views
    model.remove_task("b")
    assert list(bank._views) == []  # a's went for b's; b's with the task


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_task_file_loads_onto_a_gpu_as_onto_the_cpu(tmp_path: Path, images: torch.Tensor) -> None:
    """Its masks decode on the GPU and its norm values move there joined: the same bits."""
    _, paths = task_files("zoo", tmp_path, images)
    on_cpu = loaded("zoo", paths)
    config = task_config(read_task_file(paths["a"])[0])
    on_gpu = PiggybackModel(make_zoo().cuda(), config).eval()
    for path in paths.values():
        on_gpu.load_task(path)
    for task in ("a", "b"):
        assert on_gpu.bank.packed(task).is_cuda
        assert torch.equal(on_gpu.bank.packed(task).cpu(), on_cpu.bank.packed(task))
        flats = zip(on_gpu.norm_bank.flat(task), on_cpu.norm_bank.flat(task), strict=True)
        for gpu_flat, cpu_flat in flats:
            assert gpu_flat.is_cuda and torch.equal(gpu_flat.cpu(), cpu_flat)


def test_values_from_other_devices_move_joined_in_order() -> None:
    """A task file's values (on the CPU) reach the backbone's device in one copy per
    device; the backbone's own stay where they are (the meta device stands in for a GPU)."""
    on_cpu = [torch.arange(3.0), torch.arange(2.0) + 10]
    here = torch.zeros(4, device="meta")
    moved = normbank._moved_joined([on_cpu[0], here, on_cpu[1]], torch.device("meta"))
    assert [t.device.type for t in moved] == ["meta"] * 3
    assert [t.numel() for t in moved] == [3, 4, 2] and moved[1] is here


def test_a_norm_bank_refuses_a_dtype_spread_over_devices() -> None:
    bank = normbank.NormBank([nn.BatchNorm2d(2), nn.BatchNorm2d(3, device="meta")])
    with pytest.raises(ConfigError, match="one device"):
        bank.store("a", [{}, {}])


def test_a_move_drops_the_views_of_the_old_tensors() -> None:
    bank = normbank.NormBank([nn.BatchNorm2d(2)])
    for task in "ab":
        bank.store(task, [{}])
        bank.views(task, 0)
    bank.double()
    assert not bank._views  # not the old float32 flats, alive until each task is asked for
    assert bank.views("a", 0)["weight"].dtype == torch.float64
