"""Resident packed masks and W * mask derived from them: bit for bit what the old path gave.

The old path, kept here as the reference: a stored binary mask selected the weight with
`torch.where(mask != 0, W, 0)`, a ternary one multiplied `W * mask.float()`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny
from torch import nn

from piggyback import MaskConfig, PiggybackModel
from piggyback.bank import MaskBank, masked_into, masks_into
from piggyback.bits import unpack_mask
from piggyback.errors import ConfigError
from piggyback.layers import copy_leaf

INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
          torch.bfloat16: torch.int16}  # fmt: skip


def old_masked_weight(weight: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "binary":
        return torch.where(mask != 0, weight, weight.new_zeros(()))
    return weight * mask.float().to(weight.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to the bit: -0.0 differs from +0.0, and NaN equals itself."""
    return a.dtype == b.dtype and torch.equal(a.view(INT_OF[a.dtype]), b.view(INT_OF[b.dtype]))


def awkward_weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random weights with the values a product and a select treat differently."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    special = torch.tensor([-0.0, float("nan"), float("-inf"), -1.5], dtype=dtype)
    count = min(4, weight.numel())
    weight.view(-1)[:count] = special[:count]
    return weight


def random_masks(shapes: list[tuple[int, ...]], kind: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    low = 0 if kind == "binary" else -1
    return [torch.randint(low, 2, shape, generator=generator, dtype=torch.int8) for shape in shapes]


SHAPES = [(3, 5), (7,), (2, 3, 3, 3), (1,), (2**18 + 9,), (4, 9)]  # unaligned starts; and
# one weight of more values than the CPU path unpacks at a time (2 ** 18)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("path", ["numpy", "threads", "torch", "flat", "out"])
def test_masked_weights_equal_the_old_path_bit_for_bit(
    kind: str, dtype: torch.dtype, path: str
) -> None:
    masks = random_masks(SHAPES, kind, seed=1)
    bank = MaskBank([m.numel() for m in masks])
    bank.store("t", masks, kind, torch.device("cpu"))
    keep_all = unpack_mask(bank.packed("t"), bank.numel, kind, torch.bool)
    start = 0
    for index, (shape, mask) in enumerate(zip(SHAPES, masks, strict=True)):
        weight = awkward_weight(shape, dtype, seed=index)
        if path == "torch":  # a transposed weight is not numpy's: the torch.where path
            weight = weight.t().contiguous().t() if weight.dim() == 2 else weight
        expected = old_masked_weight(weight, mask, kind)
        keep = keep_all[start : start + weight.numel()] if path == "flat" else None
        out = torch.full_like(weight, 7.0) if path == "out" else None
        threads = torch.get_num_threads()
        torch.set_num_threads(3 if path == "threads" else 1)  # chunks split over threads
        try:
            got = masked_into(weight, bank, "t", start, out, keep)
        finally:
            torch.set_num_threads(threads)
        assert same_bits(got.contiguous(), expected.contiguous())
        assert out is None or got is out
        assert torch.equal(bank.values("t", start, weight.numel(), torch.int8), mask.flatten())
        start += weight.numel()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("device", "threads"), [("cpu", 1), ("cpu", 3), pytest.param("cuda", 1, marks=CUDA)]
)
def test_all_layers_at_once_equal_the_old_path_bit_for_bit(
    kind: str, dtype: torch.dtype, device: str, threads: int
) -> None:
    """masks_into: every layer of a task in one go, the values end to end split over
    threads (parts begin and end inside layers), each written into its own tensor; on a
    GPU from one unpack of the whole task."""
    masks = random_masks(SHAPES, kind, seed=2)
    bank = MaskBank([m.numel() for m in masks])
    bank.store("t", masks, kind, torch.device(device))
    weights = [awkward_weight(shape, dtype, seed=i).to(device) for i, shape in enumerate(SHAPES)]
    starts = [0, *itertools.accumulate(w.numel() for w in weights)][:-1]
    outs = [torch.full_like(w, 7.0) for w in weights]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        masks_into(bank, "t", list(zip(weights, starts, outs, strict=True)))
    finally:
        torch.set_num_threads(before)
    for weight, mask, out in zip(weights, masks, outs, strict=True):
        assert out.device.type == device
        assert same_bits(out, old_masked_weight(weight, mask.to(device), kind))


