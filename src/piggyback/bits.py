"""Mask storage: bit packing in memory, and entropy coding in task files.

A binary mask costs 1 bit per weight packed (8 per byte, least significant bit
first); a ternary mask 2 bits (codes value + 1, 4 per byte). On the CPU binary
masks pack and unpack with numpy's C loops; elsewhere with torch ops on the
mask's own device, so a GPU-resident task stays on the GPU.

Trained masks are mostly ones, so task files also try zstd on the packed bytes
and a sparse code (the gaps between the values that differ from the majority,
one byte each with an escape for long gaps), and keep whichever is smallest;
`empirical_entropy_bits` is the floor that no coder ignoring the weights beats
on average. zstd at level 19 stores within ~2% of lzma and decodes ~50x faster
(bench/storage.py), which is what makes loading a task a matter of milliseconds.
"""

from __future__ import annotations

import math
import struct
from typing import Literal, NamedTuple

import numpy as np
import torch
import zstandard

from .errors import ConfigError, TaskFileError

MaskKind = Literal["binary", "ternary"]
Codec = Literal["packed", "packed-zstd", "sparse-zstd"]
CODECS: tuple[Codec, ...] = ("packed", "packed-zstd", "sparse-zstd")

_BITS: dict[str, int] = {"binary": 1, "ternary": 2}
_LOWEST: dict[str, int] = {"binary": 0, "ternary": -1}  # code = value - lowest
_SPARSE_HEADER = struct.Struct("<bQQ")  # majority value, exceptions, escaped (long) gaps
_ESCAPE = 255  # a gap byte of 255 says: the gap is in the uint64 list of long gaps
_ZSTD_LEVEL = 19


def bits_per_value(kind: MaskKind) -> int:
    """Bits one mask value takes when packed: 1 for binary, 2 for ternary."""
    if kind not in _BITS:
        raise ConfigError(f"mask kind {kind!r} is not one of {sorted(_BITS)}")
    return _BITS[kind]


def _codes(mask: torch.Tensor, kind: MaskKind) -> torch.Tensor:
    """Flat uint8 codes (value - lowest), checked to be values the kind allows."""
    bits = bits_per_value(kind)
    flat = mask.detach().flatten()
    codes = flat.to(torch.int16) - _LOWEST[kind]
    valid = not codes.numel() or (int(codes.min()) >= 0 and int(codes.max()) < 1 << bits)
    if valid and flat.is_floating_point():  # 0.5 would pass the range check as 0
        valid = bool((codes + _LOWEST[kind]).to(flat.dtype).eq(flat).all())
    if not valid:
        allowed = "{0, 1}" if kind == "binary" else "{-1, 0, 1}"
        raise ConfigError(f"a {kind} mask may only hold {allowed}; got other values")
    return codes.to(torch.uint8)


