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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from PIL import Image

from .errors import DataError

MAX_IMAGE_PIXELS = 50_000_000  # a 48-megapixel camera's photo (8000 x 6000) fits
MAX_ASPECT = 64  # longer side : shorter side

ImageSource = str | Path | IO[bytes]


class ImageBudgetError(DataError):
    """An image refused from its header: `too_many_pixels`, else too elongated."""

    def __init__(self, message: str, *, too_many_pixels: bool) -> None:
        super().__init__(message)
        self.too_many_pixels = too_many_pixels


def open_image(source: ImageSource, what: str) -> Image.Image:
    """The decoded image at `source` (mode as stored), after its size passed the budget.

    `what` names the image in errors, e.g. ``f"image {path}"``.
    """
    with checked_image(source, what) as image:
        image.load()
        return image


def verify_image(source: ImageSource, what: str) -> None:
    """Check an image without decoding its pixels: readable header, size within the budget,
    and intact data as far as PIL's `verify` can tell (chunk checksums for PNG)."""
    with checked_image(source, what) as image:
        image.verify()


def readable_images(paths: Sequence[Path], *, strict: bool) -> tuple[list[int], list[DataError]]:
    """The indices of the paths whose images pass `verify_image`, and the errors of the
    others; with `strict` the first error is raised instead (`unreadable`)."""
    good, bad = [], []
    for index, path in enumerate(paths):
        try:
            verify_image(path, f"image {path}")
        except DataError as exc:
            if strict:
                raise unreadable(exc) from exc
            bad.append(exc)
            continue
        good.append(index)
    return good, bad


def unreadable(problem: Exception | str) -> DataError:
    """The error for an unreadable image when unreadable images were asked to stop the
    run (`--strict`, ``strict=True``): it says how to have them skipped instead."""
    return DataError(
        f"{problem}; fix or remove it, or leave out --strict to skip unreadable images "
        "with a warning"
    )


@contextmanager
def checked_image(
    source: ImageSource, what: str, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> Iterator[Image.Image]:
    """PIL's lazily opened image, its geometry checked against `max_pixels` and
    `MAX_ASPECT` before any pixel is decoded; any failure becomes one `DataError`.

    PIL's own decompression-bomb limit (a warning above 89 million pixels, an error
    above twice that) stays as PIL sets it: the budget here is lower and is checked first
    for every image PIL does not refuse on its own.
    """
    try:
        with Image.open(source) as image:
            _check_geometry(image, what, max_pixels)
            yield image
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{what} does not exist") from exc
    except Image.DecompressionBombError as exc:  # PIL's own limit, above ours
        raise ImageBudgetError(
            f"{what} is too large to decode ({exc}); at most {max_pixels:,} pixels are "
            "accepted: shrink it",
            too_many_pixels=True,
        ) from exc
    except Exception as exc:  # PIL's decoders raise many kinds on malformed data
        # PIL names a file-like source by its repr (`<_io.BytesIO object at 0x...>`): not
        # for a user's eyes, and `what` already says which image it is.
        detail = str(exc)
        if not isinstance(source, (str, Path)):
            detail = detail.replace(f" {source!r}", "")
        raise DataError(f"cannot read {what} ({type(exc).__name__}: {detail})") from exc


def _check_geometry(image: Image.Image, what: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageBudgetError(
            f"{what} is {width}x{height} = {width * height:,} pixels; at most "
            f"{max_pixels:,} are accepted: shrink it",
            too_many_pixels=True,
        )
    if max(width, height) > MAX_ASPECT * max(min(width, height), 1):
        raise ImageBudgetError(
            f"{what} is {width}x{height} pixels, more elongated than {MAX_ASPECT}:1; "
            "crop it closer to square",
            too_many_pixels=False,
        )
