"""The websocket routes: submit-and-watch, and watch.

Every frame the server sends is one event's JSON (or one ``{"error": ...}``
frame before a close). A socket closes with 1000 after it has sent a terminal
event, with 4000 + an HTTP status for a client error (4404 unknown job, ...),
and with 1013 (try again later) when the backend is unavailable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import anyio
import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from metis_stream.errors import (
    MetisError,
    NoSuchRoute,
    RequestTimeout,
    outcome_of,
)
from metis_stream.keys import ApiKey
from metis_stream.service import JobService
from metis_stream.web import auth
from metis_stream.web.api import parse_submit_request, whole_number
from metis_stream.web.deadline import sent_in_time
from metis_stream.web.errors import close_reason, deny
from metis_stream.web.mount import check_public_url
from metis_stream.web.slots import slots_of

FIRST_FRAME_TIMEOUT = 30.0


def service_of(websocket: WebSocket) -> JobService:
    service: JobService = websocket.app.state.service
    return service


async def submit_socket(websocket: WebSocket) -> None:
    """``WS /ws/jobs``: the first frame is a submit request; then the job's events."""
    service = service_of(websocket)
    server = service.config.server
    with contextlib.ExitStack() as slot:
        try:
            auth.check_origin(websocket, server)
            key = auth.require_client(websocket, server)
            check_public_url(websocket, server)
            slot.enter_context(slots_of(websocket).take("", auth.client_identity(websocket,
                                                                                 server)))
        except MetisError as error:
            await deny(websocket, error)
            return
        await _submit_and_stream(websocket, service, key)


async def _submit_and_stream(websocket: WebSocket, service: JobService, key: ApiKey) -> None:
    await websocket.accept()
    try:
        with anyio.fail_after(FIRST_FRAME_TIMEOUT):
            message = await websocket.receive()
        request = _submit_request(message)
        job = await service.create(
            request.get("template"), request.get("params"), request.get("inputs"),
            client=auth.client_identity(websocket, service.config.server), owner=key.name,
            user=request.get("user"), after=request.get("after"),
            after_any=request.get("after_any"), seen_by=key)
    except TimeoutError:
        await _close_with_error(websocket, RequestTimeout("no submit request received"))
        return
    except WebSocketDisconnect:
        return
    except MetisError as exc:
        await _close_with_error(websocket, exc)
        return
    await _stream(websocket, service, job.id, after=0)


async def watch_socket(websocket: WebSocket) -> None:
    """``WS /ws/jobs/{id}?after=N``: history after N, then live, until the terminal event."""
    service = service_of(websocket)
    server = service.config.server
    job_id = websocket.path_params["job_id"]
    with contextlib.ExitStack() as slot:
        try:
            auth.check_origin(websocket, server)
            key = auth.require_watcher(websocket, server, job_id)
            after = whole_number(websocket.query_params.get("after", "0"), "after")
            await service.get(job_id, seen_by=key)
            slot.enter_context(slots_of(websocket).take(job_id, auth.client_identity(websocket,
                                                                                     server)))
        except MetisError as exc:
            await deny(websocket, exc)
            return
        await websocket.accept()
        await _stream(websocket, service, job_id, after=after)


def _submit_request(message: Mapping[str, Any]) -> dict[str, Any]:
    if message.get("type") == "websocket.disconnect":
        raise WebSocketDisconnect()
    raw = message.get("text") or message.get("bytes") or b""
    assert isinstance(raw, str | bytes)
    return parse_submit_request(raw)


async def _stream(websocket: WebSocket, service: JobService, job_id: str, after: int) -> None:
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_cancel_on_disconnect, websocket, tasks.cancel_scope)
        await _send_events(websocket, service, job_id, after)
        tasks.cancel_scope.cancel()


async def _send_events(websocket: WebSocket, service: JobService, job_id: str, after: int
                       ) -> None:
    """The job's events, then a close; each send within ``send_timeout`` or the client is
    dropped (deadline.py)."""
    timeout = service.config.server.send_timeout
    try:
        async for event in service.follow(job_id, after):
            if not await sent_in_time(websocket.scope, websocket.send_text(event.wire), timeout):
                return
            service.metrics.count("metis_events_delivered_total")
    except (WebSocketDisconnect, OSError):
        return  # the client left; nothing to tell it
    except MetisError as exc:
        await _close_with_error(websocket, exc)
        return
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        # The client may have left after the last event.
        await sent_in_time(websocket.scope, websocket.close(1000), timeout)


async def _cancel_on_disconnect(websocket: WebSocket, scope: anyio.CancelScope) -> None:
    """Watchers send nothing after their first frame; a receive only ever sees the close."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    scope.cancel()


async def _close_with_error(websocket: WebSocket, error: MetisError) -> None:
    timeout = service_of(websocket).config.server.send_timeout
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        message = orjson.dumps({"error": error.message}).decode()
        if await sent_in_time(websocket.scope, websocket.send_text(message), timeout):
            await sent_in_time(websocket.scope,
                               websocket.close(outcome_of(error).close_code, close_reason(error)),
                               timeout)


async def no_such_route(websocket: WebSocket) -> None:
    await deny(websocket, NoSuchRoute())
