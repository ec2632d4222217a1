"""An async Python client for a metis-stream server: submit, watch, get, list, cancel.

``watch`` is an async iterator over a job's events that resumes by itself
after a dropped connection or a server restart, from the last seq it saw, so
nothing is lost or doubled. A server that cannot be reached at all is an
error at once, for a watch as for every other call.

    async with Client("http://127.0.0.1:8000", key=...) as client:
        job = await client.submit("tokens", {"text": "Hello"})
        async for event in client.watch(job["id"]):
            print(event["type"], event["data"])
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from metis_stream.backoff import Backoff
from metis_stream.errors import ClientError

__all__ = [
    "Client",
    "post_event",
]

RETRY_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
"""Closes that mean "the server went away or is busy": reconnect and resume."""


class Client:
    def __init__(self, url: str, *, key: str | None = None, timeout: float = 30.0,
                 connect_timeout: float = 5.0, max_retry_delay: float = 5.0,
                 give_up_after: float = 120.0) -> None:
        """``connect_timeout`` bounds opening a connection (and a websocket's handshake), so
        a wrong or blackholed address fails in seconds; ``timeout`` bounds the rest."""
        self.url = url.rstrip("/")
        self.key = key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._meta: dict[str, Any] | None = None
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self._max_retry_delay = max_retry_delay
        self._give_up_after = give_up_after

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def templates(self) -> list[dict[str, Any]]:
        templates: list[dict[str, Any]] = (await self._request("GET", "/api/templates"))[
            "templates"]
        return templates

    async def submit(self, template: str, params: Mapping[str, Any] | None = None,
                     inputs: Sequence[str] = (), *, user: str | None = None,
                     files: Sequence[str | os.PathLike[str]] = ()) -> dict[str, Any]:
        """Create a job; ``user``: the end user it is for, an opaque id of your app's (1 to
        64 letters, digits, ``_`` or ``-``), which the job keeps and the cluster shows.
        ``inputs`` are download links the job fetches; ``files`` are local files uploaded
        with the submission (streamed, never read whole) into the job's ``inputs/`` folder,
        each under its own name (docs/files.md)."""
        body: dict[str, Any] = {"template": template, "params": dict(params or {}),
                                "inputs": list(inputs)}
        if user is not None:
            body["user"] = user
        if not files:
            return await self._request("POST", "/api/jobs", json=body)
        with contextlib.ExitStack() as opened:
            parts: list[tuple[str, Any]] = [("job", (None, orjson.dumps(body),
                                                     "application/json"))]
            for path in files:
                file = opened.enter_context(open(path, "rb"))  # noqa: ASYNC230 - read as sent
                parts.append(("file", (Path(path).name, file, "application/octet-stream")))
            return await self._request("POST", "/api/jobs", files=parts,
                                       timeout=httpx.Timeout(None, connect=self._connect_timeout))

    async def get(self, job_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/api/jobs/{job_id}")

    async def jobs(self, state: str | None = None, limit: int = 100, *,
                   user: str | None = None) -> list[dict[str, Any]]:
        """The jobs this client's key sees (a client key: its own), newest first; with
        ``user``, only that end user's."""
        query: dict[str, str | int] = {"limit": limit}
        if state:
            query["state"] = state
        if user is not None:
            query["user"] = user
        jobs: list[dict[str, Any]] = (await self._request("GET", "/api/jobs", params=query))[
            "jobs"]
        return jobs

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/api/jobs/{job_id}")

    async def failed_webhooks(self) -> list[dict[str, Any]]:
        """Every webhook's dead letters, oldest first (an admin key)."""
        letters: list[dict[str, Any]] = (await self._request("GET", "/api/webhooks/failed"))[
            "failed"]
        return letters

    async def replay_webhook(self, letter_id: str) -> dict[str, Any]:
        """Send a dead letter once more; the letter, once its receiver took it (an admin
        key). A receiver that still fails is ClientError 502."""
        replayed: dict[str, Any] = (await self._request(
            "POST", f"/api/webhooks/failed/{quote(letter_id, safe='')}/replay"))["replayed"]
        return replayed

    async def login(self, cluster: str, code: str) -> dict[str, Any]:
        """Log the server in to ``cluster`` with an operator's one-time code (an admin key,
        docs/login.md): ``{"cluster": ..., "connection": "opened"}``, or ``"already
        open"`` when the code was not needed. A refused code is ClientError 403."""
        return await self._request("POST", f"/api/clusters/{quote(cluster, safe='')}/login",
                                   json={"code": code})

    async def history(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        """The job's events with seq > ``after`` so far, every page of them."""
        events: list[dict[str, Any]] = []
        while True:
            page = await self._request("GET", f"/api/jobs/{job_id}/events",
                                       params={"after": events[-1]["seq"] if events else after})
            events += page["events"]
            if not page["more"]:
                return events

    async def files(self, job_id: str) -> dict[str, Any]:
        """The job's files (``GET /api/jobs/{id}/files``): ``files``, each with its
        ``path``, ``size``, ``modified``, ``output`` and ``url``; the template's
        ``outputs``; ``truncated``."""
        return await self._request("GET", f"/api/jobs/{job_id}/files")

    async def download(self, job_id: str, path: str, destination: BinaryIO, *,
                       progress: Callable[[int, int | None], None] | None = None) -> int:
        """Write the job's file ``path`` (relative to its folder) to ``destination`` as it
        arrives; the number of bytes. ``progress(done, total)`` is called after each piece
        (``total``: None when the server does not say)."""
        url = f"/api/jobs/{job_id}/files/{quote(path)}"
        try:
            async with self._http.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise ClientError(response.status_code,
                                      _error_text(await response.aread()))
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                done = 0
                async for chunk in response.aiter_bytes(1 << 16):
                    destination.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return done

    async def meta(self) -> dict[str, Any]:
        """The server's job state machine (``GET /api/meta``), asked once: the client keeps
        no copy of its own, so it stays right for the server it talks to."""
        if self._meta is None:
            self._meta = await self._request("GET", "/api/meta")
        return self._meta

    async def watch(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        """The job's events with seq > ``after`` until its terminal event.

        Once connected, the watch resumes by itself after a dropped connection or a server
        restart, for up to ``give_up_after`` seconds. If its first connection cannot reach the
        server, it raises ClientError (status 0) at once: that is a wrong address or a server
        that is not running, and waiting would only hide it."""
        machine = await self.meta()
        terminal_types = frozenset(machine["terminal_types"])
        terminal_states = frozenset(machine["terminal_states"])
        last = after
        backoff = Backoff(base=0.25, cap=self._max_retry_delay)
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        connected = False
        while True:
            try:
                async with websockets.connect(
                        f"{_ws_url(self.url)}/ws/jobs/{job_id}?after={last}",
                        additional_headers=self._headers, open_timeout=self._connect_timeout,
                        max_size=2**22) as connection:
                    connected = True
                    async for event in _events(connection):
                        failing_since = None
                        backoff.reset()
                        if event["seq"] <= last:
                            continue
                        last = event["seq"]
                        yield event
                        if event["type"] in terminal_types:
                            return
                # A clean close before a terminal event: the job may have ended at or
                # before ``last`` (a watch that started after its end), or the server left.
                job = await self.get(job_id)
                if job["state"] in terminal_states and job["last_seq"] <= last:
                    return
            except InvalidStatus as exc:
                # The server answered: a 5xx (busy, or a proxy whose server is restarting) is
                # worth another try, a 4xx is its final word.
                status = exc.response.status_code
                if status < 500:
                    raise ClientError(status, _error_text(bytes(exc.response.body or b""))
                                      ) from None
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake) as exc:
                # Before ``connected``, every one of these comes from opening the connection.
                if not connected:
                    raise self._unreachable(exc) from None
                code = exc.rcvd.code if isinstance(exc, ConnectionClosed) and exc.rcvd else 1006
                if code not in RETRY_CLOSE_CODES:
                    raise ClientError(code, f"connection closed ({code})") from None
            except ClientError as exc:
                if exc.status != 0:
                    raise
            now = loop.time()
            failing_since = failing_since or now
            if now - failing_since > self._give_up_after:
                raise ClientError(0, f"cannot reach {self.url} to watch job {job_id}")
            await asyncio.sleep(backoff.next_delay())

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if response.status_code >= 400:
            raise ClientError(response.status_code, _error_text(response.content))
        body: dict[str, Any] = response.json()
        return body

    def _unreachable(self, exc: Exception) -> ClientError:
        """Status 0, naming the URL and the reason in words rather than the exception's."""
        if isinstance(exc, TimeoutError | httpx.ConnectTimeout):
            reason = f"no answer within {self._connect_timeout:g} s"
        elif isinstance(exc, httpx.TimeoutException):
            reason = f"no answer within {self._timeout:g} s"
        else:
            reason = _connect_failure(exc)
        return ClientError(0, f"cannot reach {self.url}: {reason}")


async def _events(connection: ClientConnection) -> AsyncIterator[dict[str, Any]]:
    """The messages of one watch connection; an error message from the server raises."""
    async for frame in connection:
        message = orjson.loads(frame)
        if "error" in message and "seq" not in message:
            code = connection.close_code or 0
            raise ClientError(code - 4000 if code >= 4000 else code, message["error"])
        yield message


def _connect_failure(exc: BaseException) -> str:
    """The innermost OSError's reason: httpx wraps it twice ("All connection attempts
    failed"), and asyncio's message for it ("Connect call failed") hides the errno's."""
    root: OSError | None = None
    inner: BaseException | None = exc
    while inner is not None:
        if isinstance(inner, OSError):
            root = inner
        inner = inner.__cause__ or inner.__context__
    if isinstance(root, socket.gaierror):
        return f"unknown host ({root.strerror})"
    if root is not None and root.errno:
        return os.strerror(root.errno).lower()
    return str(exc) or type(exc).__name__


def _ws_url(url: str) -> str:
    return "ws" + url.removeprefix("http") if url.startswith("http") else url


def _error_text(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body.decode(errors="replace")[:200] or "no details"


def post_event(events_url: str, token: str, event_type: str, data: Any = None, *,
               retries: int = 5) -> dict[str, Any]:
    """Post one event as a batch job does, retrying safely: the idempotency id stays the
    same across attempts, so the server never appends it twice."""
    body = {"type": event_type, "data": data, "id": uuid.uuid4().hex}
    headers = {"Authorization": f"Bearer {token}"}
    backoff = Backoff(base=0.5, cap=10.0)
    while True:
        try:
            response = httpx.post(events_url, json=body, headers=headers, timeout=30)
        except httpx.HTTPError as exc:
            failure = ClientError(0, f"cannot reach {events_url}: {exc}")
        else:
            if response.status_code < 400:
                result: dict[str, Any] = response.json()
                return result
            failure = ClientError(response.status_code, _error_text(response.content))
            if response.status_code < 500 and response.status_code != 429:
                raise failure
        if backoff.attempt >= retries:
            raise failure
        time.sleep(backoff.next_delay())
