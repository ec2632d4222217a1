"""The liveness rule of every stream (websockets, Server-Sent Events, history pages): each
send has a deadline, and a client that has not taken it by then is dropped.

Under uvicorn a send waits while the connection's write buffer is full, which it stays for
a client that stopped reading; and closing (uvicorn's ``transport.close()``, after a
close frame, a ping timeout, or the end of a response) waits for that buffer to drain, so
a stuck connection kept its slot, and the memory of what it was sent, for good. The ASGI
spec has no message that drops a connection without a closing handshake, so the app keeps
the transport behind the server's ``send`` and aborts it (a TCP reset) when a send passes
its deadline. Behind a server whose ``send`` has no transport (a test client, another ASGI
server, a host app that wraps ``send``) the stream still ends and frees its slot; the
connection is then the server's to close.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
from starlette.types import Scope, Send

ABORT = "metis_stream.abort"
"""The scope key of a function that drops the connection at once, or None."""


class _Transport(Protocol):
    """What deadline.py needs of a transport: asyncio's and uvloop's (which does not derive
    from asyncio.Transport) both have it."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def abort(self) -> None: ...


def find_abort(send: Send) -> Callable[[], None] | None:
    """How to abort the connection that a server's ``send`` writes to: uvicorn's ``send`` is
    a method of the connection's protocol object (HTTP and websocket alike), which holds
    its transport."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not callable(getattr(transport, "abort", None)):
        return None
    return functools.partial(_abort, transport)


def _abort(transport: _Transport) -> None:
    # A linger time of 0 makes the close a reset that discards what the kernel still holds
    # for the client, instead of a close that goes on trying to send it.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Either error: the connection is already gone (uvloop's socket of a closed
        # connection says ValueError), and abort() is then a no-op.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def sent_in_time(scope: Scope, send: Awaitable[None], timeout: float) -> bool:
    """Await one send; if the client has not taken it within ``timeout`` seconds, drop the
    connection. False when it was dropped: the caller sends nothing more."""
    with anyio.move_on_after(timeout) as waited:
        await send
    if not waited.cancelled_caught:
        return True
    abort = scope.get(ABORT)
    if abort is not None:
        abort()
    return False
