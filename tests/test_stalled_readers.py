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

from tests.support.server import RunningJob, ServerProcess, idle_server, running
from tests.support.stalled import frozen_websocket, stalled_get

KEY = "slow-clients-test-key"
SEND_TIMEOUT = 2.0
PER_JOB = 4
PER_CLIENT = 2
PAYLOAD = "x" * 60_000
HISTORY = 150
"""Events of PAYLOAD in the job's history: 9 MB, more than a stalled socket's buffers take."""
SSE = {"Accept": "text/event-stream"}


def slow_clients_server(folder: Path, per_client: int = PER_CLIENT) -> ServerProcess:
    return idle_server(folder, api_keys=[KEY], send_timeout=SEND_TIMEOUT,
                       max_sockets_per_job=PER_JOB, max_streams_per_client=per_client)


def big_job(server: ServerProcess) -> RunningJob:
    job = RunningJob(server, "idle", key=KEY)
    line = json.dumps({"type": "token", "data": PAYLOAD}) + "\n"
    for _ in range(0, HISTORY, 15):
        answer = job.post(line * 15, "application/x-ndjson")
        assert answer.status_code == 200, answer.text[:300]
    return job


def watch_path(job: RunningJob) -> str:
    return f"/ws/jobs/{job.id}?token={job.watch_token}"


def events_path(job: RunningJob) -> str:
    return f"/api/jobs/{job.id}/events?token={job.watch_token}"


STALLED: dict[str, Callable[[ServerProcess, RunningJob], socket.socket]] = {
    "websocket": lambda server, job: frozen_websocket(server, watch_path(job)),
    "sse": lambda server, job: stalled_get(server, events_path(job), SSE),
}
"""A client that never reads, holding one of the job's streams with its watch token."""


async def viewer_status(server: ServerProcess, job: RunningJob, kind: str) -> int:
    """What a real viewer (with the API key) gets: its first event and 101 or 200, or the
    status of the refusal."""
    if kind == "sse":
        async with httpx.AsyncClient(timeout=30) as http, http.stream(
                "GET", f"{server.url}/api/jobs/{job.id}/events",
                headers={**SSE, **job.client_headers}) as answer:
            if answer.status_code == 200:
                first = await anext(line async for line in answer.aiter_lines()
                                    if line.startswith("data: "))
                assert json.loads(first.removeprefix("data: "))["seq"] == 1
            return answer.status_code
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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running(slow_clients_server(tmp_path)) as process:
        yield process


async def test_one_watch_token_takes_only_its_share_of_a_jobs_slots(server: ServerProcess):
    job = big_job(server)
    with contextlib.ExitStack() as frozen:
        for _ in range(PER_CLIENT):
            frozen.enter_context(STALLED["websocket"](server, job))
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}{watch_path(job)}"):
                pass
        assert refused.value.response.status_code == 429
        answer = httpx.get(f"{server.url}{events_path(job)}", headers=SSE, timeout=30)
        assert answer.status_code == 429, answer.text[:300]
        assert "streams of job" in answer.json()["error"]
        # The job's other slots are still there for everyone else.
        assert await viewer_status(server, job, "websocket") == 101
        assert await viewer_status(server, job, "sse") == 200
    job.end()


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_clients_that_never_read_are_dropped_at_the_send_deadline(tmp_path: Path,
                                                                        kind: str):
    with running(slow_clients_server(tmp_path, per_client=PER_JOB)) as server:
        job = big_job(server)
        with contextlib.ExitStack() as stalled:
            clients = [stalled.enter_context(STALLED[kind](server, job))
                       for _ in range(PER_JOB)]
            await asyncio.sleep(0.5)  # until each has its slot and is sent what fits
            assert await viewer_status(server, job, kind) == 429  # they hold every slot
            started = time.monotonic()
            while await viewer_status(server, job, kind) == 429:
                assert time.monotonic() - started < SEND_TIMEOUT + 4, "slots never freed"
                await asyncio.sleep(0.2)
            print(f"\na {kind} viewer got in {time.monotonic() - started:.1f} s after "
                  f"{PER_JOB} that never read took every slot (send_timeout {SEND_TIMEOUT} s)")
            for client in clients:
                assert_aborted(client)
        job.end()
        assert "Traceback" not in server.log()


@pytest.mark.parametrize("kind", ["websocket", "sse"])
async def test_clients_that_never_read_do_not_outlive_the_job(tmp_path: Path, kind: str):
    """A client that stopped reading is dropped even though its job has ended and the
    terminal event waits in a buffer it will never drain."""
    with running(slow_clients_server(tmp_path, per_client=PER_JOB)) as server:
        job = big_job(server)
        with contextlib.ExitStack() as stalled:
            clients = [stalled.enter_context(STALLED[kind](server, job))
                       for _ in range(PER_JOB)]
            await asyncio.sleep(0.5)
            assert job.post_event({"type": "completed"}).status_code == 200
            deadline = time.monotonic() + SEND_TIMEOUT + 4
            while open_streams(server, job) > 0:
                assert time.monotonic() < deadline, "the stalled readers stayed open"
                await asyncio.sleep(0.2)
            for client in clients:
                assert_aborted(client)
        job.end()
