"""Which task is this? The task of an input, inferred from the tasks a model holds.

Every candidate task runs on the input (one mixed-task batch: k passes' worth of
compute, no Python loop over samples), and each task scores how much the input looks
like its own. Three rules score that (higher: more likely the input's task):

- ``"features"`` (the default): how typical the input's activations are of the task's
  own validation images, seen through the task's mask at a few middle layers (distance
  to the nearest class mean under a shared shrunk covariance, Lee et al. 2018), as the
  share of those images that were less typical (an empirical p-value, so one threshold
  means the same for every task). `calibrate_task` stores the statistics in the task's
  metadata when `fit` saves it; see `piggyback.taskfeatures`.
- ``"entropy"``: 1 - H(p) / log(C), the output's normalised entropy, so tasks of 2 and
  200 classes compare. Needs nothing but the tasks.
- ``"calibrated"``: how typical the input's normalised entropy is of the task's own
  validation images (an empirical p-value, from quantiles `calibrate_task` stores).

On the built-in tasks (bench/task_inference.py, docs/benchmarks.md) the output's
confidence does not tell similar domains apart (grey 64 px digits, clothes and
silhouettes: a network masked for one is as sure of the others), the features do: the
features rule picks the right task for over 99% of single images where the entropy
rule picks it for 65-71%, and refuses 93-95% of the images of a domain no task learned
while refusing 3-4% of known ones.

An input whose best score is below the rule's threshold belongs to no task held: its
task is None. SupSup's one-shot rule (Wortsman et al. 2020: superpose the masks, follow
the entropy gradient of the mixing weights) needs one output space for all tasks; it
does not apply to piggyback's tasks, each with its own head (of its own number of
classes) and, by default, its own norm layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .errors import ConfigError
from .mixed import logits_of
from .taskfeatures import captured, feature_record, feature_scores, on_device, running_features
from .taskmeta import CALIBRATION_KEY, ENTROPY_QUANTILES, FEATURES_KEY

if TYPE_CHECKING:
    from .model import PiggybackModel

RULES = ("calibrated", "entropy", "features")
DEFAULT_RULE = "features"
# Below these scores an input is refused: on bench/task_inference.py's runs, thresholds
# that refused at most 5% of the known tasks' own test images, in both settings (for
# "features", on both seeds, with a margin: 0.07 refused 4.9% on one).
DEFAULT_THRESHOLDS = {"calibrated": 0.01, "entropy": 0.4, "features": 0.05}
Chosen = TypeVar("Chosen")  # what a candidate is: a task's name, a server's entry


@dataclass(frozen=True)
class TaskInference:
    """The task inferred for each sample of a batch.

    `tasks[i]` is the task of sample i (None: refused, it looks like none of them) and
    `scores[i]` the score of the best candidate; `candidate_scores` holds every
    candidate's score (samples x candidates, in the order of `candidates`) and `logits`
    every candidate's output, so that a prediction needs no second pass.
    """

    tasks: list[str | None]
    scores: torch.Tensor
    candidates: list[str]
    candidate_scores: torch.Tensor
    logits: dict[str, torch.Tensor]
    rule: str
    threshold: float

    def predicted_classes(self) -> list[int | None]:
        """Each sample's class under its inferred task (None where refused)."""
        return [
            None if task is None else int(self.logits[task][i].argmax())
            for i, task in enumerate(self.tasks)
        ]


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / log(C) per row, in [0, 1] (0: one class is certain)."""
    logits = logits.float()
    log_p = logits.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy / math.log(max(logits.shape[-1], 2))


@torch.no_grad()
def infer_task(
    model: PiggybackModel,
    *inputs: Any,
    tasks: Sequence[str] | None = None,
    rule: str = DEFAULT_RULE,
    threshold: float | None = None,
    same_task: bool = False,
    **kwargs: Any,
) -> TaskInference:
    """The task of each sample of `inputs` (a batch as the backbone takes it: images,
    or token ids and masks as keyword arguments) among `tasks` (default: all held).

    `same_task=True` says the whole batch comes from one task: its scores are averaged
    over the samples and every sample gets the batch's task. `threshold` (default: the
    rule's, `DEFAULT_THRESHOLDS`) refuses samples whose best score is below it.
    """
    candidates = _candidates(model, tasks, rule)
    threshold = threshold_for(rule, threshold)
    batch = _batch_size(inputs, kwargs)
    names = [task for task in candidates for _ in range(batch)]
    repeated = [_repeat(value, len(candidates), batch) for value in inputs]
    keywords = {key: _repeat(value, len(candidates), batch) for key, value in kwargs.items()}
    layers = _feature_layers(model, candidates) if rule == "features" else []
    with _evaluating(model), captured(model, layers) as seen:
        output = model(*repeated, task_names=names, **keywords)
    logits = {
        task: output[i * batch : (i + 1) * batch, : model.task_info[task].num_classes]
        for i, task in enumerate(candidates)
    }
    if rule == "features":
        scores = _feature_scores(model, candidates, seen)
    else:
        scores = torch.stack([_score(model, task, logits[task], rule) for task in candidates], 1)
    if same_task:
        scores = scores.mean(0, keepdim=True).expand(batch, -1)
    chosen, best = choose(candidates, scores, threshold)
    return TaskInference(chosen, best, candidates, scores, logits, rule, threshold)


def threshold_for(rule: str, threshold: float | None) -> float:
    """`threshold`, or the rule's default where it is None."""
    return DEFAULT_THRESHOLDS[rule] if threshold is None else float(threshold)


