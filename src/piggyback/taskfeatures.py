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
    """Squared Mahalanobis distance of each row of `features` to its nearest class mean:
    features (k x n x dim) for k candidates at once, each with its statistics (`stacked`:
    means k x classes x dim, components k x kept x dim, variances k x kept, base k, and
    `classes` k, the real classes of each, the others padding); k x n."""
    means = stats["means"].to(features.dtype)
    components = stats["components"].to(features.dtype)
    base = stats["base"].to(features.dtype)
    k, classes, dim = means.shape
    diff = features[:, :, None, :] - means[:, None]  # k x samples x classes x dim
    squared = diff.pow(2).sum(-1) / base[:, None, None]
    rows = diff.reshape(k, -1, dim)  # k x samples * classes x dim
    if k == 1:  # one matrix product, as fitting's always was: its records stay bit for bit
        projected = (rows[0] @ components[0].T)[None]
    else:
        projected = torch.bmm(rows, components.transpose(1, 2))
    # a padded direction has the base variance: it adds nothing
    weights = 1 / stats["variances"].to(features.dtype) - 1 / base[:, None]  # k x kept
    squared = squared + (projected.pow(2) * weights[:, None]).sum(-1).view(squared.shape)
    padding = torch.arange(classes, device=means.device) >= stats["classes"][:, None]
    squared = squared.masked_fill(padding[:, None], math.inf)
    return squared.min(-1).values.clamp_min(_EPS)


