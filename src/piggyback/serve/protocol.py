"""uvicorn's HTTP/1.1 protocol with a deadline for each request head.

uvicorn closes a keep-alive connection that stays idle, but not one whose client sends its
request head slowly, or sends a few bytes of it and stops: each such client holds a file
descriptor for as long as it likes, and a few hundred of them lock everyone else out
(slowloris). This protocol closes a connection whose request head has not fully arrived
within `header_timeout_s` of the connection opening or of the previous response. The
body has its own deadline, in `inputs.read_body`. The server therefore always runs the
h11 protocol (never httptools); this class relies on its `cycle` (one per request head)
and `on_response_complete`, as in uvicorn 0.29 to 0.54.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutProtocol(H11Protocol):
    """`H11Protocol` that waits at most `header_timeout_s` for each request head."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request head arrived: a new request cycle began
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined head
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.logger.info(
                "closing %s: no request head within %gs", self.client, self.header_timeout_s
            )
            self.transport.close()


def with_header_timeout(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol class to pass to uvicorn as ``http=``, with its head deadline set."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"header_timeout_s": seconds})
