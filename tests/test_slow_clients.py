"""Slow and half-open clients against a real server, with raw sockets: a request whose head
never ends, or whose body stops, is closed within its bound (metis_stream/web/protocol.py,
``body_chunks`` in metis_stream/web/api.py); past ``max_connections`` a request is
refused with 503 at once, and served again once the half-open connections are reaped.
``metis-emit pipe`` rides out the server's body idle timeout.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.server import LOCAL_CLUSTER, RunningJob, ServerProcess
from tests.test_web import EMIT, custom_templates
from tests.test_web_errors import job  # noqa: F401 - a running job of `server`

HEADER_TIMEOUT = 1.0
BODY_IDLE_TIMEOUT = 1.0
SLACK = 2.0
"""How much later than its bound a close may come on a busy test machine."""
SETTINGS = {"header_timeout": HEADER_TIMEOUT, "body_idle_timeout": BODY_IDLE_TIMEOUT}


def start(folder: Path, **settings: object) -> ServerProcess:
    process = ServerProcess(state_dir=folder / "server", server_settings=settings,
                            extra_config=LOCAL_CLUSTER + custom_templates(folder / "scripts"))
    process.start()
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start(tmp_path_factory.mktemp("slow"), **SETTINGS)
    try:
        yield process
    finally:
        process.stop()


def connect(server: ServerProcess) -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", server.port))
    raw.settimeout(30)
    return raw


def read_until_closed(raw: socket.socket) -> tuple[bytes, float]:
    """All the server sends until it closes the connection, and when it closed it."""
    received = b""
    while chunk := raw.recv(65536):
        received += chunk
    return received, time.monotonic()


def head(server: ServerProcess, method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# Request heads


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"])
def test_a_head_that_never_ends_is_closed_within_the_header_timeout(server: ServerProcess,
                                                                     sent: bytes):
    with connect(server) as raw:
        started = time.monotonic()
        raw.sendall(sent)
        received, closed = read_until_closed(raw)
    assert received == b""
    assert closed - started < HEADER_TIMEOUT + SLACK


def test_a_head_sent_a_byte_at_a_time_is_closed_within_the_header_timeout(
        server: ServerProcess):
    with connect(server) as raw:
        started = time.monotonic()
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"x" * 100:
                raw.send(bytes([byte]))
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received, closed = read_until_closed(raw)
    assert received == b""
    assert closed - started < HEADER_TIMEOUT + SLACK


def test_a_head_past_the_size_bound_is_refused(server: ServerProcess):
    """With a 400, unless the server's close resets the connection before the client
    reads it (the client is still sending)."""
    with connect(server) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        received: bytes | None
        try:
            for _ in range(64):
                raw.sendall(b"X-Padding: " + b"x" * 1000 + b"\r\n")
            received, _ = read_until_closed(raw)
        except (BrokenPipeError, ConnectionResetError):
            received = None
    assert received is None or received.startswith(b"HTTP/1.1 400 "), received[:200]
    assert time.monotonic() - started < HEADER_TIMEOUT, "refused for its size, not its time"


def test_a_kept_alive_connection_is_served_again_within_the_bound(server: ServerProcess):
    with connect(server) as raw:
        for _ in range(2):
            raw.sendall(head(server, "GET", "/healthz"))
            answer = b""
            while not answer.endswith(b'{"ok":true}'):
                answer += raw.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 ")
        raw.sendall(b"GET /healthz HTTP/1.1\r\n")  # a third request, never finished
        started = time.monotonic()
        received, closed = read_until_closed(raw)
    assert received == b""
    assert closed - started < HEADER_TIMEOUT + SLACK


# Request bodies


def test_a_streamed_body_that_stops_gets_408_within_the_idle_timeout(
        server: ServerProcess, job: RunningJob):  # noqa: F811
    line = b'{"type": "log", "data": "before the pause"}\n'
    with connect(server) as raw:
        raw.sendall(head(server, "POST", f"/api/jobs/{job.id}/events",
                         "Content-Type: application/x-ndjson", "Transfer-Encoding: chunked",
                         f"Authorization: Bearer {job.token}"))
        raw.sendall(b"%x\r\n%s\r\n" % (len(line), line))
        started = time.monotonic()
        received, closed = read_until_closed(raw)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in received.lower()
    assert BODY_IDLE_TIMEOUT <= closed - started < BODY_IDLE_TIMEOUT + SLACK
    assert "before the pause" in [event["data"] for event in job.events()]


def test_a_body_of_announced_length_that_stops_gets_408(server: ServerProcess):
    with connect(server) as raw:
        raw.sendall(head(server, "POST", "/api/jobs", "Content-Type: application/json",
                         "Content-Length: 100") + b'{"template": ')
        started = time.monotonic()
        received, closed = read_until_closed(raw)
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert closed - started < BODY_IDLE_TIMEOUT + SLACK


def test_a_body_sent_after_a_refusal_cannot_hold_the_connection(
        server: ServerProcess, job: RunningJob):  # noqa: F811
    """The server answers 401 before reading the body; uvicorn reads and drops what
    follows, and without a bound a byte now and then kept the connection for ever."""
    with connect(server) as raw:
        raw.sendall(head(server, "POST", f"/api/jobs/{job.id}/events",
                         "Content-Type: application/x-ndjson", "Transfer-Encoding: chunked",
                         "Authorization: Bearer wrong"))
        assert raw.recv(65536).startswith(b"HTTP/1.1 401 ")
        started = time.monotonic()
        closed_after = None
        try:
            while time.monotonic() - started < HEADER_TIMEOUT + 2 * SLACK:
                raw.sendall(b"1\r\nx\r\n")
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
    assert closed_after is not None, "the connection was still open"
    assert closed_after < HEADER_TIMEOUT + SLACK


def test_a_body_that_keeps_coming_is_not_cut(
        server: ServerProcess, job: RunningJob):  # noqa: F811
    """Slower in all than both timeouts, but never silent for as long as either."""
    lines = [b'{"type": "log", "data": %d}\n' % n for n in range(6)]
    with connect(server) as raw:
        raw.sendall(head(server, "POST", f"/api/jobs/{job.id}/events",
                         "Content-Type: application/x-ndjson", "Transfer-Encoding: chunked",
                         f"Authorization: Bearer {job.token}"))
        for line in lines:
            raw.sendall(b"%x\r\n%s\r\n" % (len(line), line))
            time.sleep(0.5)
        raw.sendall(b"0\r\n\r\n")
        assert raw.recv(65536).startswith(b"HTTP/1.1 200 ")


async def test_a_websocket_outlives_the_header_timeout(
        server: ServerProcess, job: RunningJob):  # noqa: F811
    async with websockets.connect(job.watch_url()) as watching:
        await asyncio.sleep(HEADER_TIMEOUT + 1)
        assert job.post_event({"type": "log", "data": "still here"}).status_code == 200
        while json.loads(await watching.recv())["data"] != "still here":
            pass


# Connections


def test_half_open_connections_past_max_connections_get_503_until_they_are_reaped(
        tmp_path: Path):
    process = start(tmp_path, max_connections=20, header_timeout=3.0)
    try:
        half_open = [connect(process) for _ in range(25)]
        try:
            for raw in half_open:
                raw.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.3)
            started = time.monotonic()
            refused = httpx.get(f"{process.url}/healthz", timeout=10)
            assert refused.status_code == 503
            assert time.monotonic() - started < 1, "refused at once, not queued"
            for raw in half_open:
                assert read_until_closed(raw)[0] == b""
        finally:
            for raw in half_open:
                raw.close()
        assert httpx.get(f"{process.url}/healthz", timeout=10).status_code == 200
    finally:
        process.stop()


# metis-emit


def test_metis_emit_pipe_rides_out_the_body_idle_timeout(
        server: ServerProcess, job: RunningJob):  # noqa: F811
    """A program that is silent for longer than ``body_idle_timeout``: the server ends
    the stream with 408, metis-emit sends the next line again on a new one."""
    token_file = server.state_dir / f"token-{job.id}"
    token_file.write_text(job.token)
    env = {"METIS_EVENTS_URL": job.url, "METIS_TOKEN_FILE": str(token_file),
           "PATH": "/usr/bin:/bin"}
    with subprocess.Popen([str(EMIT), "pipe", "log"], stdin=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env) as pipe:
        assert pipe.stdin is not None and pipe.stderr is not None
        pipe.stdin.write(b"before the silence\n")
        pipe.stdin.flush()
        time.sleep(BODY_IDLE_TIMEOUT + 1.5)
        pipe.stdin.write(b"after the silence\n")
        pipe.stdin.close()
        assert pipe.wait(30) == 0, pipe.stderr.read()
    logged = [event["data"] for event in job.events() if event["type"] == "log"]
    assert logged == ["before the silence", "after the silence"]
