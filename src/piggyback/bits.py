"""Mask storage: bit packing in memory, and entropy coding in task files.

A binary mask costs 1 bit per weight packed (8 per byte, least significant bit
first); a ternary mask 2 bits (codes value + 1, 4 per byte). Packing and
unpacking are torch ops on the mask's own device, so a GPU-resident task stays
on the GPU. Trained masks are mostly ones, so files also try lzma on the packed
bytes and a sparse code (delta-coded positions of the values that differ from
the majority), and keep whichever is smallest; `empirical_entropy_bits` is the
floor none of them can beat without modelling the weights.
"""

from __future__ import annotations

import lzma
import math
import struct
from typing import Literal

import numpy as np
import torch

from .errors import ConfigError, TaskFileError

MaskKind = Literal["binary", "ternary"]
Codec = Literal["packed", "packed-lzma", "sparse-lzma"]
CODECS: tuple[Codec, ...] = ("packed", "packed-lzma", "sparse-lzma")

_BITS: dict[str, int] = {"binary": 1, "ternary": 2}
_LOWEST: dict[str, int] = {"binary": 0, "ternary": -1}  # code = value - lowest
_SPARSE_HEADER = struct.Struct("<bBQ")  # majority value, delta itemsize, exception count
_DELTA_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


def bits_per_value(kind: MaskKind) -> int:
    """Bits one mask value takes when packed: 1 for binary, 2 for ternary."""
    if kind not in _BITS:
        raise ConfigError(f"mask kind {kind!r} is not one of {sorted(_BITS)}")
    return _BITS[kind]


def _layout(kind: MaskKind, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """(bits per value, values per byte, bit shift of each slot in a byte)."""
    bits = bits_per_value(kind)
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=device, dtype=torch.uint8) * bits
    return bits, per_byte, shifts


