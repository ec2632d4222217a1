"""What a job costs a server's memory, measured on a real server process's RSS
(/proc/PID/status VmRSS): the memory backend keeps one copy of each event, a job has a
byte budget, and history is read in pages bounded in bytes.

The figures are printed (``-s``); the bounds asserted are loose enough for allocator noise
and tight enough to catch a second copy of every event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metis_stream import tokens
from metis_stream.backends.contract import READ_PAGE, READ_PAGE_BYTES
from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import load_config
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job, new_job_id
from metis_stream.web.app import create_app
from tests.support.server import (
    RunningJob,
    ServerProcess,
    idle_server,
    running,
    serve_in_thread,
)
from tests.support.stalled import stalled_get

NDJSON = "application/x-ndjson"
PAYLOAD = "x" * 60_000
EVENTS = 1000
PER_REQUEST = 15
"""Events of PAYLOAD per NDJSON request: under the 1 MiB request limit."""
STALLED_READERS = 8
KEY = "memory-test-key"
CAP = 3


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running(idle_server(tmp_path, submissions_per_minute=10_000)) as process:
        yield process


def post_events(job: RunningJob, count: int, data: str = PAYLOAD) -> None:
    """``count`` token events of ``data``, in NDJSON batches."""
    for start in range(0, count, PER_REQUEST):
        body = "".join(json.dumps({"type": "token", "data": data}) + "\n"
                       for _ in range(min(PER_REQUEST, count - start)))
        answer = job.post(body, NDJSON)
        assert answer.status_code == 200, answer.text[:300]


def test_a_job_past_its_byte_budget_gets_413_and_still_takes_its_terminal_event(
        tmp_path: Path):
    budget = 2 * 1024 * 1024
    with running(idle_server(tmp_path, max_job_bytes=budget)) as server:
        job = RunningJob(server, "idle")
        before = server.rss_kib()
        line = json.dumps({"type": "token", "data": PAYLOAD}) + "\n"
        taken = 0
        while (answer := job.post(line * PER_REQUEST, NDJSON)).status_code == 200:
            taken += PER_REQUEST
        assert answer.status_code == 413, answer.text
        assert "budget of 2097152 bytes" in answer.json()["error"]
        while (answer := job.post(line, NDJSON)).status_code == 200:
            taken += 1
        assert answer.status_code == 413, answer.text
        grown = server.rss_kib() - before
        ended = job.post_event({"type": "completed", "data": PAYLOAD})
        assert ended.status_code == 200, ended.text
        events = job.events()
        assert events[-1]["type"] == "completed"
        sizes = [len(json.dumps(event, separators=(",", ":"))) for event in events]
        # Every token that fitted was taken, and only those; then the terminal one too.
        assert sum(sizes[:-1]) <= budget < sum(sizes[:-1]) + sizes[-2]
        print(f"\n{taken} events of {len(PAYLOAD)} bytes fit a budget of {budget} bytes; "
              f"RSS grew {grown / 1024:.1f} MiB")
        assert grown < 4 * budget / 1024, (before, grown)


def test_the_memory_backend_keeps_one_copy_of_each_event(server: ServerProcess):
    job = RunningJob(server, "idle")
    post_events(job, 2 * PER_REQUEST)  # the allocator's first arenas, the first buffers
    before = server.rss_kib()
    post_events(job, EVENTS)
    grown = server.rss_kib() - before
    payload = EVENTS * len(PAYLOAD) / 1024
    print(f"\nRSS grew {grown / 1024:.1f} MiB for {EVENTS} events of {len(PAYLOAD)} bytes "
          f"({payload / 1024:.1f} MiB of payload)")
    # One copy is the payload and a little; two copies (the decoded data and the wire JSON)
    # were twice the payload.
    assert grown < 1.3 * payload, (before, grown)
    job.end()


def test_history_comes_in_pages_bounded_in_bytes_each_saying_whether_more_follows(
        server: ServerProcess):
    job = RunningJob(server, "idle")
    post_events(job, 60)  # 3.6 MB: many pages
    url = f"{server.url}/api/jobs/{job.id}/events"
    seqs: list[int] = []
    pages = 0
    while True:
        answer = httpx.get(url, params={"after": seqs[-1] if seqs else 0}, timeout=30)
        assert answer.status_code == 200, answer.text[:300]
        assert answer.headers["content-type"] == "application/json"
        page = answer.json()
        assert page["job"] == job.id
        pages += 1
        seqs += [event["seq"] for event in page["events"]]
        # A page stops at the event that reaches the bound.
        assert len(answer.content) < READ_PAGE_BYTES + len(PAYLOAD) + 1000
        if not page["more"]:
            break
        assert len(answer.content) >= READ_PAGE_BYTES
    assert seqs == list(range(1, 64))  # starting, submitted, step, the tokens
    assert pages >= 60 * len(PAYLOAD) // READ_PAGE_BYTES
    job.end()


def test_stalled_history_readers_hold_no_more_than_a_page_each(server: ServerProcess):
    """Eight readers of a large history that never read: each is sent one page, which the
    kernel's socket buffers take; the server holds none of it."""
    job = RunningJob(server, "idle")
    post_events(job, EVENTS)
    before = server.rss_kib()
    path = f"/api/jobs/{job.id}/events?token={job.watch_token}"
    with contextlib.ExitStack() as readers:
        for _ in range(STALLED_READERS):
            readers.enter_context(stalled_get(server, path))
        time.sleep(2)  # each request answered as far as its stalled client lets it
        grown = server.rss_kib() - before
    print(f"\n{STALLED_READERS} stalled history readers of a job of {EVENTS} events of "
          f"{len(PAYLOAD)} bytes grew the server's RSS by {grown / 1024:.1f} MiB")
    assert grown < 16 * 1024, (before, grown)
    answer = httpx.get(f"{server.url}{path}", timeout=30)
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["more"]
    job.end()


