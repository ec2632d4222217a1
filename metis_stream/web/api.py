"""The REST routes of DESIGN.md's interface table."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from metis_stream.backends.contract import page_is_full
from metis_stream.errors import (
    BadInput,
    JobEnded,
    MetisError,
    NoSuchRoute,
    NotFound,
    RequestTimeout,
    TooLarge,
    UnsupportedMediaType,
)
from metis_stream.events import Event, event_too_large, parse_event_json
from metis_stream.jobs import Job, JobState, state_machine
from metis_stream.service import JobService, login_code
from metis_stream.templates import param_text
from metis_stream.web import auth
from metis_stream.web.errors import JSONResponse, error_body
from metis_stream.web.mount import check_public_url, root_path
from metis_stream.web.slots import history_reads_of, slots_of
from metis_stream.web.streaming import HeldStream
from metis_stream.web.uploads import MULTIPART_TYPE, read_with_files

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
JSON_TYPE = "application/json"
MAX_SUBMIT_BYTES = 64 * 1024
SSE_KEEPALIVE = 15.0
MAX_LOGIN_BYTES = 4096
HISTORY_CHUNK = 64 * 1024
"""A history page is sent in pieces of about this many characters."""
WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")


def service_of(request: Request) -> JobService:
    service: JobService = request.app.state.service
    return service


def job_view(request: Request, job: Job, *, for_client: bool) -> dict[str, Any]:
    """The job's record as an answer: an API key holder also gets the watch token,
    ``error_detail`` and ``owner`` (the name of the key that created it); a watcher gets
    none of them. Its URLs are under the path the request came by (web/mount.py)."""
    view = job.as_dict()
    prefix = root_path(request)
    view["watch_url"] = f"{prefix}/ws/jobs/{job.id}"
    view["events_url"] = f"{prefix}/api/jobs/{job.id}/events"
    if for_client:
        view["watch_token"] = service_of(request).watch_token(job.id)
    else:
        del view["error_detail"], view["owner"]
    return view


async def body_chunks(request: Request, limit: int | None) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive, refused once it passes ``limit`` bytes."""
    length = request.headers.get("content-length")
    if (limit is not None and length is not None and length.isascii() and length.isdigit()
            and int(length) > limit):
        raise TooLarge(f"the request body may be at most {limit} bytes")
    size = 0
    async for chunk in _arriving(request):
        size += len(chunk)
        if limit is not None and size > limit:
            raise TooLarge(f"the request body may be at most {limit} bytes")
        yield chunk


async def _arriving(request: Request) -> AsyncIterator[bytes]:
    """``request.stream()``, refused with 408 once it has sent nothing for
    ``body_idle_timeout``: a stalled or malicious client must not hold a request open for
    ever. The bound is on the gap, not the whole: a job's piped output may stream for
    hours."""
    idle = service_of(request).config.server.body_idle_timeout
    async with contextlib.aclosing(request.stream()) as chunks:
        while True:
            try:
                with anyio.fail_after(idle):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeout(f"the request body sent nothing for {idle:g} s") from None
            yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in body_chunks(request, limit)])


def parse_submit_request(raw: str | bytes) -> dict[str, Any]:
    """A submit request (a POST body, or a submit socket's first frame): a JSON object."""
    if len(raw) > MAX_SUBMIT_BYTES:
        raise TooLarge(f"a submit request may be at most {MAX_SUBMIT_BYTES} bytes")
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadInput('a submit request must be a JSON object: {"template": ..., '
                       '"params": {...}}')
    return request


def whole_number(raw: str, name: str) -> int:
    """A query parameter that must be a whole number: ASCII digits only (``"²".isdigit()``
    is true, and ``int("²")`` raises)."""
    if not WHOLE_NUMBER.fullmatch(raw):
        raise BadInput(f"'{name}' must be a whole number")
    return int(raw)


def after_param(request: Request) -> int:
    """Where to resume: ``Last-Event-ID`` first, since an EventSource that reconnects sends
    it to the same URL, whose ``?after=`` is where it first started."""
    return whole_number(
        request.headers.get("last-event-id") or request.query_params.get("after") or "0",
        "after")


# Clients


