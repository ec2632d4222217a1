"""Streamed responses (Server-Sent Events, history pages) that hold what they were given,
their stream or read slots, until they end, however they end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class HeldStream(StreamingResponse):
    """A streamed response that closes ``held`` once it has ended.

    A route takes its slots before it answers, so that a refusal is still a status code,
    and hands them over with ``ExitStack.pop_all()``: the response holds them for as long
    as the client is being sent to.
    """

    def __init__(self, content: AsyncIterable[str], held: contextlib.ExitStack, *,
                 media_type: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._held:
            await super().__call__(scope, receive, send)