def choose(
    candidates: Sequence[Chosen], scores: torch.Tensor, threshold: float
) -> tuple[list[Chosen | None], torch.Tensor]:
    """Each row's best-scoring candidate (scores: rows x candidates), None where that
    score is below `threshold`; and the best scores. The host reads both at once: on a
    GPU each read waits for the work queued before it."""
    best, index = scores.max(1)
    read = torch.stack((best.double(), index.double())).tolist()
    chosen = [
        candidates[int(i)] if score >= threshold else None for score, i in zip(*read, strict=True)
    ]
    return chosen, best


def _candidates(model: PiggybackModel, tasks: Sequence[str] | None, rule: str) -> list[str]:
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r} is not known; expected one of {RULES}")
    candidates = list(model.task_info if tasks is None else dict.fromkeys(tasks))
    if not candidates:
        raise ConfigError("no task to infer: the model holds none (add or load tasks first)")
    for task in candidates:
        if task not in model.task_info:
            raise ConfigError(f"task {task!r} is not held; held: {sorted(model.task_info)}")
    missing = [t for t in candidates if rule not in supported_rules(model.task_info[t].metadata)]
    if missing:
        raise ConfigError(
            f"rule={rule!r} needs each task's calibration, and {missing} have none or an "
            "older one (tasks trained by `fit` get one; `calibrate_task` adds it from "
            "validation images); or use rule='entropy'"
        )
    return candidates


def supported_rules(metadata: dict[str, Any]) -> tuple[str, ...]:
    """The rules a task of this (checked) metadata can be scored by."""
    record = metadata.get(CALIBRATION_KEY)
    if not record:
        return ("entropy",)
    return tuple(rule for rule in RULES if rule != "features" or FEATURES_KEY in record)


def _feature_layers(model: PiggybackModel, candidates: list[str]) -> list[str]:
    records = [model.task_info[task].metadata[CALIBRATION_KEY] for task in candidates]
    names = [layer["name"] for r in records for layer in r[FEATURES_KEY]["layers"]]
    return list(dict.fromkeys(names))


def _feature_scores(
    model: PiggybackModel, candidates: list[str], seen: dict[tuple[str, str], list[torch.Tensor]]
) -> torch.Tensor:
    """Every candidate's features rule score at once (`taskfeatures.feature_scores`)."""
    records = [model.task_info[task].metadata[CALIBRATION_KEY][FEATURES_KEY] for task in candidates]
    features = [
        _features_of(seen, [layer["name"] for layer in record["layers"]], task)
        for record, task in zip(records, candidates, strict=True)
    ]
    return feature_scores(records, features)


