"""Streamed responses (Server-Sent Events, history pages) that hold what they were given,
their stream or read slots, until they end, however they end, and that drop a client that
stops reading (deadline.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from metis_stream.web.deadline import sent_in_time


class HeldStream(StreamingResponse):
    """A streamed response that closes ``held`` once it has ended, and ends when a send has
    waited ``send_timeout`` seconds on its client.

    A route takes its slots before it answers, so that a refusal is still a status code,
    and hands them over with ``ExitStack.pop_all()``: the response holds them for as long
    as the client is being sent to.
    """

    def __init__(self, content: AsyncIterable[str | bytes], held: contextlib.ExitStack, *,
                 send_timeout: float, media_type: str,
                 headers: Mapping[str, str] | None = None, status_code: int = 200) -> None:
        super().__init__(content, media_type=media_type, headers=headers,
                         status_code=status_code)
        self._held = held
        self._send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._held, anyio.CancelScope() as response:

            async def send_in_time(message: Message) -> None:
                if not await sent_in_time(scope, send(message), self._send_timeout):
                    response.cancel()  # the client is gone: stop making what it would get

            await super().__call__(scope, receive, send_in_time)
