"""Several real server processes on one real redis-server: events cross processes, and
nothing acknowledged is lost when a server or redis-server is killed in the middle of a job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from metis_stream.client import Client
from metis_stream.jobs import JobState
from metis_stream.tokens import hash_api_key
from tests.support.processes import command_line, descendants, find
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess, free_port

pytestmark = pytest.mark.redis

SECRET = "shared-by-every-server-process-of-this-test"
WORDS = [f"w{n}" for n in range(40)]


def server_on(private_redis: RedisServer, folder: Path, *, public_url: str | None = None,
              port: int = 0) -> ServerProcess:
    settings: dict[str, object] = {"redis_url": private_redis.url, "secret": SECRET}
    port = port or free_port()
    settings["public_url"] = public_url or f"http://127.0.0.1:{port}"
    return ServerProcess(state_dir=folder, server_settings=settings, port=port)


@pytest.fixture
def two_servers(private_redis: RedisServer, tmp_path: Path) -> Iterator[tuple[ServerProcess,
                                                                     ServerProcess]]:
    """A runs the jobs and serves the watchers; the jobs post their events to B."""
    b = server_on(private_redis, tmp_path / "b")
    a = server_on(private_redis, tmp_path / "a", public_url=b.url)
    b.start()
    a.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def assert_exactly_once(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "completed"
    text = "".join(e["data"] for e in events if e["type"] == "token")
    assert text == " ".join(WORDS)


async def test_a_watcher_on_one_process_gets_every_event_posted_to_another(two_servers):
    a, b = two_servers
    async with websockets.connect(f"{a.ws_url}/ws/jobs") as socket:
        await socket.send(json.dumps({"template": "tokens",
                                      "params": {"text": " ".join(WORDS), "delay": 0.005}}))
        events = [json.loads(frame) async for frame in socket]
        assert socket.close_code == 1000
    assert_exactly_once(events)
    ingest_lines = [line for line in b.log().splitlines() if "POST /api/jobs/" in line]
    assert len(ingest_lines) >= len(WORDS), "the job must have posted to the other process"
    assert "/events HTTP/1.1\" 200" not in a.log(), "A must only have served the watcher"
    job_id = events[0]["job"]
    assert httpx.get(f"{b.url}/api/jobs/{job_id}").json()["state"] == "completed"
    history = httpx.get(f"{b.url}/api/jobs/{job_id}/events").json()["events"]
    assert history == events


async def test_watchers_on_both_processes_see_the_same_stream(two_servers):
    a, b = two_servers
    job = httpx.post(f"{a.url}/api/jobs", json={
        "template": "tokens", "params": {"text": " ".join(WORDS), "delay": 0.02}}).json()

    async def watch(server: ServerProcess, after: int) -> list[dict[str, Any]]:
        url = f"{server.ws_url}/ws/jobs/{job['id']}?after={after}"
        async with websockets.connect(url) as socket:
            return [json.loads(frame) async for frame in socket]

    starts = [(server, after) for server in (a, b) for after in (0, 0, 3)]
    streams = await asyncio.gather(*(watch(server, after) for server, after in starts))
    assert_exactly_once(streams[0])
    for (_, after), stream in zip(starts, streams, strict=True):
        assert stream == streams[0][after:]


async def watch_a_streaming_job(submit_to: ServerProcess, watch_on: ServerProcess
                                ) -> tuple[asyncio.Task[None], list[dict[str, Any]]]:
    """Submit a `tokens` job, and follow it with the resuming client until 10 events
    have arrived; the task ends after the job's terminal event."""
    job = httpx.post(f"{submit_to.url}/api/jobs", json={
        "template": "tokens", "params": {"text": " ".join(WORDS), "delay": 0.05}}).json()
    received: list[dict[str, Any]] = []

    async def watch() -> None:
        async with Client(watch_on.url, max_retry_delay=0.5) as client:
            async for event in client.watch(job["id"]):
                received.append(event)

    watcher = asyncio.create_task(watch())
    while len(received) < 10:
        await asyncio.sleep(0.02)
    return watcher, received


async def test_a_server_killed_mid_stream_comes_back_and_the_watcher_resumes(two_servers):
    a, b = two_servers
    watcher, received = await watch_a_streaming_job(submit_to=a, watch_on=b)
    b.kill()  # the process the job posts to and the watcher listens on
    await asyncio.sleep(0.5)
    b.start()
    await asyncio.wait_for(watcher, 60)
    assert_exactly_once(received)