def pack_mask(mask: torch.Tensor, kind: MaskKind) -> torch.Tensor:
    """Pack a mask of {0, 1} (binary) or {-1, 0, 1} (ternary) into flat uint8."""
    codes = _codes(mask, kind)
    if kind == "binary" and codes.device.type == "cpu":
        return torch.from_numpy(np.packbits(codes.numpy(), bitorder="little"))
    bits = _BITS[kind]
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % per_byte))
    return (codes.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(
    packed: torch.Tensor,
    numel: int,
    kind: MaskKind,
    dtype: torch.dtype = torch.float32,
    start: int = 0,
) -> torch.Tensor:
    """Inverse of `pack_mask`: `numel` values from the `start`-th on, flat, as `dtype`
    (bool: nonzero). Only the bytes holding them are read, on the packed tensor's device."""
    codes = unpack_codes(packed, numel, kind, start)
    if dtype == torch.bool:  # binary codes are already 0/1: a free reinterpretation
        return codes.view(torch.bool) if kind == "binary" else codes != -_LOWEST[kind]
    return codes.to(dtype) + _LOWEST[kind] if _LOWEST[kind] else codes.to(dtype)


def unpack_codes(packed: torch.Tensor, numel: int, kind: MaskKind, start: int = 0) -> torch.Tensor:
    """The uint8 codes (value - lowest) of `numel` values from the `start`-th on, flat."""
    if kind == "binary" and packed.device.type == "cpu":
        return torch.from_numpy(unpack_binary(packed.numpy(), numel, start))
    bits = bits_per_value(kind)
    per_byte = 8 // bits
    first, skip = divmod(start, per_byte)
    packed = packed[first : first + math.ceil((skip + numel) / per_byte)]
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    return ((packed.view(-1, 1) >> shifts) & ((1 << bits) - 1)).flatten()[skip : skip + numel]


def unpack_binary(packed: np.ndarray, numel: int, start: int = 0) -> np.ndarray:
    """The 0/1 bytes of `numel` binary values from the `start`-th on, from numpy's packed
    bytes (what `unpack_codes` gives on the CPU, without a tensor round trip)."""
    first, skip = divmod(start, 8)
    needed = packed[first : first + (skip + numel + 7) // 8]
    return np.unpackbits(needed, count=skip + numel, bitorder="little")[skip:]


def empirical_entropy_bits(mask: torch.Tensor) -> float:
    """Total bits an ideal order-0 coder needs for `mask` (the codecs' floor)."""
    values = mask.detach().flatten().cpu().to(torch.int64)
    if values.numel() and (values.min() < -1 or values.max() > 1):
        raise ConfigError("entropy is measured on masks of {-1, 0, 1}; got other values")
    counts = torch.bincount(values + 1, minlength=3).tolist()
    total = sum(counts)
    return float(sum(-n * math.log2(n / total) for n in counts if n))


# ---------------------------------------------------------------- file codecs
def encodings(mask: torch.Tensor, kind: MaskKind) -> dict[Codec, bytes]:
    """A flat mask under every codec in `CODECS` (what `encode_mask` chooses from)."""
    flat = mask.flatten().cpu()
    packed = pack_mask(flat, kind).numpy().tobytes()
    return {
        "packed": packed,
        "packed-zstd": _compress(packed),
        "sparse-zstd": _encode_sparse(flat, kind),
    }


def encode_mask(mask: torch.Tensor, kind: MaskKind) -> tuple[bytes, Codec]:
    """The smallest encoding of a flat mask among `CODECS`, and its codec name."""
    codec, payload = min(encodings(mask, kind).items(), key=lambda item: len(item[1]))
    return payload, codec


def _compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data)


def _encode_sparse(flat: torch.Tensor, kind: MaskKind) -> bytes:
    """Gaps between the values that differ from the majority, then zstd."""
    values = flat.to(torch.int8).numpy()
    counts = np.bincount(values.astype(np.int64) + 1, minlength=3)
    majority = int(np.argmax(counts)) - 1 if values.size else 1
    positions = np.flatnonzero(values != majority)
    gaps = np.diff(positions, prepend=-1) - 1  # values equal to the majority before each
    long_gaps = gaps[gaps >= _ESCAPE].astype("<u8")
    body = np.minimum(gaps, _ESCAPE).astype(np.uint8).tobytes() + long_gaps.tobytes()
    if kind == "ternary":  # which of the two other values each exception holds
        higher = max(v for v in (-1, 0, 1) if v != majority)
        body += pack_mask(torch.from_numpy(values[positions] == higher), "binary").numpy().tobytes()
    header = _SPARSE_HEADER.pack(majority, len(positions), len(long_gaps))
    return _compress(header + body)


def decode_bits(
    payload: bytes,
    codec: str,
    numel: int,
    kind: MaskKind,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse of `encode_mask` into `pack_mask`'s layout (flat uint8 on `device`, the CPU
    by default): what a loaded task keeps. A binary mask stored packed is its own bytes,
    never unpacked. A sparse one off the CPU is built packed on `device` from its
    exceptions alone, so the host never touches a byte per weight (on the CPU numpy's
    loops over the values are as fast, and leave the first switch after a load ~3 ms
    faster than torch's allocations do)."""
    if codec in ("packed", "packed-zstd") and kind == "binary":
        packed_size = _packed_size(numel, kind)
        data = payload if codec == "packed" else _decompress(payload, packed_size)
        if len(data) != packed_size:
            raise TaskFileError(
                f"mask payload holds {len(data)} bytes; {numel} {kind} values need {packed_size}"
            )
        packed = np.frombuffer(data, np.uint8).copy()
        if numel % 8:  # bits past the last value: zero, as pack_mask leaves them
            packed[-1] &= (1 << numel % 8) - 1
        return torch.from_numpy(packed).to(device)
    device = None if device is None else torch.device(device)
    if codec == "sparse-zstd" and kind == "binary" and device is not None and device.type != "cpu":
        return _packed_exceptions(_read_sparse(payload, numel, kind), numel, device)
    values = decode_mask(payload, codec, numel, kind)
    if kind == "binary":  # values are 0/1 already: no check or conversion to repeat
        packed = torch.from_numpy(np.packbits(values.numpy().view(np.uint8), bitorder="little"))
    else:
        packed = pack_mask(values, kind)
    return packed.to(device)


def _packed_size(numel: int, kind: MaskKind) -> int:
    """Bytes `numel` values of `kind` pack into; a bad kind or size is a TaskFileError."""
    if kind not in _BITS:
        raise TaskFileError(f"mask kind {kind!r} is not one of {sorted(_BITS)}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise TaskFileError(f"mask size {numel!r} is not a non-negative integer")
    return math.ceil(numel * _BITS[kind] / 8)


def decode_mask(payload: bytes, codec: str, numel: int, kind: MaskKind) -> torch.Tensor:
    """Inverse of `encode_mask`: a flat int8 CPU tensor; any damage is a TaskFileError."""
    packed_size = _packed_size(numel, kind)
    if codec == "packed":
        return _decode_packed(payload, packed_size, numel, kind)
    if codec == "packed-zstd":
        return _decode_packed(_decompress(payload, packed_size), packed_size, numel, kind)
    if codec == "sparse-zstd":
        return _decode_sparse(payload, numel, kind)
    raise TaskFileError(f"mask codec {codec!r} is not one of {list(CODECS)}")


def _decompress(payload: bytes, limit: int) -> bytes:
    """zstd-decompress at most `limit` bytes, so a crafted file cannot balloon."""
    try:
        size = zstandard.frame_content_size(payload)
        if size < 0 or size > limit:
            raise TaskFileError(f"mask payload declares {size} bytes; at most {limit} expected")
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise TaskFileError(f"mask payload is corrupt or truncated ({exc})") from exc


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


class _Sparse(NamedTuple):
    """A sparse payload, checked: the majority value, the gap before each exception (its
    bytes, with the long gaps by index) and, for a ternary mask, which exceptions hold
    the higher of the two other values."""

    majority: int
    short_gaps: np.ndarray  # uint8, one per exception; _ESCAPE where the gap is long
    escapes: np.ndarray  # the indices of the long gaps
    long_gaps: np.ndarray  # uint64
    above: np.ndarray | None  # bool per exception (ternary only)

    def positions(self, device: torch.device) -> torch.Tensor:
        """The exceptions' indices (int64, increasing) on `device`."""
        gaps = torch.from_numpy(self.short_gaps.copy()).to(device).to(torch.int64)
        if len(self.escapes):
            index = torch.from_numpy(self.escapes).to(device)
            gaps[index] = torch.from_numpy(self.long_gaps.astype(np.int64)).to(device)
        return torch.cumsum(gaps + 1, 0) - 1


def _read_sparse(payload: bytes, numel: int, kind: MaskKind) -> _Sparse:
    """The sparse payload's parts, every size and position checked before any use."""
    # at most numel exceptions: a gap byte, an 8-byte long gap and a sign bit each
    data = _decompress(payload, _SPARSE_HEADER.size + 9 * numel + numel // 8 + 1)
    if len(data) < _SPARSE_HEADER.size:
        raise TaskFileError("sparse mask payload is shorter than its header")
    majority, count, escaped = _SPARSE_HEADER.unpack_from(data)
    allowed = (0, 1) if kind == "binary" else (-1, 0, 1)
    if majority not in allowed or count > numel or escaped > count:
        raise TaskFileError(
            f"sparse mask header is invalid (majority {majority}, {count} exceptions with "
            f"{escaped} long gaps for {numel} values)"
        )
    gaps_end = _SPARSE_HEADER.size + count + 8 * escaped
    signs_size = math.ceil(count / 8) if kind == "ternary" else 0
    if len(data) != gaps_end + signs_size:
        raise TaskFileError(
            f"sparse mask payload holds {len(data)} bytes; its header promises "
            f"{gaps_end + signs_size}"
        )
    short_gaps = np.frombuffer(data, np.uint8, count, _SPARSE_HEADER.size)
    escapes = np.flatnonzero(short_gaps == _ESCAPE)
    if len(escapes) != escaped:
        raise TaskFileError(f"sparse mask payload has {len(escapes)} long gaps, not {escaped}")
    long_gaps = np.frombuffer(data, "<u8", escaped, _SPARSE_HEADER.size + count)
    # gaps are >= 0, so the last exception is the furthest: count + their sum - 1, summed
    # without overflow (a long gap of numel or more points past the end by itself)
    if escaped and int(long_gaps.max()) >= numel:
        raise TaskFileError(f"sparse mask payload points past the mask's {numel} values")
    shorts = int(short_gaps.sum(dtype=np.uint64)) - _ESCAPE * escaped
    # each long gap is below numel, so their uint64 sum is exact while escaped * numel is
    longs = (
        int(long_gaps.sum(dtype=np.uint64)) if escaped * numel < 2**64 else sum(map(int, long_gaps))
    )
    if count and count + shorts + longs - 1 >= numel:
        raise TaskFileError(f"sparse mask payload points past the mask's {numel} values")
    above = None
    if kind == "ternary":
        above = _decode_packed(data[gaps_end:], signs_size, count, "binary").numpy().astype(bool)
    return _Sparse(majority, short_gaps, escapes, long_gaps, above)


def _packed_exceptions(sparse: _Sparse, numel: int, device: torch.device) -> torch.Tensor:
    """A binary sparse mask straight into packed bits on `device`: the majority's bytes,
    with each exception's bit flipped (flips of one byte are distinct powers of two, so
    their sum is their OR), never a byte per weight."""
    packed = torch.full(
        (_packed_size(numel, "binary"),), 0xFF * sparse.majority, dtype=torch.uint8, device=device
    )
    if numel % 8 and sparse.majority:  # bits past the last value: zero, as pack_mask leaves them
        packed[-1] = (1 << numel % 8) - 1
    positions = sparse.positions(device)
    flips = torch.zeros(packed.shape, dtype=torch.int32, device=device)
    bits = torch.ones_like(positions, dtype=torch.int32) << (positions & 7).to(torch.int32)
    flips.index_add_(0, positions >> 3, bits)
    return packed.bitwise_xor_(flips.to(torch.uint8))


def _decode_sparse(payload: bytes, numel: int, kind: MaskKind) -> torch.Tensor:
    sparse = _read_sparse(payload, numel, kind)
    positions = sparse.positions(torch.device("cpu")).numpy()
    values = np.full(numel, sparse.majority, dtype=np.int8)
    if sparse.above is None:
        values[positions] = 1 - sparse.majority
    else:
        others = [v for v in (-1, 0, 1) if v != sparse.majority]  # sorted: [lower, higher]
        values[positions] = np.where(sparse.above, others[1], others[0])
    return torch.from_numpy(values)
