"""Clients that stop reading, against a real server: websockets that do the handshake and
never read again, with a tiny receive buffer, on a job whose history is far larger than the
socket buffers.

One client (one watch token) may hold only ``max_streams_per_client`` of a job's
``max_sockets_per_job`` slots.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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
from tests.support.stalled import frozen_websocket

KEY = "slow-clients-test-key"
PER_JOB = 4
PER_CLIENT = 2
PAYLOAD = "x" * 60_000
HISTORY = 150
"""Events of PAYLOAD in the job's history: 9 MB, more than a stalled socket's buffers take."""
IDLE = '"$METIS_EMIT" step idle\nwhile [ -f "$METIS_TOKEN_FILE" ]; do sleep 0.1; done\n'


def make_server(folder: Path, **settings: object) -> ServerProcess:
    return ServerProcess(
        state_dir=folder / "server",
        server_settings={"api_keys": [KEY], "max_sockets_per_job": PER_JOB,
                         "max_streams_per_client": PER_CLIENT, **settings},
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