def stored_model(kind: str = "binary") -> tuple[PiggybackModel, dict[str, dict]]:
    """A tiny model with three stored tasks of random masks, and the masks."""
    config = MaskConfig(train_bn=False)
    model = PiggybackModel(make_tiny(), config).eval()
    shapes = [tuple(layer.frozen.shape) for layer in model.masked_layers.values()]
    all_masks = {}
    for seed, task in enumerate(("a", "b", "c")):
        masks = dict(zip(model.masked_layers, random_masks(shapes, kind, seed), strict=True))
        model.add_task(task, 3, masks=masks, mask_kind=kind)
        all_masks[task] = masks
    return model, all_masks


def reference_forward(
    model: PiggybackModel, task: str, masks: dict, kind: str, x: torch.Tensor
) -> torch.Tensor:
    """The task run by a plain copy of the backbone holding the old path's W * mask."""
    plain = model.base
    for name, mask in masks.items():
        layer = plain.get_submodule(name)
        layer.weight = nn.Parameter(old_masked_weight(layer.weight, mask, kind))
    plain.fc = model.head.heads[task]
    with torch.no_grad():
        return plain(x)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_switching_tasks_gives_the_old_outputs_bit_for_bit(
    kind: str, device: str, images: torch.Tensor
) -> None:
    model, masks = stored_model(kind)
    model.to(device)
    images = images.to(device)
    masks = {t: {n: m.to(device) for n, m in layers.items()} for t, layers in masks.items()}
    expected = {t: reference_forward(model, t, masks[t], kind, images) for t in masks}
    with torch.no_grad():
        for task in ("a", "b", "a", "c", "c", "b"):  # re-derived in reused memory each switch
            assert same_bits(model.set_task(task)(images), expected[task])


@pytest.fixture
def one_select(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The accelerators' switch (every layer in one select, `flatweights`) on the CPU:
    a list of the tasks each select derived."""
    selected: list[str] = []
    select = MaskBank.select_all

    def counted(self: MaskBank, task: str, weights: torch.Tensor, out: torch.Tensor) -> None:
        selected.append(task)
        select(self, task, weights, out)

    monkeypatch.setattr(MaskBank, "unpacks_at_once", lambda self, t: self.kinds[t] == "binary")
    monkeypatch.setattr(MaskBank, "select_all", counted)
    return selected


@pytest.mark.parametrize("cache", [1, 2])
def test_one_select_for_every_layer_gives_the_old_outputs_bit_for_bit(
    one_select: list[str], cache: int, images: torch.Tensor
) -> None:
    model, masks = stored_model()
    model.weight_cache_size = cache
    expected = {t: reference_forward(model, t, masks[t], "binary", images) for t in masks}
    order = ("a", "b", "a", "c", "c", "b", "a")
    with torch.no_grad():
        for task in order:
            assert same_bits(model.set_task(task)(images), expected[task])
    # one select per derivation: each switch with one task cached; with two, the LRU's
    assert one_select == (
        ["a", "b", "a", "c", "b", "a"] if cache == 1 else ["a", "b", "c", "b", "a"]
    )


def test_one_select_writes_into_the_last_tasks_memory_unless_someone_holds_it(
    one_select: list[str],
) -> None:
    model, _ = stored_model()
    layers = list(model.masked_layers.values())
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model.set_task("a")(x)
        pointers = [layer.weight.data_ptr() for layer in layers]
        model.set_task("b")(x)
        assert [layer.weight.data_ptr() for layer in layers] == pointers  # no allocation
        kept = layers[1].weight
        before = kept.clone()
        model.set_task("c")(x)
        assert torch.equal(kept, before) and layers[1].weight.data_ptr() != kept.data_ptr()
    assert one_select == ["a", "b", "c"]


@pytest.mark.parametrize("path", ["per-layer", "one-select"])
def test_a_switch_reuses_the_cached_weights_memory_unless_someone_holds_it(
    path: str, request: pytest.FixtureRequest
) -> None:
    if path == "one-select":
        request.getfixturevalue("one_select")
    model, _ = stored_model()
    layer = model.masked_layers["stem"]
    with torch.no_grad():
        model.set_task("a")(torch.randn(1, 3, 8, 8))
        pointer = layer.weight.data_ptr()
        model.set_task("b")(torch.randn(1, 3, 8, 8))
        assert layer.weight.data_ptr() == pointer  # written in place: no allocation
        kept = layer.weight
        before = kept.clone()
        model.set_task("c")(torch.randn(1, 3, 8, 8))
        assert torch.equal(kept, before) and layer.weight.data_ptr() != kept.data_ptr()


def test_training_mode_frees_cached_weights_and_eval_keeps_their_memory() -> None:
    model, _ = stored_model()
    with torch.no_grad():
        model.set_task("a")(torch.randn(1, 3, 8, 8))
    layer = model.masked_layers["stem"]
    model.eval()
    assert layer.is_stale("a") and len(layer._derived) == 1  # stale, its memory kept
    model.train()
    assert not layer._derived


def derivations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time a layer's binary W * mask is derived on the CPU."""
    import piggyback.bank

    calls: list[int] = []
    select = piggyback.bank._select_on_cpu

    def counted(packed, layers):  # type: ignore[no-untyped-def]
        calls.extend(1 for _ in layers)
        return select(packed, layers)

    monkeypatch.setattr(piggyback.bank, "_select_on_cpu", counted)
    return calls


def test_a_weight_cache_of_k_tasks_derives_each_once_across_mixed_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = stored_model()
    names = ["c", "a", "b", "a"]
    x = torch.randn(len(names), 3, 8, 8, generator=torch.Generator().manual_seed(5))
    calls = derivations(monkeypatch)
    layers = len(model.masked_layers)
    with torch.no_grad():
        for task in "abc":
            model.set_task(task)(x)
        reference = model(x, task_names=names)
        assert len(calls) == 3 * layers + 2 * layers  # c ran last; a cache of 1 re-derives a, b
        model.weight_cache_size = 3
        calls.clear()
        first = model(x, task_names=names)
        again = model(x, task_names=names)
        assert len(calls) == 2 * layers  # c and a, once; b was kept from the last group
        assert same_bits(first, reference) and same_bits(again, reference)
        model.weight_cache_size = 2  # drops the least recently used, c (groups run c, a, b)
        assert all(list(layer._derived) == ["a", "b"] for layer in model.masked_layers.values())
        calls.clear()
        model.set_task("a")(x)
        assert not calls


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "2"])
def test_weight_cache_size_refuses_what_is_not_a_positive_integer(size: object) -> None:
    model, _ = stored_model()
    with pytest.raises(ConfigError, match="weight_cache_size"):
        model.weight_cache_size = size  # type: ignore[assignment]
    assert model.weight_cache_size == 1


