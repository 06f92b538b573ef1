"""What a task file's JSON header may hold, checked field by field before any use.

A task file may come from anyone (an upload to the server, a download), so nothing in
its header is trusted: every field is checked for type and range here, and the sizes
it declares (classes, layer shapes, mask length, input size) are bounded before
anything is allocated from them. Loading then checks the same sizes against the
model the file is loaded onto (`piggyback.store.check_fits`).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from . import taskfeatures
from .backbones import InputSpec
from .bits import CODECS
from .config import MaskConfig
from .errors import ConfigError, TaskFileError

MAX_INPUT_SIZE = 2048  # pixels a side; a task trained above this is refused
MAX_CLASSES = 100_000  # classes of one task's head (ImageNet-21k has 21,841)
MAX_CLASS_NAME = 1_000  # characters of one class name
MAX_LAYERS = 100_000  # masked layers of one backbone
MAX_MASK_WEIGHTS = 1 << 30  # masked weights: 1.07 billion, above ViT-H (632 million)
MAX_LAYER_DIMS = 6
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
MASK_KINDS = ("binary", "ternary")
MAX_FEATURE_LAYERS = 16  # layers whose feature statistics a task keeps
MAX_FEATURE_DIM = 1 << 16  # channels of one such layer
MAX_FEATURE_NUMBERS = 1 << 24  # 16-bit numbers of one layer's means or directions
CALIBRATION_KEY = "calibration"  # task inference's record: see `taskinfer.calibrate_task`
FEATURES_KEY = "features"  # in the calibration: the "features" rule's statistics
ENTROPY_QUANTILES = 101  # stored points of the validation entropy distribution (0%, ... 100%)
SPEC_KEY = "input_spec"  # where a task's metadata records the InputSpec it trained with
# Set in a task's metadata when its backbone had random weights: built after seeding
# torch with metadata["seed"], which is how eval and predict rebuild it.
RANDOM_KEY = "random_backbone"


def check_meta(meta: Any, format_version: int) -> None:
    """Raise TaskFileError naming the first field that is missing, mistyped or out of
    range; `meta` is the parsed JSON header of a task file of `format_version`."""
    _require(isinstance(meta, dict), "", "a JSON object", meta)
    _field(meta, "task", _text(128))
    _field(meta, "num_classes", _integer(1, MAX_CLASSES))
    num_classes = meta["num_classes"]
    _field(meta, "class_names", _optional(_class_names(num_classes)), required=False)
    _field(meta, "train_bn", _optional(_boolean), required=False)
    _field(meta, "library_version", _optional(_text(64)), required=False)
    _field(meta, "metadata", _optional(_metadata), required=False)
    _field(meta, "config", _mask_config)
    _field(meta, "backbone", _backbone)
    _field(meta, "mask", _mask)
    if format_version < 3:  # later formats keep the checksum beside the metadata
        _field(meta, "checksum", _text(64))


def check_task_fields(task: Any, metadata: Any) -> None:
    """The fields a training run writes (the task's name, its metadata) as `check_meta`
    will check them when the file is read: a run refuses what its file could not load."""
    _field({"task": task}, "task", _text(128))
    _field({"metadata": metadata}, "metadata", _metadata)


def check_input_size(size: Any, where: str) -> None:
    """An input size (pixels a side) as read from a file: an int in [1, MAX_INPUT_SIZE]."""
    _integer(1, MAX_INPUT_SIZE)(size, where)


# ------------------------------------------------------------------ checkers
# Each checker takes (value, where) and raises TaskFileError naming `where`.
Checker = Callable[[Any, str], None]


def _require(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        field = f"field {where!r}" if where else "the metadata"
        raise TaskFileError(f"task file {field} must be {expected}, got {shown}")


def _field(meta: dict[str, Any], key: str, check: Checker, *, required: bool = True) -> None:
    if key not in meta:
        if required:
            raise TaskFileError(f"task file metadata misses the field {key!r}")
        return
    check(meta[key], key)


def _optional(check: Checker) -> Checker:
    def checked(value: Any, where: str) -> None:
        if value is not None:
            check(value, where)

    return checked


def _boolean(value: Any, where: str) -> None:
    _require(isinstance(value, bool), where, "true or false", value)


def _integer(low: int, high: int) -> Checker:
    def checked(value: Any, where: str) -> None:
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        _require(ok, where, f"an integer in [{low}, {high:,}]", value)

    return checked


def _number(low: float, high: float) -> Checker:
    def checked(value: Any, where: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and low <= value <= high
        _require(ok, where, f"a number in [{low}, {high}]", value)

    return checked


def _text(longest: int) -> Checker:
    def checked(value: Any, where: str) -> None:
        ok = isinstance(value, str) and len(value) <= longest
        _require(ok, where, f"a string of at most {longest} characters", value)

    return checked


def _class_names(num_classes: int) -> Checker:
    def checked(value: Any, where: str) -> None:
        ok = isinstance(value, list) and len(value) == num_classes
        _require(ok, where, f"a list of {num_classes} names (num_classes)", value)
        for index, name in enumerate(value):
            _text(MAX_CLASS_NAME)(name, f"{where}[{index}]")

    return checked


# What the library itself records in `metadata`; other keys are kept but never read.
_METADATA: dict[str, Checker] = {
    "backbone": _optional(_text(256)),
    "weights": _optional(_text(4096)),
    "size": _optional(_integer(1, MAX_INPUT_SIZE)),
    "data": _optional(_text(4096)),
    "seed": _optional(_integer(-(1 << 63), (1 << 64) - 1)),
    "val_fraction": _optional(_number(0.0, 1.0)),
    "test_fraction": _optional(_number(0.0, 1.0)),
    "limit": _optional(_integer(1, 1 << 62)),
    SPEC_KEY: _optional(lambda value, where: _check_spec(value, where)),
    RANDOM_KEY: _optional(_boolean),
    CALIBRATION_KEY: _optional(lambda value, where: _check_calibration(value, where)),
}


def _check_calibration(value: Any, where: str) -> None:
    """What `piggyback.taskinfer.calibration` stores: ENTROPY_QUANTILES non-decreasing numbers in
    [0, 1] and the count of validation images they were read from."""
    _require(isinstance(value, dict), where, "a JSON object", value)
    quantiles = value.get("quantiles")
    ok = isinstance(quantiles, list) and len(quantiles) == ENTROPY_QUANTILES
    _require(ok, f"{where}.quantiles", f"a list of {ENTROPY_QUANTILES} numbers", quantiles)
    for quantile in quantiles:
        _number(0.0, 1.0)(quantile, f"{where}.quantiles")
    ordered = all(low <= high for low, high in itertools.pairwise(quantiles))
    _require(ordered, f"{where}.quantiles", "non-decreasing", quantiles)
    _integer(1, 1 << 62)(value.get("samples"), f"{where}.samples")
    if FEATURES_KEY in value:
        _check_features(value[FEATURES_KEY], f"{where}.{FEATURES_KEY}")


def _check_features(value: Any, where: str) -> None:
    """What `piggyback.taskfeatures.feature_record` stores: per layer, class means and
    covariance directions as 16-bit base64 of the sizes declared, finite; positive
    variances; the validation statistic's taskfeatures.QUANTILES finite, non-decreasing points."""
    _require(isinstance(value, dict), where, "a JSON object", value)
    _integer(1, MAX_CLASSES)(value.get("classes"), f"{where}.classes")
    layers = value.get("layers")
    ok = isinstance(layers, list) and 1 <= len(layers) <= MAX_FEATURE_LAYERS
    _require(ok, f"{where}.layers", f"a list of 1 to {MAX_FEATURE_LAYERS} layers", layers)
    for index, layer in enumerate(layers):
        _check_feature_layer(layer, f"{where}.layers[{index}]", value["classes"])
    quantiles = value.get("quantiles")
    ok = isinstance(quantiles, list) and len(quantiles) == taskfeatures.QUANTILES
    _require(ok, f"{where}.quantiles", f"a list of {taskfeatures.QUANTILES} numbers", quantiles)
    for quantile in quantiles:
        _number(-1e6, 1e6)(quantile, f"{where}.quantiles")
    ordered = all(low <= high for low, high in itertools.pairwise(quantiles))
    _require(ordered, f"{where}.quantiles", "non-decreasing", quantiles)


def _check_feature_layer(value: Any, where: str, classes: int) -> None:
    _require(isinstance(value, dict), where, "a JSON object", value)
    _text(1024)(value.get("name"), f"{where}.name")
    _integer(1, MAX_FEATURE_DIM)(value.get("dim"), f"{where}.dim")
    variances = value.get("variances")
    ok = isinstance(variances, list) and len(variances) <= MAX_FEATURE_DIM
    _require(ok, f"{where}.variances", "a list of positive numbers", variances)
    for key, numbers in (("variances", variances), ("base", [value.get("base")])):
        for number in numbers:
            _number(1e-30, 1e30)(number, f"{where}.{key}")
    _number(1e-30, 1e30)(value.get("median"), f"{where}.median")
    for key, rows in (("means", classes), ("components", len(variances))):
        numbers = rows * value["dim"]
        ok = numbers <= MAX_FEATURE_NUMBERS
        _require(ok, f"{where}.{key}", f"at most {MAX_FEATURE_NUMBERS:,} numbers", numbers)
        try:
            tensor = taskfeatures.decode16(value.get(key), (rows, value["dim"]))
        except ValueError as exc:
            raise TaskFileError(
                f"task file field {where + '.' + key!r} must be {rows} x {value['dim']} "
                f"16-bit numbers in base64 ({exc})"
            ) from None
        _require(bool(tensor.isfinite().all()), f"{where}.{key}", "finite numbers", "inf/NaN")


def _check_spec(value: Any, where: str) -> None:
    parse_spec(value, where)


def _metadata(value: Any, where: str) -> None:
    _require(isinstance(value, dict), where, "a JSON object", value)
    for key, check in _METADATA.items():
        if key in value:
            check(value[key], f"{where}.{key}")


def _mask_config(value: Any, where: str) -> None:
    _require(isinstance(value, dict), where, "a JSON object of MaskConfig settings", value)
    try:
        MaskConfig.from_dict(value)
    except (ConfigError, TypeError) as exc:
        raise TaskFileError(f"task file field {where!r} is not a valid MaskConfig: {exc}") from exc


def _backbone(value: Any, where: str) -> None:
    _require(isinstance(value, dict), where, "a JSON object", value)
    fingerprint = value.get("fingerprint")
    ok = isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint) is not None
    _require(ok, f"{where}.fingerprint", "64 hexadecimal digits", fingerprint)
    _text(256)(value.get("class", ""), f"{where}.class")
    _text(1024)(value.get("head", ""), f"{where}.head")


