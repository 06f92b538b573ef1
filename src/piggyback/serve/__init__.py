"""`piggyback serve`: every task of a folder over HTTP, on one backbone, batched.

`create_app` builds the FastAPI app (routes in `app`), `TaskRegistry` holds the tasks and
the cache of baked ones, `Batcher` gathers concurrent requests into mixed-task batches,
and `runner` starts uvicorn. Needs the `fastapi`, `uvicorn` and `python-multipart`
packages; names are imported when first used, so that `piggyback.serve.config` (read by
`piggyback serve --help`) loads without them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOMES = {
    "create_app": "app",
    "build_model": "backbone",
    "Batcher": "batcher",
    "Job": "batcher",
    "ServeConfig": "config",
    "BakedCache": "registry",
    "TaskExistsError": "registry",
    "TaskRegistry": "registry",
    "run": "runner",
    "running": "runner",
    "startup_lines": "app",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
