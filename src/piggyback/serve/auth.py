"""Who may call which route: bearer tokens for reads and for writes.

Writes (adding and deleting tasks) change what the server runs and what it loads at its
next start, so they are off unless an admin token guards them or the operator opened them
explicitly. Reads (predictions, the task list) are open unless a read token is set; the
admin token opens them too. ``/health`` needs nothing.
"""

from __future__ import annotations

import secrets

from starlette.requests import Request

from .config import ServeConfig
from .inputs import ApiError


def check_read(request: Request, config: ServeConfig) -> None:
    """Refuse a prediction or a task listing that lacks the read (or admin) token."""
    if config.read_token is None:
        return
    tokens = [t for t in (config.read_token, config.admin_token) if t is not None]
    _check_bearer(request, tokens, "the read token")


def check_write(request: Request, config: ServeConfig) -> None:
    """Refuse an upload or a deletion unless writes are on and the admin token is sent."""
    if config.admin_token is None:
        if config.allow_unauthenticated_writes:
            return
        raise ApiError(
            403,
            "adding and deleting tasks is off on this server: start it with --admin-token "
            "TOKEN (or PIGGYBACK_ADMIN_TOKEN) and send 'Authorization: Bearer TOKEN', or "
            "with --allow-unauthenticated-writes to let anyone do it",
        )
    _check_bearer(request, [config.admin_token], "the admin token")


def _check_bearer(request: Request, tokens: list[str], what: str) -> None:
    scheme, _, sent = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not sent.strip():
        raise ApiError(401, f"this needs {what}: 'Authorization: Bearer TOKEN'")
    sent_bytes = sent.strip().encode()
    # compare_digest with every token, so the time taken does not tell which one matched
    matches = [secrets.compare_digest(sent_bytes, token.encode()) for token in tokens]
    if not any(matches):
        raise ApiError(403, f"the token is wrong; this needs {what}")
