"""`piggyback serve`: every task of a folder over HTTP, on one backbone, batched.

`create_app` builds the FastAPI app (routes in `app`), `TaskRegistry` holds the tasks and
the cache of baked ones, `Batcher` gathers concurrent requests into mixed-task batches,
and `runner` starts uvicorn. Needs the `fastapi`, `uvicorn` and `python-multipart`
packages.
"""

from .app import create_app
from .backbone import build_model
from .batcher import Batcher, Job
from .config import ServeConfig
from .registry import BakedCache, TaskExistsError, TaskRegistry
from .runner import run, running

__all__ = [
    "BakedCache",
    "Batcher",
    "Job",
    "ServeConfig",
    "TaskExistsError",
    "TaskRegistry",
    "build_model",
    "create_app",
    "run",
    "running",
]
