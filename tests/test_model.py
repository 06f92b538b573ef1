"""PiggybackModel invariants, on a tiny in-file model and on real architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyNet, make_tiny
from torch import nn

from piggyback import ConfigError, MaskConfig, PiggybackModel, UnknownTaskError, fingerprint
from piggyback.layers import MaskedLayer


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_steps(model: PiggybackModel, task: str, images: torch.Tensor, steps: int = 3) -> None:
    """A few Adam steps on `task`, with a large lr so masks really change."""
    model.set_task(task)
    model.train()
    optimizer = torch.optim.Adam(model.trainable_parameters(task), lr=5e-3)
    labels = torch.arange(images.shape[0]) % model.task_info[task].num_classes
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()


def test_layers_are_wrapped(tiny: TinyNet) -> None:
    model = PiggybackModel(tiny)
    assert sorted(model.masked_layers) == ["depthwise", "grouped", "hidden", "seq", "stem"]
    assert sorted(model.norms) == ["bn", "bn2", "norm"]
    assert model.head_name == "fc"
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("train_bn", [False, True])
def test_backbone_untouched_and_no_gradient_reaches_it(
    images: torch.Tensor, train_bn: bool
) -> None:
    tiny = make_tiny()
    before = snapshot(tiny)
    model = PiggybackModel(tiny, MaskConfig(train_bn=train_bn))
    model.add_task("a", 3)
    model.add_task("b", 5)
    for task in ("a", "b"):
        train_steps(model, task, images)
    assert model.mask_stats("a").kept < 1.0, "training should have changed the mask"
    for module in model._task_modules():
        for name, tensor in module.base_layer.named_parameters():
            assert tensor.grad is None, name
    after = snapshot(model.base)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert fingerprint(model.base) == model.fingerprint == fingerprint(make_tiny())


def test_all_ones_mask_equals_plain_model(tiny: TinyNet, images: torch.Tensor) -> None:
    plain = make_tiny()
    model = PiggybackModel(tiny)
    model.add_task("a", 4)
    model.set_task("a")
    model.head.heads["a"].load_state_dict(plain.fc.state_dict())
    model.eval()
    assert model.mask_stats("a").kept == 1.0
    with torch.no_grad():
        expected = plain(images)
        assert torch.equal(model(images), expected)
        model.set_task(None)
        assert torch.equal(model(images), expected)


def test_bake_equals_masked_model(images: torch.Tensor) -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("a", 3)
    train_steps(model, "a", images)
    model.set_task("a")
    baked = model.bake("a")
    assert type(baked) is TinyNet
    assert not any(type(m).__module__.startswith("piggyback") for m in baked.modules())
    with torch.no_grad():
        torch.testing.assert_close(baked(images), model(images), rtol=0, atol=1e-6)
    # The baked model owns its tensors: changing it leaves the piggyback model alone.
    with torch.no_grad():
        baked.stem.weight.zero_()
    assert model.masked_layers["stem"].weight.abs().sum() > 0


def test_mixed_batch_equals_per_task_loop(images: torch.Tensor) -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    for task, classes in (("a", 3), ("b", 5), ("c", 3)):
        model.add_task(task, classes)
        train_steps(model, task, images)
    names = ["a", "b", "c", "b", "a", "a"]
    model.set_task("c")
    with torch.no_grad():
        mixed = model(images, task_names=names)
        assert mixed.shape == (6, 5)
        for row, task in enumerate(names):
            model.set_task(task)
            alone = model(images[row : row + 1])
            width = alone.shape[1]
            torch.testing.assert_close(mixed[row, :width], alone[0], rtol=0, atol=1e-6)
            assert torch.isneginf(mixed[row, width:]).all()
    assert model.active_task == names[-1]


def test_mixed_batch_trains_each_task() -> None:
    model = PiggybackModel(make_tiny())
    model.add_task("a", 3)
    model.add_task("b", 3)
    out = model(torch.randn(4, 3, 8, 8), task_names=["a", "b", "b", "a"])
    out.sum().backward()
    for task in ("a", "b"):
        assert all(p.grad is not None for p in model.trainable_parameters(task))


def test_adding_a_task_leaves_others_bit_exact(images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("a", 3)
    train_steps(model, "a", images)
    model.set_task("a")
    with torch.no_grad():
        before = model(images)
    model.add_task("b", 3)
    train_steps(model, "b", images)
    model.set_task("a")
    with torch.no_grad():
        assert torch.equal(model(images), before)


def test_frozen_task_matches_trainable_and_cache_follows_updates(images: torch.Tensor) -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=False))  # norms: rounded on freeze
    model.add_task("a", 3)
    model.set_task("a")
    with torch.no_grad():
        first = model(images)  # fills the cache
    train_steps(model, "a", images)
    model.set_task("a")
    with torch.no_grad():
        trained = model(images)
        assert not torch.equal(first, trained), "stale cached weights after training"
        model.freeze_task("a")
        assert not model.is_trainable("a")
        assert torch.equal(model(images), trained)


@pytest.mark.parametrize("fn", ["binarizer", "ternarizer"])
def test_torch_func_gives_the_gradients_autograd_gives(fn: str, images: torch.Tensor) -> None:
    """torch.func's transforms (per-sample gradients, meta-learning) run a training task;
    they refuse the fused masked weight, so it composes the thresholder under them."""
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=False, threshold_fn=fn))
    model.add_task("t", 4)
    model.set_task("t").train()
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    model(images).square().sum().backward()

    def loss(values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, values, (images,)).square().sum()

    grads = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    for name, param in params.items():
        torch.testing.assert_close(grads[name], param.grad)


def test_a_data_parallel_replica_runs_a_training_task(images: torch.Tensor) -> None:
    """nn.DataParallel's replicas (torch.nn.parallel.replicate, here without its GPUs)
    hold every parameter as a plain attribute, outside the modules' dicts."""
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=False))
    model.add_task("t", 4)
    model.set_task("t").train()
    copies = {id(m): m._replicate_for_data_parallel() for m in model.modules()}
    for module in model.modules():
        replica = copies[id(module)]
        for key, child in module._modules.items():
            replica._modules[key] = None if child is None else copies[id(child)]
        for key, param in module._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                setattr(replica, key, param * 1)  # not a Parameter: as Broadcast gives
    replica = copies[id(model)]
    masked = [m for m in replica.modules() if isinstance(m, MaskedLayer)]
    assert masked and not any(
        m.base_layer._parameters.get(m.parameter) is not None or m.scores._parameters
        for m in masked
    )
    torch.testing.assert_close(replica(images), model(images))


