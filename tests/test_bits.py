"""Bit packing and the task-file mask codecs: exact round trips, sizes, damage."""

from __future__ import annotations

import math
import struct

import pytest
import torch
import zstandard

from piggyback.bits import (
    CODECS,
    _encode_sparse,
    _packed_exceptions,
    _read_sparse,
    bits_per_value,
    decode_bits,
    decode_mask,
    empirical_entropy_bits,
    encode_mask,
    encodings,
    pack_mask,
    unpack_mask,
)
from piggyback.errors import ConfigError, TaskFileError


def random_mask(numel: int, density: float, kind: str, seed: int = 0) -> torch.Tensor:
    """A flat mask whose values differ from 1 with probability 1 - density."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(numel, generator=generator) < density
    if kind == "binary":
        return keep.to(torch.int8)
    other = torch.where(torch.rand(numel, generator=generator) < 0.5, -1, 0).to(torch.int8)
    return torch.where(keep, torch.ones_like(other), other)


def encode_with(codec: str, mask: torch.Tensor, kind: str) -> bytes:
    return encodings(mask, kind)[codec]


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [(k, d) for k in ("binary", "ternary") for d in (torch.float32, torch.int8, torch.bool)][
        :-1
    ],  # a bool tensor cannot hold a ternary -1
)
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 9, 1000])
@pytest.mark.parametrize("density", [0.0, 0.5, 0.97, 1.0])
def test_pack_round_trip(kind: str, numel: int, density: float, dtype: torch.dtype) -> None:
    mask = random_mask(numel, density, kind, seed=numel)
    packed = pack_mask(mask.to(dtype), kind)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(numel * bits_per_value(kind) / 8)
    assert torch.equal(unpack_mask(packed, numel, kind, dtype=torch.int8), mask)
    assert torch.equal(unpack_mask(packed, numel, kind), mask.float())
    assert torch.equal(unpack_mask(packed, numel, kind, dtype=torch.bool), mask != 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_pack_on_cuda_matches_cpu(kind: str) -> None:
    mask = random_mask(1001, 0.7, kind)
    packed = pack_mask(mask.cuda(), kind)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack_mask(mask, kind))
    assert torch.equal(unpack_mask(packed, 1001, kind, torch.int8).cpu(), mask)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("numel", [1, 7, 9, 1000])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.99, 1.0])
def test_every_codec_round_trips(kind: str, codec: str, numel: int, density: float) -> None:
    mask = random_mask(numel, density, kind, seed=numel + 1)
    decoded = decode_mask(encode_with(codec, mask, kind), codec, numel, kind)
    assert decoded.dtype == torch.int8 and torch.equal(decoded, mask)
    bits = decode_bits(encode_with(codec, mask, kind), codec, numel, kind)
    assert torch.equal(bits, pack_mask(mask, kind))  # what a loaded task keeps


def test_decoded_bits_clear_what_follows_the_last_value() -> None:
    """A packed payload's spare bits (set here by hand) are not kept."""
    payload = bytes([0xFF, 0xFF])  # 9 values: the 7 bits after the 9th are spare
    assert decode_bits(payload, "packed", 9, "binary").tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_unpack_from_any_start(kind: str) -> None:
    mask = random_mask(101, 0.5, kind)
    packed = pack_mask(mask, kind)
    for start in (0, 1, 3, 8, 9, 50, 100):
        got = unpack_mask(packed, 101 - start, kind, torch.int8, start=start)
        assert torch.equal(got, mask[start:])


def test_encode_picks_the_smallest_and_reaches_half_a_bit() -> None:
    mask = random_mask(1_000_000, 0.95, "binary")
    payload, codec = encode_mask(mask, "binary")
    sizes = {name: len(encode_with(name, mask, "binary")) for name in CODECS}
    assert len(payload) == min(sizes.values()) and sizes[codec] == len(payload)
    bits_per_weight = 8 * len(payload) / mask.numel()
    floor = empirical_entropy_bits(mask) / mask.numel()
    assert floor <= bits_per_weight < 0.5  # H(0.05) = 0.286 bits
    assert torch.equal(decode_mask(payload, codec, mask.numel(), "binary"), mask)


def test_dense_random_mask_stays_at_one_bit() -> None:
    mask = random_mask(100_000, 0.5, "binary")
    payload, codec = encode_mask(mask, "binary")
    assert codec == "packed" and len(payload) == 100_000 // 8


def test_long_gaps_are_escaped() -> None:
    mask = torch.ones(200_000, dtype=torch.int8)
    mask[[3, 254, 510, 70_000, 199_999]] = 0  # gaps of 3, 250, 255 (escaped), 69,489, ...
    payload = _encode_sparse(mask, "binary")
    assert torch.equal(decode_mask(payload, "sparse-zstd", mask.numel(), "binary"), mask)
    assert torch.equal(
        decode_bits(payload, "sparse-zstd", mask.numel(), "binary"), pack_mask(mask, "binary")
    )