def pack_mask(mask: torch.Tensor, kind: MaskKind) -> torch.Tensor:
    """Pack a mask of {0, 1} (binary) or {-1, 0, 1} (ternary) into flat uint8."""
    bits, per_byte, shifts = _layout(kind, mask.device)
    codes = mask.detach().flatten().to(torch.int16) - _LOWEST[kind]
    exact = mask.detach().flatten() == (codes + _LOWEST[kind]).to(mask.dtype)
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits or not bool(exact.all())):
        allowed = "{0, 1}" if kind == "binary" else "{-1, 0, 1}"
        raise ConfigError(f"a {kind} mask may only hold {allowed}; got other values")
    padding = (-codes.numel()) % per_byte
    codes = torch.nn.functional.pad(codes, (0, padding)).to(torch.uint8).view(-1, per_byte)
    return (codes << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(
    packed: torch.Tensor, numel: int, kind: MaskKind, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `pack_mask`: the first `numel` values, flat, as `dtype`."""
    bits, _, shifts = _layout(kind, packed.device)
    codes = (packed.view(-1, 1) >> shifts) & ((1 << bits) - 1)
    values = codes.flatten()[:numel]
    if _LOWEST[kind]:
        return values.to(dtype) + _LOWEST[kind]
    return values.to(dtype)


def empirical_entropy_bits(mask: torch.Tensor) -> float:
    """Total bits an ideal order-0 coder needs for `mask` (the codecs' floor)."""
    values = mask.detach().flatten().cpu().to(torch.int64)
    if values.numel() and (values.min() < -1 or values.max() > 1):
        raise ConfigError("entropy is measured on masks of {-1, 0, 1}; got other values")
    counts = torch.bincount(values + 1, minlength=3).tolist()  # bincount: 20x faster than unique
    total = sum(counts)
    return float(sum(-n * math.log2(n / total) for n in counts if n))


# ---------------------------------------------------------------- file codecs
def encodings(mask: torch.Tensor, kind: MaskKind) -> dict[Codec, bytes]:
    """A flat mask under every codec in `CODECS` (what `encode_mask` chooses from)."""
    flat = mask.flatten().cpu()
    packed = pack_mask(flat, kind).numpy().tobytes()
    return {
        "packed": packed,
        "packed-lzma": lzma.compress(packed),
        "sparse-lzma": _encode_sparse(flat, kind),
    }


def encode_mask(mask: torch.Tensor, kind: MaskKind) -> tuple[bytes, Codec]:
    """The smallest encoding of a flat mask among `CODECS`, and its codec name."""
    codec, payload = min(encodings(mask, kind).items(), key=lambda item: len(item[1]))
    return payload, codec


def _encode_sparse(flat: torch.Tensor, kind: MaskKind) -> bytes:
    """Positions of the values that differ from the majority, as gaps, then lzma."""
    values = flat.to(torch.int8).numpy()
    uniques, counts = np.unique(values, return_counts=True)
    majority = int(uniques[np.argmax(counts)]) if len(uniques) else 1
    positions = np.flatnonzero(values != majority)
    gaps = np.diff(positions, prepend=-1) - 1  # zero-based gap before each exception
    dtype = next(d for d in _DELTA_DTYPES if not len(gaps) or gaps.max() <= np.iinfo(d).max)
    body = gaps.astype(dtype).tobytes()
    if kind == "ternary":  # which of the two other values each exception holds
        higher = max(v for v in (-1, 0, 1) if v != majority)
        above = torch.from_numpy(values[positions] == higher)
        body += pack_mask(above, "binary").numpy().tobytes()
    header = _SPARSE_HEADER.pack(majority, np.dtype(dtype).itemsize, len(positions))
    return lzma.compress(header + body)


def decode_mask(payload: bytes, codec: str, numel: int, kind: MaskKind) -> torch.Tensor:
    """Inverse of `encode_mask`: a flat int8 CPU tensor; any damage is a TaskFileError."""
    if kind not in _BITS:
        raise TaskFileError(f"mask kind {kind!r} is not one of {sorted(_BITS)}")
    if not isinstance(numel, int) or numel < 0:
        raise TaskFileError(f"mask size {numel!r} is not a non-negative integer")
    packed_size = math.ceil(numel * _BITS[kind] / 8)
    if codec == "packed":
        return _decode_packed(payload, packed_size, numel, kind)
    if codec == "packed-lzma":
        return _decode_packed(_decompress(payload, packed_size), packed_size, numel, kind)
    if codec == "sparse-lzma":
        return _decode_sparse(payload, numel, kind)
    raise TaskFileError(f"mask codec {codec!r} is not one of {list(CODECS)}")


def _decompress(payload: bytes, limit: int) -> bytes:
    """lzma-decompress at most `limit` + header bytes, so a crafted file cannot balloon."""
    decompressor = lzma.LZMADecompressor()
    try:
        data = decompressor.decompress(payload, max_length=limit)
    except lzma.LZMAError as exc:
        raise TaskFileError(f"mask payload is corrupt ({exc})") from exc
    if not decompressor.eof:
        raise TaskFileError("mask payload is truncated or longer than its declared size")
    return data


def _decode_packed(data: bytes, packed_size: int, numel: int, kind: MaskKind) -> torch.Tensor:
    if len(data) != packed_size:
        raise TaskFileError(
            f"mask payload holds {len(data)} bytes; {numel} {kind} values need {packed_size}"
        )
    packed = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    values = unpack_mask(packed, numel, kind, dtype=torch.int8)
    if kind == "ternary" and bool((values > 1).any()):
        raise TaskFileError("ternary mask payload holds an invalid 2-bit code")
    return values


def _decode_sparse(payload: bytes, numel: int, kind: MaskKind) -> torch.Tensor:
    # exceptions <= numel, each at most 8 bytes of gap + 1 bit of value
    data = _decompress(payload, _SPARSE_HEADER.size + 8 * numel + numel // 8 + 1)
    if len(data) < _SPARSE_HEADER.size:
        raise TaskFileError("sparse mask payload is shorter than its header")
    majority, itemsize, count = _SPARSE_HEADER.unpack_from(data)
    allowed = (0, 1) if kind == "binary" else (-1, 0, 1)
    dtypes = {np.dtype(d).itemsize: d for d in _DELTA_DTYPES}
    if majority not in allowed or itemsize not in dtypes or count > numel:
        raise TaskFileError(
            f"sparse mask header is invalid (majority {majority}, gap width {itemsize}, "
            f"{count} exceptions for {numel} values)"
        )
    gaps_end = _SPARSE_HEADER.size + itemsize * count
    signs_size = math.ceil(count / 8) if kind == "ternary" else 0
    if len(data) != gaps_end + signs_size:
        raise TaskFileError(
            f"sparse mask payload holds {len(data)} bytes; its header promises "
            f"{gaps_end + signs_size}"
        )
    gaps = np.frombuffer(data, dtype=dtypes[itemsize], count=count, offset=_SPARSE_HEADER.size)
    positions = np.cumsum(gaps.astype(np.uint64) + 1, dtype=np.uint64) - 1
    if count and int(positions.max()) >= numel:
        raise TaskFileError(f"sparse mask payload points past the mask's {numel} values")
    values = np.full(numel, majority, dtype=np.int8)
    if kind == "binary":
        values[positions] = 1 - majority
    else:
        above = _decode_packed(data[gaps_end:], signs_size, count, "binary").numpy().astype(bool)
        others = [v for v in allowed if v != majority]  # sorted: [lower, higher]
        values[positions] = np.where(above, others[1], others[0])
    return torch.from_numpy(values)
