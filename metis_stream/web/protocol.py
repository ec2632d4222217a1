"""uvicorn's HTTP protocol (httptools) with the bounds that it lacks on slow clients.

uvicorn 0.54 arms one timer on a connection, ``timeout_keep_alive``, and only between
requests: a client that connects and sends nothing, or part of a request line and headers
and then nothing (or a byte now and then), keeps the connection for as long as it likes,
and with httptools every header byte it sends is kept, without a size bound. After the
app has answered before the request's body ended (a refusal), uvicorn reads and drops
the rest of the body, and each byte of it stops the keep-alive timer: a body sent a byte
at a time held the connection for ever too. This protocol gives both a deadline:

- a request's head (request line and headers) must be complete within ``header_timeout``
  of the connection being opened, or of the request's first byte on a kept-alive
  connection, and within ``MAX_HEADER_BYTES``; else the connection is closed (with a 400
  for a head too large);
- the rest of a body that the app did not wait for must come within ``header_timeout``
  of the answer.

A body the app does read is bounded by the app itself (``body_idle_timeout``, in
``web/api.py``). How many connections may be open is uvicorn's ``limit_concurrency``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

MAX_HEADER_BYTES = 32 * 1024
"""The request line and headers (h11's default is 16 KiB, nginx's 32 KiB); enough for a
browser's cookies on ``localhost``."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection; uvicorn builds it through ``functools.partial`` to pass
    ``header_timeout`` (see ``cli._uvicorn_options``)."""

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *,
                 header_timeout: float) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timeout = header_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = None
        """Bytes received of the current request's head; None when no head is coming."""
        self._late_body = False
        """The app has answered; the rest of the request's body is still coming."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head = self._head_bytes is not None
        super().data_received(data)
        if in_head and self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self.send_400_response("Request line and headers too large.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._expect_head()

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._cancel_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._late_body:
            # uvicorn's keep-alive timer was stopped by the late body: the wait for the
            # next request needs a deadline.
            self._late_body = False
            self._expect_head()

    def on_response_complete(self) -> None:
        # With requests queued behind it, the answered request's body had ended (and
        # self.cycle is already a queued one).
        answered_early = not self.pipeline and self.cycle.more_body
        super().on_response_complete()
        if answered_early and not self.transport.is_closing():
            self._late_body = True
            self._arm_deadline()

    def _expect_head(self) -> None:
        self._head_bytes = 0
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(self._header_timeout, self._expire)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
