"""From HTTP requests to images and task files, and every way a request can be wrong.

Each bad request becomes an `ApiError` with the 4xx status and a message that says what
to send instead: the server answers it and goes on serving. Work is bounded before it is
done: the body's bytes and arrival time, each image's and the request's pixels (from the
image headers, before decoding).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from ..backbones import InputSpec
from ..data import image_transform
from ..errors import DataError
from ..images import ImageBudgetError, checked_image

MULTIPART = "multipart/form-data"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
DEFAULT_TOPK = 5  # as `piggyback.pipeline.predict`
MAX_PIXELS = 25_000_000  # of one image: a 5000 x 5000 photo (the library's limit is 50M)


class ApiError(Exception):
    """A client error: an HTTP status and what is wrong with the request.

    `close` ends the connection after the answer: for a body left unread, whose rest the
    client may still be sending.
    """

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclass(frozen=True)
class PredictRequest:
    """A request to `POST /predict`: one task (None: infer each image's), encoded images,
    how many labels each."""

    task: str | None
    images: list[bytes]
    topk: int


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body; 413 as soon as it is known to exceed `limit` bytes, 408 if it has
    not all arrived within `timeout_s` (a client trickling bytes holds a connection)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    try:
        return await asyncio.wait_for(_read_stream(request, limit), timeout_s)
    except asyncio.TimeoutError as exc:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", close=True
        ) from exc


async def _read_stream(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no length
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_predict(
    request: Request, body: bytes, max_images: int, *, infer_task: bool = False
) -> PredictRequest:
    """A multipart form (`task`, `topk`, files `images`) or JSON (base64 `images`); with
    `infer_task`, `task` may be left out."""
    kind = _media_type(request)
    if kind == MULTIPART:
        form = await _form(request, body)
        try:
            files = form.getlist("images")
            if not all(isinstance(f, UploadFile) for f in files):
                raise ApiError(422, "'images' must be file parts of the multipart form")
            images = [await f.read() for f in files if isinstance(f, UploadFile)]
            task, topk = form.get("task"), form.get("topk", DEFAULT_TOPK)
        finally:
            await form.close()
        return _checked(task, images, _integer(topk), max_images, infer_task)
    if kind == JSON:
        payload = _json(body)
        encoded = payload.get("images")
        if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
            raise ApiError(422, "'images' must be a list of base64 strings")
        images = [_base64(text, index) for index, text in enumerate(encoded)]
        topk = payload.get("topk", DEFAULT_TOPK)
        return _checked(payload.get("task"), images, topk, max_images, infer_task)
    raise _unsupported(kind, (MULTIPART, JSON))


async def parse_task_upload(request: Request, body: bytes) -> bytes:
    """A task file as a multipart file part named `file`, or as the raw body."""
    kind = _media_type(request)
    if kind == OCTET_STREAM:
        return body
    if kind == MULTIPART:
        form = await _form(request, body)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ApiError(422, "send the task file as a multipart file part named 'file'")
            return await upload.read()
        finally:
            await form.close()
    raise _unsupported(kind, (MULTIPART, OCTET_STREAM))


def decode_image(data: bytes, what: str) -> Image.Image:
    """An RGB image from encoded bytes (PNG, JPEG, ... whatever PIL reads)."""
    with _opened(data, what) as image:
        return image.convert("RGB")


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """Width and height from the image's header, without decoding its pixels."""
    with _opened(data, what) as image:
        return image.size


@contextmanager
def _opened(data: bytes, what: str) -> Iterator[Image.Image]:
    """An image opened lazily and checked from its header (`piggyback.images`, with the
    server's own pixel limit): too many pixels is a 413, too elongated a 422, anything
    else a 400."""
    try:
        with checked_image(io.BytesIO(data), what, max_pixels=MAX_PIXELS) as image:
            yield image
    except ImageBudgetError as exc:
        raise ApiError(413 if exc.too_many_pixels else 422, str(exc)) from exc
    except DataError as exc:
        raise ApiError(400, str(exc)) from exc


def to_batch(images: Sequence[bytes], spec: InputSpec, max_pixels: int) -> torch.Tensor:
    """Decode and preprocess as `piggyback.pipeline.predict` does: ``[n, 3, size, size]``.

    The images together may hold at most `max_pixels`, read from their headers first.
    """
    sizes = [image_size(data, f"image {i}") for i, data in enumerate(images)]
    pixels = sum(width * height for width, height in sizes)
    if pixels > max_pixels:
        raise ApiError(
            413, f"the request's images hold {pixels:,} pixels together; at most {max_pixels:,}"
        )
    transform = image_transform(spec)
    return torch.stack(
        [transform(decode_image(data, f"image {i}")) for i, data in enumerate(images)]
    )


async def _form(request: Request, body: bytes) -> FormData:
    """Parse a multipart body already read (and size-checked) by `read_body`."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form()


def _integer(text: Any) -> Any:
    """A form field as an int when it spells one; else as sent, for `_checked` to refuse."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return text


def _json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 5,000 digits
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "the JSON body is nested too deeply") from exc
    if not isinstance(payload, dict):
        raise ApiError(422, f"the JSON body must be an object, got {type(payload).__name__}")
    return payload


def _base64(text: str, index: int) -> bytes:
    """Decode one image; a data URL's ``data:image/png;base64,`` prefix is allowed."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"image {index} is not valid base64: {exc}") from exc


def _checked(
    task: Any, images: list[bytes], topk: Any, max_images: int, infer_task: bool
) -> PredictRequest:
    if task is None and infer_task:
        pass  # each image's task is inferred
    elif not isinstance(task, str) or not task:
        hint = "" if infer_task else " (this server infers none: it runs without --infer-task)"
        raise ApiError(422, f"name the task: a non-empty 'task' field{hint}")
    if not images:
        raise ApiError(422, "send at least one image in 'images'")
    if len(images) > max_images:
        raise ApiError(413, f"{len(images)} images in one request; at most {max_images}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ApiError(422, f"'topk' must be an integer >= 1, got {topk!r}")
    return PredictRequest(task, images, topk)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413, f"the request body exceeds the limit of {limit:,} bytes ({size:,} seen)", close=True
    )


def _unsupported(kind: str, allowed: tuple[str, ...]) -> ApiError:
    return ApiError(415, f"content type {kind or 'none'!r} is not accepted; send {allowed}")
