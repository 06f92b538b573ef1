"""What a task's own features look like: the statistics behind task inference's
``"features"`` rule (`piggyback.taskinfer`).

Seen through a task's mask, images of the task's own domain give activations of their
own kind; an image of another domain gives others, even where the task's output is sure
of it (a network masked for digits is as sure of a Fashion-MNIST image as of a digit).
So a task keeps, for a few of its masked layers (those at FEATURE_DEPTHS of the masked
layers that run as modules, in the order they run: middle layers told domains apart
best on bench/task_inference.py, the head's input worst), how its validation images'
outputs lie: each output pooled over
positions and scaled to unit length, one Gaussian per class with a covariance shared by
the classes (Lee et al. 2018, the Mahalanobis distance to the nearest class mean, over
several layers). The covariance is shrunk towards a multiple of the identity and kept as
its COMPONENTS leading directions with their variances, the rest of the space at one
variance `base`; means and directions are stored at 16 bits (base64 in the task's JSON
metadata, checked by `piggyback.taskmeta` when read).

An input's statistic is the sum over the layers of log(distance / the validation images'
median distance); its score is the share of the task's validation images whose statistic
was larger (an empirical p-value, read off QUANTILES stored points, each validation image
measured by statistics fitted without it, in FOLDS folds), so that one threshold means the
same for every task.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .model import PiggybackModel

FEATURE_DEPTHS = (0.3, 0.5, 0.7)  # of the masked layers, in order: the layers a task keeps
COMPONENTS = 8  # leading directions of the shared covariance kept per layer
SHRINK = 0.9  # covariance = SHRINK * sample covariance + (1 - SHRINK) * its mean variance
FOLDS = 5  # validation images measured out of fold (what the p-value is read off)
QUANTILES = 101  # stored points of the validation statistic's distribution
TAIL = 0.001  # the score at the largest validation statistic; it decays beyond
_EPS = 1e-8  # least variance and distance (features are unit length)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def feature_layers(ran: Sequence[str]) -> list[str]:
    """The masked layers a task's features are read at: those at FEATURE_DEPTHS of the
    masked layers that run (`ran`, in the order they ran; none if none ran)."""
    picked = [ran[round(depth * (len(ran) - 1))] for depth in FEATURE_DEPTHS if ran]
    return list(dict.fromkeys(picked))


@contextmanager
def running_features(
    model: PiggybackModel, task: str
) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
    """While the block runs `task`, the pooled outputs of its masked layers at
    FEATURE_DEPTHS of those that run as modules (a parent may read a layer's weight
    without calling it, as nn.MultiheadAttention does its out_proj's): the first forward
    of the model pools every masked layer that runs, later ones only the chosen. Yields a
    function that gives them, layer by layer, after the block (none if no masked layer
    ran as a module)."""
    order: list[str] = []  # the masked layers the first forward ran, in order
    kept: dict[str, list[torch.Tensor]] = {}
    chosen: list[str] = []

    def choose(*_: Any) -> None:  # before each forward (the first: nothing ran yet), and after
        if not chosen:
            chosen.extend(feature_layers(list(dict.fromkeys(order))))
            for name in set(kept) - set(chosen):
                del kept[name]

    def keep(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            if module.active_task != task:
                return
            if not chosen:
                order.append(name)
                kept.setdefault(name, [])
            if name in kept:
                kept[name].append(pooled(output, module))

        return hook

    handles = [model.register_forward_pre_hook(choose)]  # a second forward: choose
    handles += [
        layer.register_forward_hook(keep(name)) for name, layer in model.masked_layers.items()
    ]
    try:
        yield lambda: {name: torch.cat(kept[name]) for name in chosen}
    finally:
        for handle in handles:
            handle.remove()
    choose()


def pooled(output: Any, layer: nn.Module) -> torch.Tensor:
    """A layer's output as one unit-length vector per sample: averaged over positions
    (a convolution's channels are its second dimension, others' their last)."""
    if not isinstance(output, torch.Tensor):
        output = output[0]
    output = output.float()
    if isinstance(getattr(layer, "base_layer", layer), _CONV):
        output = output.flatten(2).mean(2) if output.dim() > 2 else output
    elif output.dim() > 2:
        output = output.flatten(1, -2).mean(1)
    return nn.functional.normalize(output.reshape(output.shape[0], -1), dim=1)


@contextmanager
def captured(model: PiggybackModel, layers: Sequence[str]) -> Iterator[dict[tuple[str, str], list]]:
    """While the block runs, each call of the masked `layers` adds its pooled output
    under (layer, the task it ran): a mixed-task batch runs each task's rows as one
    group, so every task gets its own rows, in order."""
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    missing = [name for name in layers if name not in model.masked_layers]
    if missing:
        raise ConfigError(
            f"task features were read at layers {missing} that this model does not mask; "
            f"it masks {len(model.masked_layers)} layers (e.g. {list(model.masked_layers)[:3]})"
        )

    def keep(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _args: Any, output: Any) -> None:
            seen.setdefault((name, module.active_task), []).append(pooled(output, module))

        return hook

    handles = [model.masked_layers[name].register_forward_hook(keep(name)) for name in layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------- statistics
def fit_layer(features: torch.Tensor, labels: torch.Tensor, classes: int) -> dict[str, Any]:
    """Class means and the shrunk shared covariance of one layer's features (n x dim)."""
    features = features.double()
    overall = features.mean(0)
    means = torch.stack([
        features[labels == c].mean(0) if bool((labels == c).any()) else overall
        for c in range(classes)
    ])  # fmt: skip
    residual = (features - means[labels]) / math.sqrt(len(features))
    _, singular, directions = torch.linalg.svd(residual, full_matrices=False)
    variances = singular**2
    mean_variance = float(variances.sum()) / features.shape[1]
    base = max((1 - SHRINK) * mean_variance, _EPS)
    kept = min(COMPONENTS, len(variances))
    return {
        "means": means,
        "components": directions[:kept],
        "variances": (SHRINK * variances[:kept] + base).clamp_min(_EPS),
        "base": base,
    }


def distance(stats: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of each row of `features` to its nearest class mean."""
    means = stats["means"].to(features.dtype)
    components = stats["components"].to(features.dtype)
    variances = stats["variances"].to(features.dtype)
    diff = features[:, None, :] - means[None]  # samples x classes x dim
    squared = diff.pow(2).sum(-1) / stats["base"]
    projected = diff @ components.T  # samples x classes x components
    squared = squared + (projected.pow(2) * (1 / variances - 1 / stats["base"])).sum(-1)
    return squared.min(1).values.clamp_min(_EPS)


def feature_record(
    features: dict[str, torch.Tensor], labels: torch.Tensor | None, classes: int
) -> dict[str, Any]:
    """What a task stores of its validation images' features (`features`: layer ->
    n x dim pooled outputs; `labels` None: one Gaussian for all), as JSON values."""
    count = len(next(iter(features.values())))
    if count == 0:
        raise ConfigError("feature statistics need at least one validation image")
    if labels is None:
        labels, classes = torch.zeros(count, dtype=torch.long), 1
    labels = labels.long().cpu()
    if labels.numel() != count or int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ConfigError(f"{labels.numel()} labels in [0, {classes}) expected for {count} images")
    layers, statistic = [], torch.zeros(count, dtype=torch.float64)
    folds = torch.randperm(count, generator=torch.Generator().manual_seed(0)) % min(FOLDS, count)
    for name, values in features.items():
        values = values.double().cpu()
        out_of_fold = torch.empty(count, dtype=torch.float64)
        for fold in range(int(folds.max()) + 1):
            held = folds == fold
            train = ~held if bool((~held).any()) else held  # one image: measured in sample
            stats = fit_layer(values[train], labels[train], classes)
            out_of_fold[held] = distance(stats, values[held])
        median = float(out_of_fold.median())
        statistic += (out_of_fold / median).log()
        stats = fit_layer(values, labels, classes)
        layers.append({
            "name": name,
            "dim": values.shape[1],
            "means": encode16(stats["means"]),
            "components": encode16(stats["components"]),
            "variances": [float(v) for v in stats["variances"]],
            "base": stats["base"],
            "median": median,
        })  # fmt: skip
    points = torch.quantile(statistic, torch.linspace(0, 1, QUANTILES, dtype=torch.float64))
    return {"classes": classes, "layers": layers, "quantiles": [float(v) for v in points]}


def parse_layer(
    layer: dict[str, Any], classes: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """One stored layer's statistics as tensors on `device` (the record checked by
    `taskmeta`); the tensors are shared between calls: read them, never write them."""
    dim, kept = layer["dim"], len(layer["variances"])
    device = torch.device(device)
    return {
        "means": _decoded(layer["means"], (classes, dim), device),
        "components": _decoded(layer["components"], (kept, dim), device),
        "variances": on_device(tuple(layer["variances"]), device),
        "base": layer["base"],
    }


@lru_cache(maxsize=1024)  # 3 layers x 2 tensors of 170 tasks; about 20 KB each
def _decoded(text: str, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """`decode16` onto `device`, once per text: task inference reads every candidate's
    statistics on every call (0.14 ms a task to decode on the CPU: for 10 tasks, 8% of a
    plain EfficientNet-Lite0 forward of 16 images at 64 px; on a GPU each upload would
    also wait for the work queued before it)."""
    return decode16(text, shape).to(device)


@lru_cache(maxsize=1024)
def on_device(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A stored list of numbers (quantiles, variances) as a float32 tensor on `device`,
    uploaded once and shared between calls: read it, never write it. A fresh
    ``torch.tensor(values, device=...)`` per call is an upload the host waits on."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def feature_score(record: dict[str, Any], features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The share of the task's validation images less typical than each input, in
    [TAIL, 1]; beyond the least typical, below TAIL and decaying with the statistic (so
    that inputs far from every task still rank)."""
    statistic = None
    for layer in record["layers"]:
        values = features[layer["name"]]
        if values.shape[1] != layer["dim"]:
            raise ConfigError(
                f"layer {layer['name']!r} gives {values.shape[1]} features; the task's "
                f"statistics hold {layer['dim']}: it was calibrated on another model"
            )
        stats = parse_layer(layer, record["classes"], values.device)
        term = (distance(stats, values) / layer["median"]).log()
        statistic = term if statistic is None else statistic + term
    assert statistic is not None
    return p_value(statistic, on_device(tuple(record["quantiles"]), statistic.device))


