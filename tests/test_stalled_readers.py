"""Clients that stop reading, against a real server: websockets that do the handshake and
never read again, and Server-Sent Events readers that never read, each with a tiny receive
buffer, on a job whose history is far larger than the socket buffers.

Every send has a deadline (``send_timeout``): past it the server aborts the connection and
frees its slot, so a real viewer gets in. And one client (one watch token) may hold only
``max_streams_per_client`` of a job's ``max_sockets_per_job`` slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    script_templates,
)
from tests.support.stalled import frozen_websocket, stalled_get

KEY = "slow-clients-test-key"
SEND_TIMEOUT = 2.0
PER_JOB = 4
PER_CLIENT = 2
PAYLOAD = "x" * 60_000
HISTORY = 150
"""Events of PAYLOAD in the job's history: 9 MB, more than a stalled socket's buffers take."""
IDLE = '"$METIS_EMIT" step idle\nwhile [ -f "$METIS_TOKEN_FILE" ]; do sleep 0.1; done\n'


def make_server(folder: Path, **settings: object) -> ServerProcess:
    return ServerProcess(
        state_dir=folder / "server",
        server_settings={"api_keys": [KEY], "send_timeout": SEND_TIMEOUT,
                         "max_sockets_per_job": PER_JOB, "max_streams_per_client": PER_CLIENT,
                         **settings},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES
        + script_templates(folder / "scripts", {"idle": IDLE}))


def big_job(server: ServerProcess) -> RunningJob:
    job = RunningJob(server, "idle", key=KEY)
    line = json.dumps({"type": "token", "data": PAYLOAD}) + "\n"
    for _ in range(0, HISTORY, 15):
        answer = job.post(line * 15, "application/x-ndjson")
        assert answer.status_code == 200, answer.text[:300]
    return job


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = make_server(tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def watch_path(job: RunningJob, token: str) -> str:
    return f"/ws/jobs/{job.id}?token={token}"


def events_path(job: RunningJob, token: str) -> str:
    return f"/api/jobs/{job.id}/events?token={token}"


SSE = {"Accept": "text/event-stream"}


async def viewer_status(server: ServerProcess, job: RunningJob) -> int:
    """What a real viewer with the API key gets: 101 and the history's first event, or
    the status of the refusal."""
    try:
        # No flow control (max_queue): it reads on while closing, or its close would wait
        # behind the history it did not read.
        async with websockets.connect(f"{server.ws_url}/ws/jobs/{job.id}", max_size=2**20,
                                      max_queue=None,
                                      additional_headers=job.client_headers) as viewer:
            assert json.loads(await viewer.recv())["seq"] == 1
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def sse_status(server: ServerProcess, job: RunningJob, path: str) -> int:
    """What a real SSE reader gets on ``path``: 200 and the first event, or the refusal."""
    with httpx.stream("GET", f"{server.url}{path}", headers=SSE, timeout=30) as answer:
        if answer.status_code == 200:
            first = next(line for line in answer.iter_lines() if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["seq"] == 1
        return answer.status_code


def open_streams(server: ServerProcess, job: RunningJob) -> float:
    metrics = httpx.get(f"{server.url}/metrics", headers=job.client_headers).text
    return next(float(line.split()[1]) for line in metrics.splitlines()
                if line.startswith("metis_open_streams "))


def assert_aborted(sock: socket.socket) -> None:
    """The server dropped the connection without a closing handshake: a reset, which
    discards what the client had not read."""
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while sock.recv(65536):
            pass


async def wait_for_viewer(server: ServerProcess, job: RunningJob,
                          status: Callable[[], int] | None = None) -> float:
    """Seconds until a real viewer gets in."""
    started = time.monotonic()
    while (status() if status else await viewer_status(server, job)) not in (101, 200):
        assert time.monotonic() - started < SEND_TIMEOUT + 4, "the slots were never freed"
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_one_watch_token_takes_only_its_share_of_a_jobs_slots(server: ServerProcess):
    job = big_job(server)
    with contextlib.ExitStack() as frozen:
        for _ in range(PER_CLIENT):
            frozen.enter_context(frozen_websocket(server, watch_path(job, job.watch_token)))
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}{watch_path(job, job.watch_token)}"):
                pass
        assert refused.value.response.status_code == 429
        answer = httpx.get(f"{server.url}{events_path(job, job.watch_token)}", headers=SSE,
                           timeout=30)
        assert answer.status_code == 429, answer.text[:300]
        assert "streams of job" in answer.json()["error"]
        # The job's other slots are still there for everyone else.
        assert await viewer_status(server, job) == 101
    job.end()


async def test_websockets_that_never_read_are_dropped_at_the_send_deadline(tmp_path: Path):
    server = make_server(tmp_path, max_streams_per_client=PER_JOB)
    server.start()
    try:
        job = big_job(server)
        frozen = [frozen_websocket(server, watch_path(job, job.watch_token))
                  for _ in range(PER_JOB)]
        try:
            assert await viewer_status(server, job) == 429  # they hold every slot
            waited = await wait_for_viewer(server, job)
            print(f"\na viewer got in {waited:.1f} s after {PER_JOB} frozen websockets took "
                  f"every slot (send_timeout {SEND_TIMEOUT} s)")
            for sock in frozen:
                assert_aborted(sock)
        finally:
            for sock in frozen:
                sock.close()
        job.end()
        assert "Traceback" not in server.log()
    finally:
        server.stop()


async def test_sse_readers_that_never_read_are_dropped_at_the_send_deadline(tmp_path: Path):
    server = make_server(tmp_path, max_streams_per_client=PER_JOB)
    server.start()
    try:
        job = big_job(server)
        path = events_path(job, job.watch_token)
        stalled = [stalled_get(server, path, SSE) for _ in range(PER_JOB)]
        try:
            time.sleep(0.5)
            assert sse_status(server, job, path) == 429  # they hold every slot
            waited = await wait_for_viewer(server, job, lambda: sse_status(server, job, path))
            print(f"\nan SSE reader got in {waited:.1f} s after {PER_JOB} stalled ones took "
                  f"every slot (send_timeout {SEND_TIMEOUT} s)")
            for sock in stalled:
                assert_aborted(sock)
        finally:
            for sock in stalled:
                sock.close()
        job.end()
        assert "Traceback" not in server.log()
    finally:
        server.stop()


async def test_stalled_sse_readers_do_not_outlive_the_job(tmp_path: Path):
    """A reader that stopped reading is dropped even though its job has ended and the
    terminal event waits in a buffer it will never drain."""
    server = make_server(tmp_path, max_streams_per_client=PER_JOB)
    server.start()
    try:
        job = big_job(server)
        stalled = [stalled_get(server, events_path(job, job.watch_token), SSE)
                   for _ in range(PER_JOB)]
        try:
            time.sleep(0.5)
            assert job.post_event({"type": "completed"}).status_code == 200
            started = time.monotonic()
            deadline = started + SEND_TIMEOUT + 4
            while open_streams(server, job) > 0:
                assert time.monotonic() < deadline, "the stalled readers stayed open"
                time.sleep(0.2)
            for sock in stalled:
                assert_aborted(sock)
        finally:
            for sock in stalled:
                sock.close()
    finally:
        server.stop()
