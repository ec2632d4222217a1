"""What every route passes before its endpoint runs: the job service must be running, and a
client's request must satisfy the host application's own check, when there is one.

An app that mounts metis-stream (docs/embedding.md) may give ``create_app`` an
``authorize`` hook. It receives each client request (an ``HTTPConnection``: a ``Request``,
or a ``WebSocket`` before its handshake is accepted) and decides, before metis-stream's own
checks: ``True`` lets the request on to them (API keys and watch tokens still apply);
anything else refuses it with 403; a Starlette ``HTTPException`` (FastAPI's is one) raised
by the hook refuses it with its own status, detail and headers (401 with
``WWW-Authenticate``, say). The hook may be a plain function or a coroutine function.

A batch job's own routes (posting its events, reading its spec) are never put to the
hook: a job on a compute node holds its job token, not a session of the host's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from metis_stream.errors import MetisError, NotAllowed, NotRunning
from metis_stream.service import NOT_RUNNING, JobService
from metis_stream.web.errors import JSONResponse, deny, deny_with, error_response

Authorize = Callable[[HTTPConnection], bool | Awaitable[bool]]
"""The host's check: the request, then True to let it on (or an HTTPException)."""

HttpEndpoint = Callable[[Request], Awaitable[Response]]
SocketEndpoint = Callable[[WebSocket], Awaitable[None]]


class Gate:
    """Wraps a route's endpoint in the checks. ``client=False`` for the job's own routes."""

    def __init__(self, service: JobService, authorize: Authorize | None) -> None:
        self.service = service
        self.authorize = authorize

    async def check(self, conn: HTTPConnection, *, client: bool) -> None:
        """Raise NotRunning, NotAllowed, or the hook's HTTPException."""
        if not self.service.running:
            raise NotRunning(NOT_RUNNING)
        if client and self.authorize is not None:
            decision = self.authorize(conn)
            if inspect.isawaitable(decision):
                decision = await decision
            # Anything but True refuses: a hook that forgets to return must not let all in.
            if decision is not True:
                raise NotAllowed("refused by the host application")

    def http(self, endpoint: HttpEndpoint, *, client: bool = True) -> HttpEndpoint:
        """An HTTP endpoint behind the checks; what they raise goes to the app's handlers."""

        @functools.wraps(endpoint)
        async def gated(request: Request) -> Response:
            await self.check(request, client=client)
            return await endpoint(request)

        return gated

    def socket(self, endpoint: SocketEndpoint) -> SocketEndpoint:
        """A websocket endpoint behind the checks: a refusal denies the handshake."""

        @functools.wraps(endpoint)
        async def gated(websocket: WebSocket) -> None:
            try:
                await self.check(websocket, client=True)
            except MetisError as error:
                await deny(websocket, error)
                return
            except HTTPException as refusal:
                await deny_with(websocket, _refusal_response(refusal),
                                4000 + refusal.status_code, refusal.detail)
                return
            await endpoint(websocket)

        return gated

    def app(self, app: ASGIApp) -> ASGIApp:
        """An ASGI app (the viewer's files) behind the checks, for HTTP requests."""

        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                try:
                    await self.check(Request(scope, receive), client=True)
                except MetisError as error:
                    await error_response(error)(scope, receive, send)
                    return
                except HTTPException as refusal:
                    await _refusal_response(refusal)(scope, receive, send)
                    return
            await app(scope, receive, send)

        return gated


def _refusal_response(refusal: HTTPException) -> Response:
    return JSONResponse({"error": refusal.detail}, status_code=refusal.status_code,
                        headers=refusal.headers)