def _mask(value: Any, where: str) -> None:
    _require(isinstance(value, dict), where, "a JSON object", value)
    kind, codec = value.get("kind"), value.get("codec")
    _require(kind in MASK_KINDS, f"{where}.kind", f"one of {list(MASK_KINDS)}", kind)
    _require(codec in CODECS, f"{where}.codec", f"one of {list(CODECS)}", codec)
    layers = value.get("layers")
    ok = isinstance(layers, list) and len(layers) <= MAX_LAYERS
    _require(ok, f"{where}.layers", f"a list of at most {MAX_LAYERS:,} layers", layers)
    total = sum(_layer(layer, f"{where}.layers[{i}]") for i, layer in enumerate(layers))
    names = [layer[0] for layer in layers]
    _require(len(set(names)) == len(names), f"{where}.layers", "unique layer names", names)
    _require(
        total <= MAX_MASK_WEIGHTS,
        f"{where}.layers",
        f"at most {MAX_MASK_WEIGHTS:,} weights in all",
        total,
    )
    numel = value.get("numel")
    _require(numel == total, f"{where}.numel", f"{total:,} (the sum of its layers)", numel)
    for key in ("bits_per_weight", "entropy_bits_per_weight"):
        _field(value, key, _number(0.0, 64.0))
    _field(value, "kept", _number(0.0, 1.0))
    _field(value, "payload_bytes", _integer(0, 1 << 62), required=False)


