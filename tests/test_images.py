"""The image budget: what is refused from the header, before any pixel is decoded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import HUGE_TEXT_CHUNK, png_header
from PIL import Image

from piggyback.errors import DataError
from piggyback.images import MAX_ASPECT, MAX_IMAGE_PIXELS, open_image, verify_image
from piggyback.pipeline import read_image


@pytest.mark.parametrize(
    ("encoded", "words"),
    [
        pytest.param(
            png_header(20_000, 20_000), "400000000 pixels", id="bomb"
        ),  # past PIL's own limit
        pytest.param(
            png_header(10_000, 6_000),
            "10000x6000 = 60,000,000 pixels; at most 50,000,000",
            id="over-budget",
        ),
        pytest.param(
            png_header(100_000, 1),
            f"100000x1 pixels, more elongated than {MAX_ASPECT}:1",
            id="strip",
        ),
        pytest.param(png_header(4, 4, HUGE_TEXT_CHUNK), "Decompressed data too large", id="text"),
        pytest.param(b"not an image", "cannot read image x.png", id="garbage"),
    ],
)
@pytest.mark.parametrize("check", [open_image, verify_image])
def test_refused_with_the_image_named(encoded: bytes, words: str, check: object) -> None:
    with pytest.raises(DataError, match=r"x\.png") as info:
        check(io.BytesIO(encoded), "image x.png")  # type: ignore[operator]
    assert words in str(info.value)


def test_the_budget_is_above_a_large_photo() -> None:
    assert MAX_IMAGE_PIXELS >= 8000 * 6000
    encoded = io.BytesIO()
    Image.new("L", (MAX_ASPECT * 2, 2)).save(encoded, "PNG")
    image = open_image(encoded, "image strip.png")
    assert (image.size, image.mode) == ((MAX_ASPECT * 2, 2), "L")


def test_read_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(20_000, 20_000))
    with pytest.raises(DataError, match=f"image {path} is too large"):
        read_image(path)
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "missing.png")
    Image.new("L", (3, 2)).save(tmp_path / "grey.png")
    assert read_image(tmp_path / "grey.png").mode == "RGB"