async def create_job(request: Request) -> Response:
    service = service_of(request)
    key = auth.require_client(request, service.config.server)
    check_public_url(request, service.config.server)
    uploads = None
    if _content_type(request) == MULTIPART_TYPE:
        # A form a web page may post cross-site: the API key in its header is what stops it.
        raw, uploads = await read_with_files(request.headers["content-type"],
                                             body_chunks(request, None),
                                             service.config.server, MAX_SUBMIT_BYTES)
    elif _content_type(request) == JSON_TYPE:
        raw = await read_body(request, MAX_SUBMIT_BYTES)
    else:
        # Also what keeps a web page from submitting cross-site as a "simple" request.
        raise UnsupportedMediaType("send the job as application/json, or as "
                                   "multipart/form-data with input files (docs/files.md)")
    body = parse_submit_request(raw)
    job = await service.create(body.get("template"), body.get("params"), body.get("inputs"),
                               client=auth.client_identity(request, service.config.server),
                               owner=key.name, user=body.get("user"), after=body.get("after"),
                               after_any=body.get("after_any"), seen_by=key, uploads=uploads)
    return JSONResponse(job_view(request, job, for_client=True), status_code=201)


async def list_jobs(request: Request) -> Response:
    service = service_of(request)
    key = auth.require_client(request, service.config.server)
    state = request.query_params.get("state")
    if state is not None and state not in JobState.__members__.values():
        raise BadInput(f"'state' must be one of {', '.join(JobState)}")
    limit = whole_number(request.query_params.get("limit", "100"), "limit")
    if not 1 <= limit <= 1000:
        raise BadInput("'limit' must be a whole number from 1 to 1000")
    jobs = await service.jobs(seen_by=key, states=None if state is None else {JobState(state)},
                              user=request.query_params.get("user"), limit=limit)
    return JSONResponse({"jobs": [job_view(request, job, for_client=True)
                                  for job in jobs]})


async def get_job(request: Request) -> Response:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    key = auth.require_watcher(request, service.config.server, job_id)
    job = await service.get(job_id, seen_by=key)
    return JSONResponse(job_view(request, job, for_client=key is not None))


async def cancel_job(request: Request) -> Response:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    key = auth.require_client(request, service.config.server)
    job = await service.cancel(job_id, seen_by=key)
    return JSONResponse(job_view(request, job, for_client=True))


