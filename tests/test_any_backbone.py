"""The backbones the README names, convolutional and with attention: every mask is seen,
whatever way a parent reads its weight (calling the layer, reading `.weight`, or a parameter
such as `nn.MultiheadAttention.in_proj_weight`). Random weights, small configs of the
same classes, small inputs.

For each: bake == masked; every masked layer's scores get a gradient; the backbone is
bit-exact after training two tasks; a mixed batch equals the per-task loop; a
save/load round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torchvision
from torch import nn

from piggyback import ConfigError, MaskConfig, PiggybackModel
from piggyback.mixed import logits_of
from piggyback.store import fingerprint

transformers = pytest.importorskip("transformers")


class Encoder(nn.Module):
    """nn.TransformerEncoder between a linear embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


IMAGE = (4, 3, 32, 32)
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _images(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(IMAGE, generator=generator)


def _tv_vit() -> nn.Module:
    """vit_b_16's class at a small size (vit_b_16 itself has 86 million weights)."""
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )  # fmt: skip


def _tv_swin() -> nn.Module:
    """swin_t's class at a small size."""
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=5,
    )  # fmt: skip


# name -> (builder, input maker)
BACKBONES: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Any]]] = {
    "torchvision vit_b_16": (_tv_vit, _images),
    "torchvision swin_t": (_tv_swin, _images),
    "nn.TransformerEncoder": (Encoder, lambda g: torch.randn(4, 6, 8, generator=g)),
    "timm beit": (_timm("beit_base_patch16_224", **TINY_VIT), _images),
    "timm eva": (_timm("eva02_tiny_patch14_224", **TINY_VIT), _images),
    "timm deit": (_timm("deit_tiny_patch16_224", **TINY_VIT), _images),
    "timm convnext": (_timm("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)), _images),
    "transformers bert": (_bert, lambda g: torch.randint(0, 100, (4, 7), generator=g)),
    "transformers vit": (_hf_vit, _images),
    "torchvision densenet": (
        lambda: torchvision.models.DenseNet(8, (1, 1), 8, num_classes=5),
        _images,
    ),
    "timm efficientnet": (_timm("test_efficientnet"), _images),
}


def build(name: str) -> tuple[PiggybackModel, torch.Tensor, str]:
    builder, make_input = BACKBONES[name]
    torch.manual_seed(0)
    backbone = builder().eval()
    model = PiggybackModel(backbone, MaskConfig(train_bn=True))
    return model, make_input(torch.Generator().manual_seed(1)), fingerprint(model.base)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model(x))


def random_masks(model: PiggybackModel, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.bernoulli(torch.full(layer.frozen.shape, 0.5), generator=generator)
        for name, layer in model.masked_layers.items()
    }


def train_two_tasks(model: PiggybackModel, x: torch.Tensor) -> None:
    for task, classes in (("a", 3), ("b", 5)):
        model.add_task(task, classes)
        model.set_task(task).train()
        optimizer = torch.optim.Adam(model.trainable_parameters(task), lr=5e-3)
        for _ in range(3):
            optimizer.zero_grad()
            labels = torch.arange(len(x)) % classes
            nn.functional.cross_entropy(logits(model, x), labels).backward()
            optimizer.step()
        model.freeze_task(task)
    model.eval()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_mask_gets_a_gradient(name: str) -> None:
    model, x, _ = build(name)
    model.verify_masks(x)
    model.add_task("t", 3)
    model.set_task("t").train()
    logits(model, x).sum().backward()
    silent = [n for n, layer in model.masked_layers.items() if layer.scores["t"].grad is None]
    assert silent == []


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_bake_mixed_batches_round_trip_and_frozen_backbone(name: str, tmp_path: Path) -> None:
    model, x, before = build(name)
    model.add_task("stored", 4, masks=random_masks(model, 2))
    train_two_tasks(model, x)
    assert fingerprint(model.base) == before, "the backbone changed"
    with torch.no_grad():
        per_task = {t: logits(model.set_task(t), x) for t in ("stored", "a", "b")}
        for task, expected in per_task.items():
            baked = model.bake(task)
            torch.testing.assert_close(logits(baked, x), expected, rtol=1e-4, atol=1e-5)
        names = ["a", "b", "stored", "a"]
        mixed = model(x, task_names=names)
        for row, task in enumerate(names):
            width = per_task[task].shape[1]
            torch.testing.assert_close(mixed[row, :width], per_task[task][row])
    paths = {t: model.save_task(t, tmp_path / f"{t}.safetensors") for t in per_task}
    loaded = PiggybackModel(model.base, MaskConfig(train_bn=True)).eval()
    with torch.no_grad():
        for task, path in paths.items():
            loaded.load_task(path)
            assert torch.equal(logits(loaded.set_task(task), x), per_task[task]), task
            for layer, mask in model.masks(task).items():
                assert torch.equal(loaded.masks(task)[layer], mask)


def test_a_mask_on_qkv_alone_changes_beit(tmp_path: Path) -> None:
    """timm's BEiT passes `qkv.weight` to F.linear itself: the mask must still apply."""
    model, x, _ = build("timm beit")
    masks = {n: torch.ones_like(m) for n, m in random_masks(model, 0).items()}
    model.add_task("ones", 5, masks=masks)
    qkv = next(n for n in masks if n.endswith("attn.qkv"))
    model.add_task("halved", 5, masks={**masks, qkv: random_masks(model, 3)[qkv]})
    model.head.heads["halved"].load_state_dict(model.head.heads["ones"].state_dict())
    with torch.no_grad():
        assert not torch.allclose(
            logits(model.set_task("ones"), x), logits(model.set_task("halved"), x)
        )


class StaleReader(nn.Module):
    """Keeps a reference to its layer's weight and uses it: no wrapper can see that."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.hidden = nn.Linear(4, 4)
        self.held = self.hidden.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(nn.functional.linear(self.embed(x), self.held))


def test_a_mask_that_would_be_ignored_is_an_error_naming_the_layer() -> None:
    model = PiggybackModel(StaleReader(), MaskConfig())
    with pytest.raises(ConfigError, match=r"never reach the output.*'hidden'.*exclude_modules"):
        model.verify_masks(torch.randn(2, 4))
    assert model.tasks == [] and model.active_task is None
    PiggybackModel(StaleReader(), MaskConfig(exclude_modules=["hidden"])).verify_masks(
        torch.randn(2, 4)
    )


def test_training_refuses_masks_that_would_be_ignored(tmp_path: Path) -> None:
    """`fit` probes before its first step, so no run trains scores nothing reads."""
    from piggyback.data import TaskData
    from piggyback.train import TrainConfig, fit

    images = [(torch.randn(4), i % 2) for i in range(8)]
    data = TaskData(train=images, val=images, test=images, class_names=["a", "b"])
    config = TrainConfig(epochs=1, batch_size=4, progress=False, device="cpu")
    model = PiggybackModel(StaleReader(), MaskConfig(train_bn=False))
    with pytest.raises(ConfigError, match="'hidden'"):
        fit(model, "t", data, config, tmp_path)


def test_verify_masks_leaves_every_module_as_it_was() -> None:
    model, x, _ = build("timm convnext")
    model.train()
    some_norm = next(iter(model.norms.values()))
    some_norm.eval()  # the user's choice, which must survive the probe
    before = {name: m.training for name, m in model.named_modules()}
    keys = list(model.state_dict())
    model.verify_masks(x)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert list(model.state_dict()) == keys and model.tasks == []
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        model.verify_masks(x)


def test_a_layer_registered_twice_is_refused_and_the_backbone_left_alone() -> None:
    net = Encoder()
    net.alias = net.embed
    with pytest.raises(ConfigError, match="'embed' is also registered as 'alias'"):
        PiggybackModel(net)
    assert type(net.embed) is nn.Linear  # nothing was wrapped
