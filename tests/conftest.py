"""Tiny models and images shared by the tests."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """Every kind of layer piggyback handles: conv (plain, grouped, depthwise), conv1d,
    batch norm, layer norm, hidden linear, and a linear head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn2(self.depthwise(self.grouped(x))))
        x = self.seq(x.flatten(2)).mean(-1)
        return self.fc(torch.relu(self.norm(self.hidden(x))))


def make_tiny(seed: int = 0, num_classes: int = 4) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(num_classes)
    # Non-trivial running statistics, so frozen-BN bugs show up.
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture
def tiny() -> TinyNet:
    return make_tiny()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# A PNG text chunk that inflates past PIL's limit for text (its ValueError is no OSError).
HUGE_TEXT_CHUNK = (b"zTXt", b"note\x00\x00" + zlib.compress(b"a" * 20_000_000))


def png_header(width: int, height: int, *chunks: tuple[bytes, bytes]) -> bytes:
    """A grey PNG that declares `width` x `height` pixels in a few bytes: its one row of
    pixel data is all a decoder would get, so only header checks may look at it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + b"".join(chunk(kind, data) for kind, data in chunks)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )
