"""The one place where errors become responses: JSON ``{"error": ...}`` with the status
that :mod:`metis_stream.errors` gives each family, for HTTP and websockets."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response
from starlette.websockets import WebSocket

from metis_stream.errors import MetisError, outcome_of

DENIAL_EXTENSION = "websocket.http.response"


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_body(error: MetisError) -> dict[str, Any]:
    return {"error": error.message, **error.details}


def error_response(error: MetisError) -> Response:
    return JSONResponse(error_body(error), status_code=outcome_of(error).status,
                        headers=error.headers)


async def handle_error(request: Request, exc: Exception) -> Response:
    """Starlette's handler for every MetisError (it finds it along the class hierarchy)."""
    assert isinstance(exc, MetisError)
    response = error_response(exc)
    request.app.state.service.metrics.count("metis_http_errors_total",
                                            status=str(response.status_code))
    return response


async def handle_starlette_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (a route that does not exist, a method it lacks)."""
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                        headers=exc.headers)


async def deny(websocket: WebSocket, error: MetisError) -> None:
    """Refuse a websocket handshake with the real HTTP status where the server supports it."""
    await deny_with(websocket, error_response(error), outcome_of(error).close_code,
                    error.message)


async def deny_with(websocket: WebSocket, response: Response, close_code: int,
                    message: str) -> None:
    """Refuse a websocket handshake with ``response`` where the server supports it, else by
    accepting it and closing with ``close_code`` and ``message``."""
    if DENIAL_EXTENSION in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(close_code, _fit_reason(message))


def close_reason(error: MetisError) -> str:
    return _fit_reason(error.message)


def _fit_reason(message: str) -> str:
    """A close frame's reason may hold at most 123 bytes of UTF-8."""
    return message.encode()[:123].decode(errors="ignore")
