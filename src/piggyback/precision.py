"""Mixed precision: the one place that turns an `amp` setting into torch.autocast."""

from __future__ import annotations

from typing import Literal

import torch

Amp = Literal["bf16", "fp16"]
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Amp | None) -> torch.autocast:
    """Mixed precision for forward passes when `amp` is set; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp or ""), enabled=amp is not None)
