"""Threshold functions, the straight-through gradient, and score inits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from piggyback.functional import init_scores, mask_weight, threshold_scores


def test_binarizer_values() -> None:
    scores = torch.tensor([-1.0, 0.0, 0.005, 0.0051, 1.0])
    assert threshold_scores(scores, 5e-3, "binarizer").tolist() == [0, 0, 0, 1, 1]


def test_ternarizer_values() -> None:
    scores = torch.tensor([-1.0, -1e-6, 0.0, 0.005, 0.0051, 1.0])
    assert threshold_scores(scores, 5e-3, "ternarizer").tolist() == [-1, -1, 0, 0, 1, 1]


@pytest.mark.parametrize("fn", ["binarizer", "ternarizer"])
def test_score_gradient_is_masked_weight_gradient_times_weight(fn: str) -> None:
    """dL/dS must equal dL/d(W*m) * W, computed by autograd on a plain conv layer."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    scores = (torch.rand(4, 3, 3, 3, generator=gen) * 0.04 - 0.01).requires_grad_()
    x = torch.randn(2, 3, 5, 5, generator=gen)
    target = torch.randn(2, 4, 3, 3, generator=gen)

    mask = threshold_scores(scores, 5e-3, fn)
    F.mse_loss(F.conv2d(x, weight * mask), target).backward()

    masked = (weight * mask.detach()).requires_grad_()
    F.mse_loss(F.conv2d(x, masked), target).backward()
    torch.testing.assert_close(scores.grad, masked.grad * weight, rtol=0, atol=0)


@pytest.mark.parametrize("fn", ["binarizer", "ternarizer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_weight_gives_what_weight_times_the_thresholded_mask_gives(
    fn: str, dtype: torch.dtype
) -> None:
    """The fused binary path (one select, one autograd node) against the composition it
    replaces: the same layer output and the same score gradient, bit for bit; and with
    autograd off, the same values written into `out`."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(6, 3, 3, 3, generator=gen).to(dtype)
    scores = torch.rand(6, 3, 3, 3, generator=gen) * 0.04 - 0.01
    x = torch.randn(2, 3, 5, 5, generator=gen).to(dtype)

    def output_and_grad(masked_of: object) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = scores.clone().requires_grad_()
        out = F.conv2d(x, masked_of(leaf))
        out.float().square().sum().backward()
        return out.detach(), leaf.grad

    old = output_and_grad(lambda s: weight * threshold_scores(s, 5e-3, fn).to(dtype))
    new = output_and_grad(lambda s: mask_weight(weight, s, 5e-3, fn))
    assert new[1].dtype == torch.float32
    for got, expected in zip(new, old, strict=True):
        assert torch.equal(got, expected)
    written = torch.full_like(weight, 7.0)
    with torch.no_grad():
        assert mask_weight(weight, scores, 5e-3, fn, out=written) is written
    assert torch.equal(written, weight * threshold_scores(scores, 5e-3, fn).to(dtype))


def test_inits() -> None:
    weight = torch.randn(5, 7)
    assert torch.equal(init_scores(weight, "1s", 0.01), torch.full((5, 7), 0.01))
    uniform = init_scores(weight, "uniform", 0.01)
    assert uniform.abs().max() <= 0.01 and uniform.std() > 0
    based = init_scores(weight, "weight_based", 0.01)
    torch.testing.assert_close(based, torch.full((5, 7), float(weight.abs().mean())))
    assert all(s.dtype == torch.float32 for s in (uniform, based))


def test_scores_stay_fp32_for_half_weights() -> None:
    assert init_scores(torch.randn(3, dtype=torch.bfloat16), "1s", 0.01).dtype == torch.float32