def p_value(statistic: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """1 - CDF(statistic), the CDF linear between its stored quantiles, squeezed into
    [TAIL, 1]; beyond the last quantile TAIL / (1 + excess / the top tenth's spread)."""
    statistic, quantiles = statistic.float().contiguous(), quantiles.float()
    steps = len(quantiles) - 1
    upper = torch.searchsorted(quantiles, statistic).clamp(1, steps)
    low, high = quantiles[upper - 1], quantiles[upper]
    within = ((statistic - low) / (high - low).clamp_min(_EPS)).clamp(0, 1)
    score = 1 - (upper - 1 + within) / steps
    spread = (quantiles[-1] - quantiles[round(0.9 * steps)]).clamp_min(_EPS)
    tail = TAIL / (1 + (statistic - quantiles[-1]) / spread)  # no underflow: ranks
    inside = TAIL + (1 - TAIL) * score.clamp(0, 1)
    return torch.where(statistic > quantiles[-1], tail.clamp(max=TAIL), inside)


# ------------------------------------------------------------- 16-bit text
def encode16(tensor: torch.Tensor) -> str:
    """A tensor as base64 of its float16 little-endian bytes (rows, then columns)."""
    data = tensor.detach().to(torch.float16).cpu().contiguous().numpy().astype("<f2")
    return base64.b64encode(data.tobytes()).decode("ascii")


def decode16(text: str, shape: tuple[int, ...]) -> torch.Tensor:
    """What `encode16` wrote, as float32 of `shape`; ValueError if it is not exactly that."""
    count = math.prod(shape)
    if not isinstance(text, str) or len(text) != 4 * math.ceil(2 * count / 3):
        raise ValueError(f"expected the base64 of {count} 16-bit numbers")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    if len(data) != 2 * count:
        raise ValueError(f"expected the base64 of {count} 16-bit numbers")
    return torch.frombuffer(bytearray(data), dtype=torch.float16).float().reshape(shape)
