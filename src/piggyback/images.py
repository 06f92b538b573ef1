"""Opening image files with a deliberate budget: the one place that decides how large an
image piggyback agrees to decode.

A few hundred bytes of PNG can declare 20,000 x 20,000 pixels (1.2 GB decoded), and a
1 x 100,000 strip resizes to gigabytes at the backbone's size. Both are refused from the
header, before any pixel is decoded, with a `DataError` that names the image.

Example:
    >>> import io
    >>> from PIL import Image
    >>> encoded = io.BytesIO()
    >>> Image.new("RGB", (32, 24)).save(encoded, "PNG")
    >>> open_image(encoded, "image photo.png").size
    (32, 24)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import Image

from .errors import DataError

MAX_IMAGE_PIXELS = 50_000_000  # a 48-megapixel camera's photo (8000 x 6000) fits
MAX_ASPECT = 64  # longer side : shorter side

ImageSource = str | Path | IO[bytes]


def open_image(source: ImageSource, what: str) -> Image.Image:
    """The decoded image at `source` (mode as stored), after its size passed the budget.

    `what` names the image in errors, e.g. ``f"image {path}"``.
    """
    with _opened(source, what) as image:
        image.load()
        return image


def verify_image(source: ImageSource, what: str) -> None:
    """Check an image without decoding its pixels: readable header, size within the budget,
    and intact data as far as PIL's `verify` can tell (chunk checksums for PNG)."""
    with _opened(source, what) as image:
        image.verify()


@contextmanager
def _opened(source: ImageSource, what: str) -> Iterator[Image.Image]:
    """PIL's image with its geometry checked; any failure becomes one `DataError`."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own, higher limit; ours is checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)
        with opened as image:
            _check_geometry(image, what)
            yield image
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{what} does not exist") from exc
    except Image.DecompressionBombError as exc:  # PIL's own limit, above ours
        raise DataError(
            f"{what} is too large to decode ({exc}); at most {MAX_IMAGE_PIXELS:,} pixels "
            "are accepted (piggyback.images.MAX_IMAGE_PIXELS): shrink it"
        ) from exc
    except Exception as exc:  # PIL's decoders raise many kinds on malformed data
        raise DataError(f"cannot read {what} ({type(exc).__name__}: {exc})") from exc


def _check_geometry(image: Image.Image, what: str) -> None:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{what} is {width}x{height} = {width * height:,} pixels; at most "
            f"{MAX_IMAGE_PIXELS:,} are accepted (piggyback.images.MAX_IMAGE_PIXELS): shrink it"
        )
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        raise DataError(
            f"{what} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1; "
            "crop it closer to square (piggyback.images.MAX_ASPECT)"
        )