def _layer(value: Any, where: str) -> int:
    """Check one `[name, shape]` entry; returns its number of weights."""
    ok = isinstance(value, list) and len(value) == 2 and isinstance(value[1], list)
    _require(ok, where, "a [name, shape] pair", value)
    name, shape = value
    _text(1024)(name, f"{where}[0]")
    ok = 1 <= len(shape) <= MAX_LAYER_DIMS
    _require(ok, f"{where}[1]", f"a shape of 1 to {MAX_LAYER_DIMS} sizes", shape)
    for dim in shape:
        _integer(0, MAX_MASK_WEIGHTS)(dim, f"{where}[1]")
    return math.prod(shape)


def spec_record(spec: InputSpec) -> dict[str, Any]:
    """An InputSpec as JSON values, as files record it (`parse_spec` reads it back)."""
    return {**asdict(spec), "mean": list(spec.mean), "std": list(spec.std)}


def parse_spec(value: Any, where: str) -> InputSpec:
    """An InputSpec from its untrusted JSON form (`asdict`), or a TaskFileError."""
    _require(isinstance(value, dict), where, "a JSON object of InputSpec fields", value)
    check_input_size(value.get("size"), f"{where}.size")
    for key in ("mean", "std"):
        channels = value.get(key)
        ok = isinstance(channels, list) and len(channels) == 3
        _require(ok, f"{where}.{key}", "a list of 3 numbers (R, G, B)", channels)
        for channel in channels:
            _number(-1e6, 1e6)(channel, f"{where}.{key}")
    _number(0.0, 1.0)(value.get("crop_pct"), f"{where}.crop_pct")
    _text(16)(value.get("interpolation"), f"{where}.interpolation")
    try:
        return InputSpec(**{key: value[key] for key in InputSpec.__dataclass_fields__})
    except ConfigError as exc:
        raise TaskFileError(f"task file field {where!r} is not a valid InputSpec: {exc}") from exc