class GatedBackend(MemoryBackend):
    """A memory backend whose reads from the start of a log wait until the test opens the
    gate: history reads that stay in flight as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.waiting = 0

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Event]:
        if after == 0:
            self.waiting += 1
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            self.waiting -= 1
        return await super().read(job_id, after, limit, max_bytes)


async def test_concurrent_history_reads_of_one_client_past_its_cap_get_429(tmp_path: Path):
    config = load_config(None, {"METIS_STATE_DIR": str(tmp_path), "METIS_API_KEYS": KEY,
                                "METIS_MAX_HISTORY_READS_PER_CLIENT": str(CAP)})
    backend = GatedBackend()
    job = Job(id=new_job_id(), template="tokens", cluster="elsewhere", created=time.time())
    await backend.create_job(job)
    await backend.append(job.id, [NewEvent("starting"), NewEvent("submitted", "1.pbs")])
    watch = {"token": tokens.watch_token(config.server.secret, job.id)}
    with serve_in_thread(create_app(config, backend=backend)) as url:
        events = f"{url}/api/jobs/{job.id}/events"
        async with httpx.AsyncClient(timeout=30) as http:
            held = [asyncio.create_task(http.get(events, params=watch)) for _ in range(CAP)]
            while backend.waiting < CAP:
                await asyncio.sleep(0.01)
            refused = await http.get(events, params=watch)
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "too many history reads" in refused.json()["error"]
            # Another client (the web app's key) is not held up by this one.
            other = await http.get(events, params={"after": 1},
                                   headers={"Authorization": f"Bearer {KEY}"})
            assert [event["seq"] for event in other.json()["events"]] == [2]
            backend.gate.set()
            assert [(await answer).status_code for answer in held] == [200] * CAP
            again = await http.get(events, params=watch)
            assert [event["seq"] for event in again.json()["events"]] == [1, 2]