def stacked(layers: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """One layer's statistics of k candidates (`fit_layer`'s, or a stored record's, on the
    CPU) as `distance` takes them: padded to the most classes and directions among them.
    One candidate's tensors are taken as they are, layouts included, so that fitting's
    arithmetic (and the records it stores) is what it was bit for bit."""
    classes = max(len(layer["means"]) for layer in layers)
    kept = max(len(layer["variances"]) for layer in layers)
    dtype = layers[0]["means"].dtype
    bases = [float(layer["base"]) for layer in layers]
    variances = [layer["variances"].to(dtype) for layer in layers]
    return {
        "means": _stack([layer["means"] for layer in layers], classes, [0.0] * len(layers)),
        "components": _stack([layer["components"] for layer in layers], kept, [0.0] * len(layers)),
        "variances": _stack(variances, kept, bases),  # a padded direction: the base variance
        "base": torch.tensor(bases, dtype=dtype),
        "classes": torch.tensor([len(layer["means"]) for layer in layers]),
    }


def _stack(tensors: list[torch.Tensor], rows: int, fills: list[float]) -> torch.Tensor:
    """`tensors` stacked, each padded with rows of its fill up to `rows` (one alone: a
    view of it)."""
    if len(tensors) == 1 and len(tensors[0]) == rows:
        return tensors[0][None]
    padded = []
    for tensor, fill in zip(tensors, fills, strict=True):
        pad = (0, 0) * (tensor.dim() - 1) + (0, rows - len(tensor))
        padded.append(torch.nn.functional.pad(tensor, pad, value=fill))
    return torch.stack(padded)


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
            out_of_fold[held] = distance(stacked([stats]), values[held][None])[0]
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


@lru_cache(maxsize=1024)  # 3 layers x 2 tensors of 170 tasks; about 20 KB each
def _decoded(text: str, shape: tuple[int, int]) -> torch.Tensor:
    """`decode16`, once per text (0.14 ms a task to decode on the CPU)."""
    return decode16(text, shape)


@lru_cache(maxsize=1024)
def on_device(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A stored list of numbers (quantiles) as a float32 tensor on `device`, uploaded once
    and shared between calls: read it, never write it. A fresh ``torch.tensor(values,
    device=...)`` per call is an upload the host waits on."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def _record_key(record: dict[str, Any]) -> tuple:
    """What a task's feature record holds, hashable (the base64 texts hash once each)."""
    layers = tuple(
        (layer["name"], layer["dim"], layer["means"], layer["components"],
         tuple(layer["variances"]), layer["base"], layer["median"])
        for layer in record["layers"]
    )  # fmt: skip
    return record["classes"], layers, tuple(record["quantiles"])


@lru_cache(maxsize=64)
def _candidates_on(keys: tuple[tuple, ...], device: torch.device) -> list[Any]:
    """The statistics of k candidates (`_record_key`s, the same layers each) stacked and on
    `device`, made once per set of candidates: task inference asks on every call, and on a
    GPU each upload would wait for the work queued before it. Per layer (name, dim,
    `stacked` statistics, medians), then the quantiles (k x QUANTILES)."""
    layers = []
    for position, (name, dim, *_) in enumerate(keys[0][1]):
        parsed = []
        for classes, record_layers, _ in keys:  # each record as checked by `taskmeta`
            _, _, means, components, variances, base, median = record_layers[position]
            parsed.append({
                "means": _decoded(means, (classes, dim)),
                "components": _decoded(components, (len(variances), dim)),
                "variances": torch.tensor(variances, dtype=torch.float32),
                "base": base,
                "median": median,
            })  # fmt: skip
        stats = {k: v.to(device) for k, v in stacked(parsed).items()}
        medians = torch.tensor([layer["median"] for layer in parsed]).to(device)
        layers.append((name, dim, stats, medians))
    quantiles = torch.tensor([key[2] for key in keys], dtype=torch.float32).to(device)
    return [layers, quantiles]


def feature_scores(
    records: Sequence[dict[str, Any]], features: Sequence[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Each candidate's score of each input (samples x candidates): the share of the
    task's validation images less typical than the input, in [TAIL, 1]; beyond the least
    typical, below TAIL and decaying with the statistic (so that inputs far from every
    task still rank). `records[i]` is candidate i's feature statistics and `features[i]`
    what its pass gave at their layers; candidates reading the same layers (those of one
    model) are scored together."""
    device = next(iter(features[0].values())).device
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(tuple(layer["name"] for layer in record["layers"]), []).append(index)
    columns: list[torch.Tensor | None] = [None] * len(records)
    for members in groups.values():
        keys = tuple(_record_key(records[i]) for i in members)
        layers, quantiles = _candidates_on(keys, device)
        statistic = None
        for name, dim, stats, medians in layers:
            values = torch.stack([features[i][name] for i in members])  # k x samples x dim
            if values.shape[-1] != dim:
                raise ConfigError(
                    f"layer {name!r} gives {values.shape[-1]} features; the task's "
                    f"statistics hold {dim}: it was calibrated on another model"
                )
            term = (distance(stats, values) / medians[:, None]).log()
            statistic = term if statistic is None else statistic + term
        assert statistic is not None
        for column, score in zip(members, p_value(statistic, quantiles), strict=True):
            columns[column] = score
    return torch.stack(columns, 1)  # type: ignore[arg-type]


def p_value(statistic: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """1 - CDF(statistic), the CDF linear between its stored quantiles, squeezed into
    [TAIL, 1]; beyond the last quantile TAIL / (1 + excess / the top tenth's spread).
    Candidates may lead: statistic k x n against quantiles k x QUANTILES."""
    statistic, quantiles = statistic.float().contiguous(), quantiles.float().contiguous()
    steps = quantiles.shape[-1] - 1
    upper = torch.searchsorted(quantiles, statistic).clamp(1, steps)
    low, high = quantiles.gather(-1, upper - 1), quantiles.gather(-1, upper)
    within = ((statistic - low) / (high - low).clamp_min(_EPS)).clamp(0, 1)
    score = 1 - (upper - 1 + within) / steps
    last = quantiles[..., -1:]
    spread = (last - quantiles[..., round(0.9 * steps), None]).clamp_min(_EPS)
    tail = TAIL / (1 + (statistic - last) / spread)  # no underflow: ranks
    inside = TAIL + (1 - TAIL) * score.clamp(0, 1)
    return torch.where(statistic > last, tail.clamp(max=TAIL), inside)


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
