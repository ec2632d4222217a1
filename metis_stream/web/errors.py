"""Errors as JSON ``{"error": ...}`` with the status DESIGN.md names, for HTTP and websockets."""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSONResponse
from starlette.responses import Response

from metis_stream.backends.base import (
    BackendUnavailable,
    EventLimitReached,
    JobEnded,
    JobNotFound,
    LogLost,
)
from metis_stream.events import EventTooLarge, InvalidEvent, MalformedEvent
from metis_stream.service import TooManySubmissions
from metis_stream.templates import InvalidParams

WEBSOCKET_CLOSE_OFFSET = 4000
"""A websocket closed for a client error uses 4000 + the HTTP status (4404, 4409, ...)."""
WS_TRY_AGAIN = 1013


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.details = details


def as_http_error(exc: Exception) -> HTTPError | None:
    """The HTTP error for an exception of the core, or None for a bug."""
    match exc:
        case HTTPError():
            return exc
        case JobNotFound():
            return HTTPError(404, "unknown job")
        case JobEnded():
            return HTTPError(409, "the job has already ended")
        case EventLimitReached() | EventTooLarge():
            return HTTPError(413, str(exc))
        case MalformedEvent():
            return HTTPError(400, str(exc))
        case InvalidEvent():
            return HTTPError(422, str(exc))
        case InvalidParams():
            return HTTPError(422, str(exc), problems=exc.problems)
        case LogLost():
            return HTTPError(410, str(exc))
        case TooManySubmissions():
            return HTTPError(429, str(exc), {"Retry-After": str(math.ceil(exc.retry_after))})
        case BackendUnavailable():
            return HTTPError(503, f"backend unavailable, retry: {exc}", {"Retry-After": "1"})
    return None


def error_response(error: HTTPError) -> Response:
    return JSONResponse({"error": error.message, **error.details}, status_code=error.status,
                        headers=error.headers)


async def handle_error(request: Request, exc: Exception) -> Response:
    error = as_http_error(exc)
    if error is None:
        raise exc
    request.app.state.service.metrics.count("metis_http_errors_total", status=str(error.status))
    return error_response(error)


async def handle_not_found(request: Request, exc: Exception) -> Response:
    return error_response(HTTPError(getattr(exc, "status_code", 404),
                                    getattr(exc, "detail", "not found")))
