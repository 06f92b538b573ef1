"""Mixed-task batches: the rows of each task gathered, and the groups' logits put back."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError


def first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise ConfigError("a mixed-task batch needs at least one tensor input")


def batch_size(args: tuple, kwargs: dict[str, Any]) -> int:
    tensor = first_tensor(args, kwargs)
    if tensor.dim() == 0:
        raise ConfigError("a mixed-task batch needs batched inputs (first dimension = samples)")
    return tensor.shape[0]


def take_rows(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index)
    return value


def slice_rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    return value


def logits_of(output: Any) -> torch.Tensor:
    """A backbone's output as a tensor: itself, or the `logits` of an output object
    (Hugging Face models return one)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"the backbone returned a {type(output).__name__}; piggyback needs a tensor of "
            "logits or an object with a `logits` tensor"
        )
    return logits


def assemble(outputs: list[Any], index: torch.Tensor | None) -> torch.Tensor:
    """The groups' logits, in `index` order, put back at their rows (None: they are in
    order); padded with -inf if their widths differ."""
    logits = [logits_of(out) for out in outputs]
    if len({o.shape[1:] for o in logits}) > 1:
        if any(o.dim() != 2 for o in logits):
            raise ConfigError("tasks in a mixed batch give outputs of different shapes")
        width = max(o.shape[1] for o in logits)
        logits = [F.pad(o, (0, width - o.shape[1]), value=float("-inf")) for o in logits]
    grouped = torch.cat(logits)
    if index is None:
        return grouped
    return torch.empty_like(grouped).index_copy_(0, index, grouped)