def _score(model: PiggybackModel, task: str, logits: torch.Tensor, rule: str) -> torch.Tensor:
    """A candidate's score by an output rule ("entropy", "calibrated")."""
    entropy = normalised_entropy(logits)
    if rule == "entropy":
        return 1 - entropy
    quantiles = on_device(
        tuple(model.task_info[task].metadata[CALIBRATION_KEY]["quantiles"]), entropy.device
    )
    # The share of the task's validation images at least this unsure: 1 - CDF(entropy),
    # the CDF read off its quantiles (a step on either side of the range).
    below = torch.searchsorted(quantiles, entropy.contiguous(), right=True)
    return 1 - below.float() / len(quantiles)


def calibration(entropies: torch.Tensor) -> dict[str, Any]:
    """What a task stores of its validation images' normalised entropies: ENTROPY_QUANTILES
    evenly spaced quantiles (read back as untrusted header fields by `piggyback.taskmeta`)."""
    if entropies.numel() == 0:
        raise ConfigError("calibration needs at least one validation image")
    points = torch.linspace(0, 1, ENTROPY_QUANTILES, dtype=torch.float64)
    values = torch.quantile(entropies.double().clamp(0, 1), points)
    return {"quantiles": [round(float(v), 6) for v in values], "samples": entropies.numel()}


@torch.no_grad()
def calibrate_task(
    model: PiggybackModel,
    task: str,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Store in `task`'s metadata what its own validation `batches` (images, or (images,
    labels) pairs) look like to it: how sure it is of them (what rule="calibrated"
    compares inputs with) and the statistics of their features (rule="features",
    `piggyback.taskfeatures`; per class where labels are given). Returns the record.
    Batches go to `device` (default: the model's)."""
    if device is None:
        device = next(model.parameters()).device
    active = model.active_task
    with _evaluating(model), calibrating(model, task) as observe:
        model.set_task(task)
        try:
            for batch in batches:
                labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
                observe(logits_of(model(_images(batch).to(device))), labels)
        finally:
            model.set_task(active)
    return model.task_info[task].metadata[CALIBRATION_KEY]


@contextmanager
def calibrating(
    model: PiggybackModel, task: str
) -> Iterator[Callable[[torch.Tensor, torch.Tensor | None], None]]:
    """Calibrate `task` (as `calibrate_task` does) from the forward passes of it that the
    block runs on its own validation images, such as a final validation pass: the block
    calls the function it is given with each batch's logits and labels (None: no
    per-class statistics). The record is stored when the block ends without error."""
    entropies: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []

    def observe(logits: torch.Tensor, batch_labels: torch.Tensor | None) -> None:
        entropies.append(normalised_entropy(logits).cpu())
        if batch_labels is not None:
            labels.append(torch.as_tensor(batch_labels).reshape(-1).cpu())

    with running_features(model, task) as seen:
        yield observe
    record = calibration(torch.cat(entropies) if entropies else torch.empty(0))
    features = {name: value.cpu() for name, value in seen().items()}
    if features:  # else (no masked layer ran as a module) the rules on the output only
        by_class = torch.cat(labels) if labels and len(labels) == len(entropies) else None
        classes = model.task_info[task].num_classes
        record[FEATURES_KEY] = feature_record(features, by_class, classes)
    model.task_info[task].metadata[CALIBRATION_KEY] = record


def _features_of(
    seen: dict[tuple[str, str], list[torch.Tensor]], layers: list[str], task: str
) -> dict[str, torch.Tensor]:
    """What `captured` saw of `task` at `layers`, one tensor a layer."""
    missing = [name for name in layers if (name, task) not in seen]
    if missing:
        raise ConfigError(f"layers {missing} never ran for task {task!r}: no features to compare")
    return {name: torch.cat(seen[name, task]) for name in layers}


@contextmanager
def _evaluating(model: PiggybackModel) -> Iterator[None]:
    """`model` in eval mode for the block, then as it was; a model already in eval mode
    is not switched (a switch drops its cached masked weights)."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _batch_size(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for value in (*inputs, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ConfigError("infer_task needs a batch: a tensor whose first dimension is the samples")


def _repeat(value: Any, times: int, batch: int) -> Any:
    """A per-sample tensor stacked `times` over (one copy per candidate task); anything
    else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value
