"""Scores to masks: hard thresholds with a straight-through gradient, and score inits.

The forward pass thresholds real-valued scores into a mask; the backward pass
treats the threshold as the identity, so with ``W_task = W * m`` autograd gives
``dL/dscores = dL/dW_task * W``, the paper's update.
"""

from __future__ import annotations

from typing import Any

import torch

from .bits import MaskKind
from .config import ScoreInit, ThresholdFn

MASK_KINDS: dict[str, MaskKind] = {"binarizer": "binary", "ternarizer": "ternary"}


class _StraightThrough(torch.autograd.Function):
    """A thresholding whose gradient w.r.t. the scores is the incoming one, unchanged.

    Through W * m that makes dL/dscores = dL/d(W * m) * W, as in the paper.
    """

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output, None


class Binarizer(_StraightThrough):
    """m = 1 where score > threshold, else 0; gradient passed straight through."""

    @staticmethod
    def forward(scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype)


class Ternarizer(_StraightThrough):
    """m = -1 below 0, 0 in [0, threshold], 1 above; gradient passed straight through."""

    @staticmethod
    def forward(scores: torch.Tensor, threshold: float) -> torch.Tensor:
        return (scores > threshold).to(scores.dtype) - (scores < 0).to(scores.dtype)


class _BinaryMasked(torch.autograd.Function):
    """W * (scores > threshold) as one select, and in backward dL/dscores = dL/dW_task * W:
    what W * Binarizer(scores) gives, with one autograd node and two kernels instead of
    three nodes and four (a training step on a GPU waits on their launches). Its forward
    takes `ctx` (no `setup_context`, for which torch binds the arguments with `inspect` on
    every call), which torch.func's transforms refuse: under them `mask_weight` composes."""

    @staticmethod
    def forward(
        ctx: Any, weight: torch.Tensor, scores: torch.Tensor, threshold: float
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.scores_dtype = scores.dtype
        return torch.where(scores > threshold, weight, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return None, (grad * weight).to(ctx.scores_dtype), None


_THRESHOLDERS: dict[str, type[torch.autograd.Function]] = {
    "binarizer": Binarizer,
    "ternarizer": Ternarizer,
}


def threshold_scores(scores: torch.Tensor, threshold: float, fn: ThresholdFn) -> torch.Tensor:
    """The mask of `scores` under `fn`, differentiable with the straight-through estimator."""
    return _THRESHOLDERS[fn].apply(scores, threshold)


def mask_weight(
    weight: torch.Tensor,
    scores: torch.Tensor,
    threshold: float,
    fn: ThresholdFn,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W * mask(scores) (into `out` when given), differentiable w.r.t. the scores as the
    paper says. A binary mask selects: a dropped weight is +0.0, as a stored task's is."""
    if fn != "binarizer" or torch._C._are_functorch_transforms_active():
        return torch.mul(weight, threshold_scores(scores, threshold, fn).to(weight.dtype), out=out)
    if out is None and scores.requires_grad and torch.is_grad_enabled():
        return _BinaryMasked.apply(weight, scores, threshold)
    return kept(scores > threshold, weight, out)


def kept(keep: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """W where `keep`, else +0.0 (into `out` when given): how every W * binary mask is
    derived, scores or stored bits alike, so a dropped weight is +0.0 whatever its sign."""
    return torch.where(keep, weight, weight.new_zeros(()), out=out)


def init_scores(weight: torch.Tensor, init: ScoreInit, scale: float) -> torch.Tensor:
    """Fresh fp32 scores shaped like `weight`.

    "1s" fills `scale` (every weight kept at first), "uniform" draws U(-scale, scale)
    from torch's global generator, "weight_based" fills the layer's mean |W|.
    """
    shape, device = weight.shape, weight.device
    if init == "1s":
        return torch.full(shape, scale, dtype=torch.float32, device=device)
    if init == "uniform":
        return torch.empty(shape, dtype=torch.float32, device=device).uniform_(-scale, scale)
    mean_abs = weight.detach().float().abs().mean()
    return torch.full(shape, float(mean_abs), dtype=torch.float32, device=device)
