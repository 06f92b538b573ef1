"""Mixed precision: the one place that turns an `amp` setting into torch.autocast."""

from __future__ import annotations

from typing import Literal

import torch

from .errors import ConfigError

Amp = Literal["bf16", "fp16"]
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Amp | None) -> torch.autocast:
    """Mixed precision for forward passes when `amp` is set; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp or ""), enabled=amp is not None)


def check_amp(amp: object, device: torch.device | None = None) -> None:
    """Refuse a precision that is not one of AMP_DTYPES, or fp16 off CUDA (`device`)."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"amp={amp!r}; expected None, 'bf16' or 'fp16'")
    if amp == "fp16" and device is not None and device.type != "cuda":
        raise ConfigError(f"amp='fp16' needs CUDA, the device is {device}; use 'bf16'")