@pytest.mark.parametrize("numel", [1, 13, 4099])
def test_sparse_bits_are_built_packed(numel: int) -> None:
    """Exceptions many to a byte, a last byte with spare bits, both majorities: the bits a
    GPU builds packed from the exceptions (here with the same torch ops on the CPU) equal
    the packed decoded values."""
    for mask in (random_mask(numel, 0.8, "binary", 3), 1 - random_mask(numel, 0.8, "binary", 4)):
        payload = _encode_sparse(mask, "binary")
        built = _packed_exceptions(
            _read_sparse(payload, numel, "binary"), numel, torch.device("cpu")
        )
        assert torch.equal(built, pack_mask(mask, "binary"))
        assert torch.equal(decode_bits(payload, "sparse-zstd", numel, "binary"), built)


def sparse_payload(majority: int, short_gaps: list[int], long_gaps: list[int]) -> bytes:
    """A hand-made sparse payload (a crafted file's)."""
    header = struct.pack("<bQQ", majority, len(short_gaps), len(long_gaps))
    body = bytes(short_gaps) + struct.pack(f"<{len(long_gaps)}Q", *long_gaps)
    return zstandard.ZstdCompressor().compress(header + body)


@pytest.mark.parametrize(
    ("short_gaps", "long_gaps"),
    [
        ([5, 255], [2**64 - 3]),  # wraps to an index inside the mask in uint64
        ([255, 255], [2**63, 2**63]),  # each past the end; their sum wraps to 0
        ([9, 9, 9], []),  # the last one past the end
    ],
)
def test_sparse_gaps_past_the_end_are_refused(short_gaps: list[int], long_gaps: list[int]) -> None:
    payload = sparse_payload(1, short_gaps, long_gaps)
    with pytest.raises(TaskFileError, match="points past"):
        decode_mask(payload, "sparse-zstd", 20, "binary")
    with pytest.raises(TaskFileError, match="points past"):
        _read_sparse(payload, 20, "binary")  # what a GPU's decode reads first


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", ["binary", "ternary"])
def test_bits_decode_on_cuda_as_on_cpu(codec: str, kind: str) -> None:
    mask = random_mask(70_001, 0.97, kind)
    payload = encode_with(codec, mask, kind)
    bits = decode_bits(payload, codec, mask.numel(), kind, device=torch.device("cuda"))
    assert bits.is_cuda and torch.equal(bits.cpu(), pack_mask(mask, kind))


def test_entropy_bits() -> None:
    assert empirical_entropy_bits(torch.ones(10)) == 0
    assert empirical_entropy_bits(torch.tensor([0, 1, 0, 1])) == pytest.approx(4.0)
    ternary = torch.tensor([-1, 0, 1, 1])
    assert empirical_entropy_bits(ternary) == pytest.approx(6.0)


def test_pack_rejects_values_outside_the_kind() -> None:
    with pytest.raises(ConfigError, match="binary mask may only hold"):
        pack_mask(torch.tensor([0.0, 2.0]), "binary")
    with pytest.raises(ConfigError, match="ternary"):
        pack_mask(torch.tensor([0.5, 1.0]), "ternary")
    with pytest.raises(ConfigError, match="mask kind"):
        bits_per_value("quaternary")  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", CODECS)
def test_damaged_payloads_raise_task_file_error(codec: str) -> None:
    mask = random_mask(5000, 0.9, "ternary")
    payload = encode_with(codec, mask, "ternary")
    damaged = [payload[: len(payload) // 2], payload + b"x", b"", b"\xff" * len(payload)]
    for bad in damaged:
        try:
            decoded = decode_mask(bad, codec, mask.numel(), "ternary")
        except TaskFileError:
            continue
        # an undetectable flip in raw bits still has to decode to a valid mask
        assert decoded.numel() == mask.numel() and set(decoded.unique().tolist()) <= {-1, 0, 1}


def test_bad_codec_kind_or_size() -> None:
    with pytest.raises(TaskFileError, match="codec"):
        decode_mask(b"", "zip", 0, "binary")
    with pytest.raises(TaskFileError, match="kind"):
        decode_mask(b"", "packed", 0, "quaternary")  # type: ignore[arg-type]
    with pytest.raises(TaskFileError, match="need"):
        decode_mask(b"\x00", "packed", 100, "binary")


def test_sparse_header_lies_are_caught() -> None:
    mask = random_mask(100, 0.9, "binary")
    payload = _encode_sparse(mask, "binary")
    with pytest.raises(TaskFileError):
        decode_mask(payload, "sparse-zstd", 10, "binary")  # gaps point past the end
