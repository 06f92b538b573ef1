"""The HTTP routes: health, the task list, predictions, and adding or deleting tasks.

Routes stay thin: `auth` decides who may call them, `inputs` turns requests into images
and files, the `Batcher` gathers concurrent predictions into batches, and the
`TaskRegistry` runs them on one model. Every error a client can cause becomes a JSON
``{"error": message}`` with a 4xx status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..backbones import InputSpec
from ..errors import PiggybackError, TaskFileError, UnknownTaskError
from ..model import PiggybackModel
from ..pipeline import rank
from .auth import check_read, check_write
from .batcher import Batcher, Job, ShuttingDownError
from .config import ServeConfig
from .inputs import ApiError, parse_predict, parse_task_upload, read_body, to_batch
from .registry import TaskEntry, TaskExistsError, TaskRegistry

# Library errors a request can cause, by HTTP status; any other (a bad task name...) is 400.
_STATUS: dict[type[Exception], int] = {
    UnknownTaskError: 404,
    TaskExistsError: 409,
    TaskFileError: 400,
    ShuttingDownError: 503,
}


def create_app(
    model: PiggybackModel,
    spec: InputSpec,
    tasks_dir: str | Path,
    config: ServeConfig | None = None,
    *,
    size: int | None = None,
) -> FastAPI:
    """A server for every task file in `tasks_dir`, loaded onto `model` (holding no task).

    `spec` is the backbone's input; `size` overrides the size each task records. Files
    that do not load are skipped, and listed by ``/health`` and ``/tasks``.

    Example:
        >>> model, spec = build_model("tasks/")  # doctest: +SKIP
        >>> run(create_app(model, spec, "tasks/"))  # doctest: +SKIP
    """
    config = config or ServeConfig()
    registry = TaskRegistry(
        model,
        spec,
        tasks_dir,
        size=size,
        cache_size=config.cache_size,
        images_per_thread=config.images_per_thread,
        max_input_size=config.max_input_size,
        amp=config.amp,
    )
    batcher = Batcher(
        registry.infer, window_s=config.batch_window_ms / 1000, max_batch=config.max_batch
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="piggyback", lifespan=lifespan)
    app.state.registry = registry
    app.state.batcher = batcher
    app.state.config = config
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "tasks": len(registry.names),
            "skipped": _skipped(registry),
            "cached": registry.cache.tasks,
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.get("/tasks")
    async def list_tasks(request: Request) -> dict[str, Any]:
        check_read(request, config)
        return {
            "tasks": [entry.to_dict() for entry in registry.entries()],
            "skipped": _skipped(registry),
        }

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, Any]:
        check_read(request, config)
        body = await read_body(request, config.max_upload_bytes, config.body_timeout_s)
        query = await parse_predict(request, body, config.max_batch, infer_task=config.infer_task)
        if query.task is None:
            found = await run_in_threadpool(
                registry.infer_tasks,
                query.images,
                config.infer_rule,
                config.infer_threshold,
                config.max_request_pixels,
            )
            return {"task": None, "predictions": [_inferred(row, query.topk) for row in found]}
        entry = registry.entry(query.task)
        images = await run_in_threadpool(
            to_batch, query.images, entry.spec, config.max_request_pixels
        )
        logits = await batcher.submit(Job(entry.name, images))
        return {
            "task": entry.name,
            "predictions": [rank(row, entry.class_names, query.topk).to_dict() for row in logits],
        }

    @app.post("/tasks", status_code=201)
    async def add_task(request: Request) -> dict[str, Any]:
        check_write(request, config)
        body = await read_body(request, config.max_upload_bytes, config.body_timeout_s)
        data = await parse_task_upload(request, body)
        entry = await run_in_threadpool(registry.add, data)
        return entry.to_dict()

    @app.delete("/tasks/{name}")
    async def delete_task(name: str, request: Request) -> dict[str, Any]:
        check_write(request, config)
        await run_in_threadpool(registry.remove, name)
        return {"deleted": name}

    return app


def _inferred(
    row: tuple[TaskEntry | None, float, torch.Tensor | None], topk: int
) -> dict[str, Any]:
    """One image's answer when its task was inferred: the task and its score, and the
    ranked classes (none when no task was found)."""
    entry, score, logits = row
    if entry is None or logits is None:
        return {"task": None, "score": round(score, 6)}
    ranked = rank(logits, entry.class_names, topk).to_dict()
    return {"task": entry.name, "score": round(score, 6), **ranked}


def startup_lines(app: FastAPI, device: object) -> list[str]:
    """What `piggyback serve` prints as it starts: the backbone it chose, the tasks it
    serves, each file it skipped and why, and who may do what."""
    registry, model = app.state.registry, app.state.registry.model
    names = ", ".join(registry.names) or "none yet"
    lines = [
        f"backbone {type(model.base).__name__} (fingerprint {model.fingerprint[:16]}) on "
        f"{device}{f' under {registry.amp} autocast' if registry.amp else ''}; "
        f"{len(registry.names)} task(s): {names}"
    ]
    lines += [
        f"warning: skipped {name}: {' '.join(reason.split())}"
        for name, reason in registry.skipped.items()
    ]
    return [*lines, app.state.config.access]


def _skipped(registry: TaskRegistry) -> list[dict[str, str]]:
    """The task files in the folder that are not served, and why."""
    return [{"file": name, "reason": reason} for name, reason in registry.skipped.items()]


def _add_error_handlers(app: FastAPI) -> None:
    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.close:
            headers["Connection"] = "close"
        return error(exc.status, exc.message, headers)

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), exc.headers)

    async def library_error(_: Request, exc: PiggybackError) -> JSONResponse:
        status = next((s for t, s in _STATUS.items() if isinstance(exc, t)), 400)
        return error(status, str(exc))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(PiggybackError, library_error)
