"""Running the server: in the foreground for the CLI, or in a thread for tests and benches.

Both run uvicorn with the app's `ServeConfig` (``app.state.config``, set by `create_app`):
its head deadline goes into the HTTP protocol (see `protocol`).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from ..errors import ConfigError
from .protocol import with_header_timeout


def uvicorn_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`: its own HTTP protocol, then `options`."""
    http = with_header_timeout(app.state.config.header_timeout_s)
    return uvicorn.Config(app, http=http, **options)


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C), as `piggyback serve` does."""
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="info"))
    server.run()
    if not server.started:
        raise ConfigError(f"the server could not listen on {host}:{port}; see the log above")


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a background thread on a free port; yields its base URL.

    The socket is bound before the thread starts, so there is no race for the port.

    Example:
        >>> with running(app) as url:  # doctest: +SKIP
        ...     httpx.get(f"{url}/health").json()["status"]
        'ok'
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the server did not start; see its log above")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