def test_ternarizer_masks_can_flip_signs(images: torch.Tensor) -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(threshold_fn="ternarizer", init="uniform"))
    model.add_task("a", 3)
    stats = model.mask_stats("a")
    assert stats.kind == "ternary" and stats.packed_bits == 2 * stats.numel
    assert any(layer.negative > 0 for layer in stats.layers)


def test_trainable_parameter_parts() -> None:
    model = PiggybackModel(make_tiny(), MaskConfig(train_bn=True))
    model.add_task("a", 3)
    scores = model.trainable_parameters("a", "scores")
    head = model.trainable_parameters("a", "head")
    norm = model.trainable_parameters("a", "norm")
    assert len(scores) == 5 and len(head) == 2 and len(norm) == 6
    assert len(model.trainable_parameters("a")) == len(scores) + len(head) + len(norm)
    assert all(p.requires_grad for p in scores + head + norm)


def test_remove_task() -> None:
    model = PiggybackModel(make_tiny())
    model.add_task("a", 3)
    model.set_task("a")
    model.remove_task("a")
    assert model.tasks == [] and model.active_task is None
    assert not any("a" in layer.kinds for layer in model.masked_layers.values())
    with pytest.raises(UnknownTaskError, match="no task 'a'"):
        model.set_task("a")


def test_target_and_exclude_selection() -> None:
    by_list = PiggybackModel(make_tiny(), MaskConfig(target_modules=["stem", "hidden"]))
    assert sorted(by_list.masked_layers) == ["hidden", "stem"]
    by_regex = PiggybackModel(make_tiny(), MaskConfig(exclude_modules=r"(grouped|depthwise)"))
    assert sorted(by_regex.masked_layers) == ["hidden", "seq", "stem"]
    with pytest.raises(ConfigError, match=r"no layer to mask.*Conv2d"):
        PiggybackModel(make_tiny(), MaskConfig(target_modules=["nothing"]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add_task("bad name", 3), "task name 'bad name'"),
        (lambda m: m.add_task("a", 0), "num_classes must be a positive integer"),
        (lambda m: m.add_task("a", 2, class_names=["x"]), "1 class names given"),
        (lambda m: m.set_task("zzz"), "no task 'zzz'"),
        (lambda m: m.mask_stats(), "no active task"),
        (lambda m: m(torch.randn(2, 3, 8, 8), task_names=["a"]), "1 task names for a batch of 2"),
    ],
)
def test_errors_name_the_problem(call, message: str) -> None:
    model = PiggybackModel(make_tiny())
    with pytest.raises((ConfigError, UnknownTaskError), match=message):
        call(model)


def test_head_errors() -> None:
    with pytest.raises(ConfigError, match="head='nope' is not a module"):
        PiggybackModel(make_tiny(), MaskConfig(head="nope"))
    with pytest.raises(ConfigError, match="no classifier head"):
        PiggybackModel(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ConfigError, match="already wrapped"):
        PiggybackModel(PiggybackModel(make_tiny()).backbone)


def _check_real_model(backbone: nn.Module, size: int) -> None:
    """The invariants on a real architecture: untouched backbone, bake, mixed batch."""
    backbone.eval()
    before = fingerprint(backbone)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = backbone(x)
    model = PiggybackModel(backbone)
    model.add_task("a", 3)
    model.add_task("b", 4)
    train_steps(model, "a", x, steps=2)
    with torch.no_grad():
        model.set_task(None)
        assert torch.equal(model(x), plain)
        model.set_task("a")
        masked = model(x)
        torch.testing.assert_close(model.bake("a")(x), masked, rtol=1e-5, atol=1e-5)
        mixed = model(x, task_names=["a", "b", "a"])
        torch.testing.assert_close(mixed[[0, 2], :3], masked[[0, 2]], rtol=1e-5, atol=1e-5)
    assert fingerprint(model.base) == before


def test_torchvision_resnet18() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _check_real_model(model, 32)
    wrapped = PiggybackModel(torchvision.models.resnet18(num_classes=10))
    assert wrapped.head_name == "fc" and "conv1" in wrapped.masked_layers
    assert "layer2.0.downsample.0" in wrapped.masked_layers


def test_timm_model() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    _check_real_model(backbone, 32)
    wrapped = PiggybackModel(timm.create_model("tf_efficientnet_lite0", num_classes=10))
    assert wrapped.head_name == "classifier"
    # timm's Conv2dSame subclasses Conv2d with its own padding: masked through its own forward.
    assert any(type(m.base_layer) is not nn.Conv2d for m in wrapped.masked_layers.values())


def test_timm_vit_masks_linear_layers() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10
    )
    _check_real_model(backbone, 32)