async def job_events(request: Request) -> Response:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    key = auth.require_watcher(request, service.config.server, job_id)
    after = after_param(request)
    await service.get(job_id, seen_by=key)
    server = service.config.server
    client = auth.client_identity(request, server)
    with contextlib.ExitStack() as held:
        if "text/event-stream" in request.headers.get("accept", ""):
            held.enter_context(slots_of(request).take(job_id, client))
            return HeldStream(_sse(service, job_id, after), held.pop_all(),
                              send_timeout=server.send_timeout, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        held.enter_context(history_reads_of(request).take(client))
        events = await service.history(job_id, after)
        return HeldStream(_history_page(job_id, events), held.pop_all(),
                          send_timeout=server.send_timeout, media_type=JSON_TYPE)


async def _history_page(job_id: str, events: list[Event]) -> AsyncIterator[str]:
    """One page of history as JSON, written as it is sent, never whole:
    ``{"job": ..., "events": [...], "more": ...}``; ``more`` is true when the page stopped
    at a bound, and the client then asks again with ``after=`` its last seq."""
    chunk = '{"job":' + orjson.dumps(job_id).decode() + ',"events":['
    for n, event in enumerate(events):
        if len(chunk) >= HISTORY_CHUNK:
            yield chunk
            chunk = ""
        chunk += ("," if n else "") + event.wire
    yield chunk + '],"more":' + ("true" if page_is_full(events) else "false") + "}"


async def _sse(service: JobService, job_id: str, after: int) -> AsyncIterator[str]:
    """Server-Sent Events: ``id: <seq>`` on every event, comments to keep proxies open,
    and the end of the response after the terminal event."""
    # One frame ahead of the client: each frame is a copy of its event's text, and a client
    # that stops reading must not make the server hold more of them.
    send, receive = anyio.create_memory_object_stream[str](1)

    async def pump() -> None:
        async with send:
            try:
                async for event in service.follow(job_id, after):
                    await send.send(f"id: {event.seq}\ndata: {event.wire}\n\n")
                    service.metrics.count("metis_events_delivered_total")
            except MetisError as exc:
                payload = orjson.dumps(error_body(exc)).decode()
                await send.send(f"event: error\ndata: {payload}\n\n")

    async with anyio.create_task_group() as tasks, receive:
        tasks.start_soon(pump)
        while True:
            with anyio.move_on_after(SSE_KEEPALIVE) as waited:
                try:
                    frame = await receive.receive()
                except anyio.EndOfStream:
                    return
            yield ": keep-alive\n\n" if waited.cancelled_caught else frame


async def list_templates(request: Request) -> Response:
    service = service_of(request)
    auth.require_client(request, service.config.server)
    return JSONResponse({"templates": [template.public()
                                       for template in service.config.templates.values()]})


async def list_clusters(request: Request) -> Response:
    service = service_of(request)
    auth.require_client(request, service.config.server)
    return JSONResponse({"clusters": await service.clusters()})


async def login_cluster(request: Request) -> Response:
    """An operator's one-time code for a cluster whose login node asks for a second factor
    (docs/login.md), for admin keys: the connection it opens runs every key's jobs."""
    service = service_of(request)
    auth.require_admin(request, service.config.server)
    if _content_type(request) != JSON_TYPE:
        raise UnsupportedMediaType('send {"code": "..."} as application/json')
    try:
        body = orjson.loads(await read_body(request, MAX_LOGIN_BYTES))
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadInput('a login request is a JSON object: {"code": "..."}')
    name = request.path_params["name"]
    opened = await service.login(name, login_code(body.get("code")))
    return JSONResponse({"cluster": name, "connection": "opened" if opened else "already open"})


async def failed_webhooks(request: Request) -> Response:
    """Every webhook's dead letters, for admin keys: webhooks are the operator's, and a
    letter tells of any key's job."""
    service = service_of(request)
    auth.require_admin(request, service.config.server)
    return JSONResponse({"failed": [letter.as_json()
                                    for letter in await service.failed_webhooks()]})


async def replay_webhook(request: Request) -> Response:
    service = service_of(request)
    auth.require_admin(request, service.config.server)
    letter = await service.replay_webhook(request.path_params["letter_id"])
    return JSONResponse({"replayed": letter.as_json()})


async def no_such_route(request: Request) -> Response:
    raise NoSuchRoute()


async def metrics(request: Request) -> Response:
    service = service_of(request)
    auth.require_admin(request, service.config.server)
    return PlainTextResponse(service.metrics.render(),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


async def meta(request: Request) -> Response:
    """Facts that clients must not keep copies of (the job state machine); nothing secret,
    so no key is needed."""
    return JSONResponse(state_machine())


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


# The batch job


async def post_events(request: Request) -> Response:
    service = service_of(request)
    server = service.config.server
    job_id = request.path_params["job_id"]
    element = auth.require_job_token(request, server, job_id)
    content_type = _content_type(request)
    if content_type in NDJSON_TYPES:
        # A body of announced length is read whole (and is all or nothing); one sent in
        # chunks is a stream, appended as it arrives.
        whole = "content-length" in request.headers
        result = await service.ingest_ndjson(
            job_id, body_chunks(request, server.max_request_bytes if whole else None),
            whole=whole, element=element)
    elif content_type == JSON_TYPE:
        try:
            body = await read_body(request, server.max_event_bytes)
        except TooLarge:
            raise event_too_large(server.max_event_bytes) from None
        result = await service.ingest(job_id, [parse_event_json(body)], element=element)
    else:
        raise UnsupportedMediaType("send one event as application/json or several as "
                                   "application/x-ndjson")
    return JSONResponse({"seqs": result.seqs, "duplicates": result.duplicates})


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def job_spec(request: Request) -> Response:
    job = await _job_for_its_token(request)
    return JSONResponse(service_of(request).spec(job))


async def job_spec_param(request: Request) -> Response:
    job = await _job_for_its_token(request)
    name = request.path_params["name"]
    if name not in job.params:
        raise NotFound(f"the job has no parameter {name[:64]!r}")
    return PlainTextResponse(param_text(job.params[name]))


async def job_spec_inputs(request: Request) -> Response:
    job = await _job_for_its_token(request)
    return PlainTextResponse("".join(f"{url}\n" for url in job.inputs))


async def _job_for_its_token(request: Request) -> Job:
    service = service_of(request)
    job_id = request.path_params["job_id"]
    auth.require_job_token(request, service.config.server, job_id)
    job = await service.get(job_id, seen_by=None)
    if job.state.terminal:
        raise JobEnded(job_id)
    return job
