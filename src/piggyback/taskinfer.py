"""Which task is this? The task of an input, inferred from the tasks a model holds.

Every candidate task runs on the input (one mixed-task batch: k passes' worth of
compute, no Python loop over samples), and each task's output says how much the input
looks like its own: a network masked for another domain is less sure of its answer.

Two rules score that (higher: more likely the input's task):

- ``"entropy"`` (the default): 1 - H(p) / log(C), the output's normalised entropy, so
  tasks of 2 and 200 classes compare. Needs nothing but the tasks.
- ``"calibrated"``: how typical the input's normalised entropy is of the task's own
  validation images: the share of them that were no surer (an empirical p-value, from
  quantiles `calibrate_task` stores in the task's metadata when `fit` saves it), so one
  threshold means the same for every task.

On the built-in tasks (bench/task_inference.py, docs/benchmarks.md) the entropy rule
picks the right task more often than the calibrated one and both refuse about as well,
so it is the default; neither reaches what a service needs across similar domains
(grey 64 px digits, clothes and silhouettes): 68% of single images, 89% of batches of 16.

An input whose best score is below the rule's threshold belongs to no task held: its
task is None. SupSup's one-shot rule (Wortsman et al. 2020: superpose the masks, follow
the entropy gradient of the mixing weights) needs one output space for all tasks; it
does not apply to piggyback's tasks, each with its own head (of its own number of
classes) and, by default, its own norm layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .model import PiggybackModel

RULES = ("calibrated", "entropy")
DEFAULT_RULE = "entropy"
CALIBRATION_KEY = "calibration"  # in a task's metadata: see `calibrate`
QUANTILES = 101  # stored points of a task's validation entropy distribution (0%, 1%, ... 100%)
# Below these scores an input is refused: on bench/task_inference.py's run, the highest
# that refused at most 5% of the known tasks' own test images, in both settings.
DEFAULT_THRESHOLDS = {"calibrated": 0.01, "entropy": 0.4}


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
    threshold = DEFAULT_THRESHOLDS[rule] if threshold is None else float(threshold)
    batch = _batch_size(inputs, kwargs)
    names = [task for task in candidates for _ in range(batch)]
    repeated = [_repeat(value, len(candidates), batch) for value in inputs]
    keywords = {key: _repeat(value, len(candidates), batch) for key, value in kwargs.items()}
    with _evaluating(model):
        output = model(*repeated, task_names=names, **keywords)
    logits = {
        task: output[i * batch : (i + 1) * batch, : model.task_info[task].num_classes]
        for i, task in enumerate(candidates)
    }
    scores = torch.stack([_score(model, task, logits[task], rule) for task in candidates], 1)
    if same_task:
        scores = scores.mean(0, keepdim=True).expand(batch, -1)
    best, index = scores.max(1)
    chosen = [
        candidates[i] if score >= threshold else None
        for i, score in zip(index.tolist(), best.tolist(), strict=True)
    ]
    return TaskInference(chosen, best, candidates, scores, logits, rule, threshold)


def _candidates(model: PiggybackModel, tasks: Sequence[str] | None, rule: str) -> list[str]:
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r} is not known; expected one of {RULES}")
    candidates = list(model.task_info if tasks is None else dict.fromkeys(tasks))
    if not candidates:
        raise ConfigError("no task to infer: the model holds none (add or load tasks first)")
    for task in candidates:
        if task not in model.task_info:
            raise ConfigError(f"task {task!r} is not held; held: {sorted(model.task_info)}")
    if rule == "calibrated":
        missing = [t for t in candidates if CALIBRATION_KEY not in model.task_info[t].metadata]
        if missing:
            raise ConfigError(
                f"rule='calibrated' needs each task's calibration, and {missing} have none "
                "(tasks trained by `fit` get one; `calibrate_task` adds it from validation "
                "images); or use rule='entropy'"
            )
    return candidates


def _score(model: PiggybackModel, task: str, logits: torch.Tensor, rule: str) -> torch.Tensor:
    entropy = normalised_entropy(logits)
    if rule == "entropy":
        return 1 - entropy
    quantiles = torch.tensor(
        model.task_info[task].metadata[CALIBRATION_KEY]["quantiles"], device=entropy.device
    )
    # The share of the task's validation images at least this unsure: 1 - CDF(entropy),
    # the CDF read off its quantiles (a step on either side of the range).
    below = torch.searchsorted(quantiles, entropy.contiguous(), right=True)
    return 1 - below.float() / len(quantiles)


def calibration(entropies: torch.Tensor) -> dict[str, Any]:
    """What a task stores of its validation images' normalised entropies: QUANTILES
    evenly spaced quantiles (read back as untrusted header fields by `piggyback.taskmeta`)."""
    if entropies.numel() == 0:
        raise ConfigError("calibration needs at least one validation image")
    points = torch.linspace(0, 1, QUANTILES, dtype=torch.float64)
    values = torch.quantile(entropies.double().clamp(0, 1), points)
    return {"quantiles": [round(float(v), 6) for v in values], "samples": entropies.numel()}


@torch.no_grad()
def calibrate_task(
    model: PiggybackModel,
    task: str,
    batches: Iterable[Any],
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Store in `task`'s metadata how sure it is of its own validation `batches` (images,
    or (images, labels) pairs): what rule="calibrated" compares inputs with."""
    active = model.active_task
    with _evaluating(model):
        model.set_task(task)
        try:
            entropies = [
                normalised_entropy(model(_images(batch).to(device))).cpu() for batch in batches
            ]
        finally:
            model.set_task(active)
    record = calibration(torch.cat(entropies) if entropies else torch.empty(0))
    model.task_info[task].metadata[CALIBRATION_KEY] = record
    return record


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