def test_mixed_batch_in_any_order_equals_each_tasks_forward_bit_for_bit() -> None:
    model, _ = stored_model()
    names = ["b", "a", "c", "a", "b", "b", "c"]
    x = torch.randn(len(names), 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = model(x, task_names=names)
        for task in ("a", "b", "c"):
            rows = torch.tensor([row for row, name in enumerate(names) if name == task])
            assert same_bits(mixed[rows], model.set_task(task)(x[rows])), task


def test_stored_masks_are_one_flat_buffer_per_task_in_the_state_dict() -> None:
    model, masks = stored_model("ternary")
    numel = sum(layer.frozen.numel() for layer in model.masked_layers.values())
    state = model.state_dict()
    assert [k for k in state if ".bits." in k] == ["bank.bits.a", "bank.bits.b", "bank.bits.c"]
    assert state["bank.bits.a"].numel() == -(-numel * 2 // 8)  # 2 bits per ternary value
    assert all(torch.equal(model.masks("b")[n], m) for n, m in masks["b"].items())
    model.remove_task("b")
    assert "bank.bits.b" not in model.state_dict() and "b" not in model.bank


@pytest.mark.parametrize(
    "norm", [nn.BatchNorm2d(4), nn.LayerNorm(6), nn.GroupNorm(2, 4), nn.InstanceNorm1d(3)]
)
def test_a_tasks_norm_copy_shares_nothing_with_the_backbones(norm: nn.Module) -> None:
    """What deepcopy gave: equal state, tensors, hooks and containers of its own."""
    norm.register_forward_hook(lambda *_: None)
    copied = copy_leaf(norm)
    assert type(copied) is type(norm) and copied.state_dict().keys() == norm.state_dict().keys()
    for key, value in copied.state_dict().items():
        assert torch.equal(value, norm.state_dict()[key])
        assert value.data_ptr() != norm.state_dict()[key].data_ptr() or value.numel() == 0
    for name, value in vars(norm).items():
        if isinstance(value, dict | set | list):
            assert vars(copied)[name] is not value, name
    copied.register_forward_hook(lambda *_: None)
    assert len(norm._forward_hooks) == 1 and len(copied._forward_hooks) == 2


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_weights_derived_under_inference_mode_are_not_written_outside_it(kind: str) -> None:
    model, masks = stored_model(kind)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        model.set_task("a")(x)
    with torch.no_grad():
        out = model.set_task("b")(x)
    assert same_bits(out, reference_forward(model, "b", masks["b"], kind, x))