async def test_redis_killed_and_restarted_mid_job_loses_no_acknowledged_event(
        private_redis: RedisServer, two_servers):
    a, b = two_servers
    watcher, received = await watch_a_streaming_job(submit_to=a, watch_on=a)
    private_redis.kill()
    outage = time.monotonic()
    await asyncio.sleep(1.0)
    private_redis.start()
    await asyncio.wait_for(watcher, 90)
    assert time.monotonic() - outage > 1.0
    assert_exactly_once(received)
    refused = [line for line in b.log().splitlines() if '/events HTTP/1.1" 503' in line]
    assert refused, "the outage must have been seen: ingest answered 503 and metis-emit retried"


def test_several_processes_share_the_job_database(two_servers):
    a, b = two_servers
    created = [httpx.post(f"{server.url}/api/jobs", json={
        "template": "tokens", "params": {"text": "x", "delay": 0}}).json()
        for server in (a, b, a)]
    listed = {j["id"] for j in httpx.get(f"{b.url}/api/jobs").json()["jobs"]}
    assert {job["id"] for job in created} <= listed
    # Before their servers stop: they would retry their events for minutes.
    deadline = time.monotonic() + 30
    while not all(JobState(httpx.get(f"{b.url}/api/jobs/{job['id']}").json()["state"]).terminal
                  for job in created):
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(0.1)


def test_api_key_hash_is_accepted_across_processes(private_redis: RedisServer, tmp_path: Path):
    settings = {"redis_url": private_redis.url, "secret": SECRET, "api_keys": [hash_api_key("k")]}
    servers = [ServerProcess(state_dir=tmp_path / name, server_settings=settings)
               for name in ("one", "two")]
    for server in servers:
        server.start()
    try:
        job = httpx.post(f"{servers[0].url}/api/jobs", json={"template": "tokens"},
                         headers={"Authorization": "Bearer k"}).json()
        watch = httpx.get(f"{servers[1].url}/api/jobs/{job['id']}",
                          params={"token": job["watch_token"]})
        assert watch.status_code == 200
        # Before its server stops: it would retry its events for minutes.
        httpx.delete(f"{servers[0].url}/api/jobs/{job['id']}",
                     headers={"Authorization": "Bearer k"})
    finally:
        for server in servers:
            server.stop()


async def test_serve_with_workers_runs_several_processes_on_redis(private_redis: RedisServer,
                                                                  tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "workers", serve_args=("--workers", "2"),
                           server_settings={"redis_url": private_redis.url})
    server.start()
    try:
        async def run_one() -> list[dict[str, Any]]:
            async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
                await socket.send(json.dumps({"template": "tokens", "params": {
                    "text": " ".join(WORDS), "delay": 0}}))
                return [json.loads(frame) async for frame in socket]

        for events in await asyncio.gather(*(run_one() for _ in range(6))):
            assert_exactly_once(events)
        assert server.log().count("Started server process") == 2
    finally:
        server.stop()


def test_serve_workers_get_the_secret_without_it_being_in_their_environment(
        private_redis: RedisServer, tmp_path: Path):
    """Every worker finds the secret as the parent did (here, kept in state_dir; that they
    agree on it, test_serve_with_workers_runs_several_processes_on_redis shows: jobs post
    with tokens that any worker minted). None has it in its environment, which everything
    it starts would inherit."""
    server = ServerProcess(state_dir=tmp_path / "workers", serve_args=("--workers", "2"),
                           server_settings={"redis_url": private_redis.url})
    server.start()
    try:
        assert server.process is not None
        deadline = time.monotonic() + 20
        while server.log().count("Started server process") < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        secret = (server.state_dir / "secret").read_text().strip().encode()
        workers = [process for process in descendants(server.process.pid)
                   if "spawn_main" in command_line(process.pid)]
        assert len(workers) == 2, [command_line(p.pid) for p in descendants(server.process.pid)]
        for worker in [*workers, find(server.process.pid)]:
            assert worker is not None
            environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
            assert b"METIS_SECRET" not in environ and secret not in environ, worker
    finally:
        server.stop()


def test_workers_without_redis_are_refused(tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "no-redis", serve_args=("--workers", "2"))
    with pytest.raises(RuntimeError, match="--workers needs redis_url"):
        server.start()
