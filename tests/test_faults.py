"""Faults and load on the Redis backend, with real processes: a server SIGKILLed in the
middle of several jobs, a frozen client among fast ones, a burst of 10,000 events, and
1,000 sockets on one process.

The file takes about a minute. ``METIS_SOAK=1`` runs the same scenarios longer and
bigger (more jobs killed at once, a longer frozen phase, more sockets).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from metis_stream.client import Client
from tests.support.redis_server import RedisServer, start_private_redis
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    IDLE_SCRIPT,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    free_port,
    script_templates,
)
from tests.support.stalled import frozen_websocket, pending_bytes

pytestmark = pytest.mark.redis

SOAK = os.environ.get("METIS_SOAK") == "1"
SECRET = "faults-test-secret-of-at-least-32-bytes"
WORDS = [f"w{n}" for n in range(40)]
KILLED_JOBS = 12 if SOAK else 4
FAST_WATCHERS = 100
PHASE_EVENTS = 600 if SOAK else 300
FILLER_EVENTS = 2000 if SOAK else 500
FROZEN_ROUNDS = 12 if SOAK else 4
FROZEN_ROUND_EVENTS = 1500
BURST = 10_000
SOCKETS = 2000 if SOAK else 1000
PADDING = "p" * 4096



@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_private_redis(tmp_path_factory.mktemp("faults-redis"))
    try:
        yield server
    finally:
        server.stop()


def make_server(redis: RedisServer, folder: Path, **settings: object) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        state_dir=folder / "server", port=port,
        server_settings={"redis_url": redis.url, "secret": SECRET,
                         "public_url": f"http://127.0.0.1:{port}",
                         "submissions_per_minute": 10_000, **settings},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES
        + script_templates(folder / "scripts", {"idle": IDLE_SCRIPT}))


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (a server started later inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@pytest.fixture(scope="module")
def server(redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """One process for the load scenarios: room for the burst and for every socket."""
    raise_open_files(4 * SOCKETS + 1024)
    process = make_server(redis, tmp_path_factory.mktemp("faults"),
                          max_events_per_job=max(BURST, FILLER_EVENTS + 2 * PHASE_EVENTS
                               + FROZEN_ROUNDS * FROZEN_ROUND_EVENTS) + 1000,
                          max_sockets_per_job=SOCKETS + 10,
                          max_streams_per_client=SOCKETS + 10)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def assert_no_traceback(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 300:][:3000]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


# 1. SIGKILL in the middle of several jobs


async def test_a_server_killed_mid_jobs_restarts_and_every_watcher_gets_each_event_once(
        redis: RedisServer, tmp_path: Path):
    server = make_server(redis, tmp_path)
    server.start()
    try:
        text = " ".join(WORDS)
        jobs = [httpx.post(f"{server.url}/api/jobs", json={
            "template": "tokens", "params": {"text": text, "delay": 0.05}}).json()["id"]
            for _ in range(KILLED_JOBS)]
        received: dict[str, list[dict[str, Any]]] = {job: [] for job in jobs}

        async def watch(job_id: str) -> None:
            async with Client(server.url, max_retry_delay=0.5) as client:
                async for event in client.watch(job_id):
                    received[job_id].append(event)

        watchers = [asyncio.create_task(watch(job)) for job in jobs]
        async with asyncio.timeout(30):
            while min(len(events) for events in received.values()) < 10:
                await asyncio.sleep(0.02)
        server.kill()
        counts_at_kill = {job: len(events) for job, events in received.items()}
        await asyncio.sleep(0.5)
        server.start()
        await asyncio.wait_for(asyncio.gather(*watchers), 90)
        for job, events in received.items():
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert events[-1]["type"] == "completed", events[-3:]
            assert "".join(e["data"] for e in events if e["type"] == "token") == text
            assert len(events) > counts_at_kill[job], "the job must have gone on after the kill"
            history = httpx.get(f"{server.url}/api/jobs/{job}/events").json()["events"]
            assert history == events, "every acknowledged event, delivered exactly once"
    finally:
        server.stop()


# 2. One frozen client among 100 fast watchers


class Watchers:
    """Fast websocket watchers that note, per phase, how late each event arrives."""

    def __init__(self, job: RunningJob, count: int) -> None:
        self.job = job
        self.count = count
        self.latencies: dict[str, list[float]] = {}
        self.seen: list[int] = [0] * count
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        ready = asyncio.Semaphore(0)
        self.tasks = [asyncio.create_task(self._run(n, ready)) for n in range(self.count)]
        for _ in range(self.count):
            await asyncio.wait_for(ready.acquire(), 30)

    async def _run(self, index: int, ready: asyncio.Semaphore) -> None:
        async with websockets.connect(self.job.watch_url(), max_size=2**22) as socket:
            ready.release()
            async for frame in socket:
                now = time.time()
                event = json.loads(frame)
                self.seen[index] = event["seq"]
                data = event["data"]
                if isinstance(data, dict) and "phase" in data:
                    self.latencies.setdefault(data["phase"], []).append(now - data["t"])

    async def wait_for_seq(self, seq: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while min(self.seen) < seq:
                await asyncio.sleep(0.01)


async def post_phase(http: httpx.AsyncClient, job: RunningJob, phase: str, count: int,
                     interval: float) -> int:
    """Post ``count`` events spaced by ``interval``, each with its send time; the last seq."""
    last = 0
    for n in range(count):
        answer = await http.post(job.url, headers=job.headers, json={
            "type": "log", "data": {"phase": phase, "n": n, "t": time.time(), "pad": PADDING}})
        assert answer.status_code == 200, answer.text
        last = answer.json()["seqs"][-1]
        await asyncio.sleep(interval)
    return last


async def post_filler(http: httpx.AsyncClient, job: RunningJob, count: int) -> int:
    """Many padded events at once, in NDJSON batches: enough to back the frozen client up."""
    last = 0
    for start in range(0, count, 100):
        body = "".join(json.dumps({"type": "log", "data": PADDING}) + "\n"
                       for _ in range(min(100, count - start)))
        answer = await http.post(job.url, content=body, headers={
            **job.headers, "Content-Type": "application/x-ndjson"})
        assert answer.status_code == 200, answer.text
        last = answer.json()["seqs"][-1]
    return last


async def test_a_frozen_client_slows_no_fast_watcher_and_does_not_grow_memory(
        server: ServerProcess):
    job = RunningJob(server, "idle")
    watchers = Watchers(job, FAST_WATCHERS)
    await watchers.start()
    async with httpx.AsyncClient(timeout=30) as http:
        last = await post_phase(http, job, "alone", PHASE_EVENTS, 0.01)
        await watchers.wait_for_seq(last)
        rss_before = server.rss_kib()

        frozen = frozen_websocket(server, f"/ws/jobs/{job.id}")
        try:
            # Back the frozen client up first, then measure the fast ones beside it.
            last = await post_filler(http, job, FILLER_EVENTS)
            await watchers.wait_for_seq(last)
            last = await post_phase(http, job, "frozen", PHASE_EVENTS, 0.01)
            await watchers.wait_for_seq(last)
            for task in watchers.tasks:
                task.cancel()
            await asyncio.gather(*watchers.tasks, return_exceptions=True)
            rss_frozen = server.rss_kib()
            # Then the frozen client alone, sent far more than one subscription buffer
            # (1,000 events): what it does not read must stay in the log, not in memory.
            for _ in range(FROZEN_ROUNDS):
                await post_filler(http, job, FROZEN_ROUND_EVENTS)
            await asyncio.sleep(0.5)
            rss_after = server.rss_kib()
            stuck = pending_bytes(frozen)
            assert httpx.get(f"{server.url}/healthz").status_code == 200
        finally:
            frozen.close()
        answer = await http.post(job.url, headers=job.headers, json={"type": "completed"})
        assert answer.status_code == 200

    alone = p99(watchers.latencies["alone"])
    with_frozen = p99(watchers.latencies["frozen"])
    unread_mib = FROZEN_ROUNDS * FROZEN_ROUND_EVENTS * len(PADDING) / 2**20
    print(f"\nfast watchers' p99 latency: alone {alone * 1000:.1f} ms, beside a frozen client "
          f"{with_frozen * 1000:.1f} ms; server RSS {rss_before / 1024:.0f} MiB before, "
          f"{rss_frozen / 1024:.0f} MiB with the frozen client, {rss_after / 1024:.0f} MiB "
          f"after it was sent {unread_mib:.0f} MiB more; it holds {stuck} unread bytes")
    assert len(watchers.latencies["alone"]) == FAST_WATCHERS * PHASE_EVENTS
    assert len(watchers.latencies["frozen"]) == FAST_WATCHERS * PHASE_EVENTS
    assert stuck > 0, "the frozen client was sent events and read none of them"
    # A floor of 20 ms under the baseline: below that, scheduler noise dominates.
    assert with_frozen <= 2 * max(alone, 0.020), (alone, with_frozen)
    # Bounded: one subscription buffer and the socket buffers, not what it did not read.
    assert (rss_after - rss_frozen) / 1024 < unread_mib / 2, (rss_frozen, rss_after)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    assert_no_traceback(server)


# 3. A burst of 10,000 events


async def test_a_burst_of_10000_events_reaches_every_watcher_in_order(server: ServerProcess):
    job = RunningJob(server, "idle")
    start = len(job.events())
    streams: list[list[dict[str, Any]]] = [[] for _ in range(6)]

    async def raw_watcher(into: list[dict[str, Any]], ready: asyncio.Event) -> None:
        async with websockets.connect(job.watch_url()) as socket:
            ready.set()
            async for frame in socket:
                into.append(json.loads(frame))

    async def client_watcher(into: list[dict[str, Any]]) -> None:
        async with Client(server.url) as client:
            async for event in client.watch(job.id):
                into.append(event)

    readies = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(raw_watcher(streams[n], readies[n])) for n in range(5)]
    tasks.append(asyncio.create_task(client_watcher(streams[5])))
    for ready in readies:
        await asyncio.wait_for(ready.wait(), 30)
    async with httpx.AsyncClient(timeout=60) as http:
        for batch in range(BURST // 1000):
            body = "".join(json.dumps({"type": "log", "data": batch * 1000 + n}) + "\n"
                           for n in range(1000))
            answer = await http.post(job.url, content=body, headers={
                **job.headers, "Content-Type": "application/x-ndjson"})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["seqs"]) == 1000
        answer = await http.post(job.url, headers=job.headers, json={"type": "completed"})
        assert answer.status_code == 200
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    for events in streams:
        assert [e["seq"] for e in events] == list(range(1, start + BURST + 2))
        assert [e["data"] for e in events if e["type"] == "log"] == list(range(BURST))
        assert events[-1]["type"] == "completed"
    assert_no_traceback(server)


# 4. 1,000 sockets on one process


async def test_1000_sockets_on_one_process_all_receive_the_jobs_events(server: ServerProcess):
    limit = raise_open_files(4 * SOCKETS + 1024)
    if limit < 2 * SOCKETS + 200:
        pytest.fail(f"RLIMIT_NOFILE is {limit}: {SOCKETS} sockets need more")
    job = RunningJob(server, "idle")
    streams: list[list[int]] = [[] for _ in range(SOCKETS)]
    codes: list[int | None] = [None] * SOCKETS
    opened = asyncio.Semaphore(0)

    async def watcher(index: int) -> None:
        async with websockets.connect(job.watch_url(), open_timeout=60) as socket:
            opened.release()
            async for frame in socket:
                streams[index].append(json.loads(frame)["seq"])
        codes[index] = socket.close_code

    tasks = []
    for index in range(SOCKETS):
        tasks.append(asyncio.create_task(watcher(index)))
        if index % 100 == 99:
            await asyncio.sleep(0.05)  # no more at once than a listen backlog takes
    for _ in range(SOCKETS):
        await asyncio.wait_for(opened.acquire(), 60)
    async with httpx.AsyncClient(timeout=30) as http:
        for n in range(20):
            answer = await http.post(job.url, headers=job.headers,
                                     json={"type": "token", "data": f" t{n}"})
            assert answer.status_code == 200
        answer = await http.post(job.url, headers=job.headers, json={"type": "completed"})
        assert answer.status_code == 200
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    expected = [e["seq"] for e in job.events()]
    assert expected[-1] == len(expected)
    assert all(stream == expected for stream in streams), "a socket missed an event"
    assert codes == [1000] * SOCKETS
    assert_no_traceback(server)


# 5. A clean stop


def test_a_redis_backed_server_stops_cleanly_on_sigterm(redis: RedisServer, tmp_path: Path):
    server = make_server(redis, tmp_path)
    server.start()
    job = RunningJob(server, "idle")
    assert server.process is not None
    process = server.process
    server.stop()
    job.end()  # it outlives its server, polling for its token file
    # uvicorn re-raises the signal once it has shut down, as supervisors expect.
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
    assert "Application shutdown failed" not in server.log()
    assert_no_traceback(server)

