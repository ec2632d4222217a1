"""An unreachable cluster is not a dead job: the monitor judges no job from an outage,
keeps the cluster's health, and tells watchers once that their news is stale and once
that it is fresh again (JobService and a real monitor over a scheduler double; a real
server for the route). The real cluster's outages are tested in test_cluster_outage."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import httpx
import pytest

from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import ClusterConfig, Config, ServerConfig
from metis_stream.errors import ConnectionLost, SchedulerError
from metis_stream.jobs import JobState
from metis_stream.schedulers.base import JobFiles, SchedulerStatus
from metis_stream.service import JobService
from metis_stream.spool import Frames, SpoolRead
from metis_stream.templates import Template
from metis_stream.tokens import hash_api_key
from tests.support.schedulers import SchedulerDouble
from tests.support.server import ServerProcess, running


class Outage(SchedulerDouble):
    """A scheduler that answers, then cannot be reached, then answers that the job ended
    well (its `exit` file says 0)."""

    name = "hpc"

    def __init__(self) -> None:
        self.phase = "up"
        self.polls = 0
        self.polls_down = 0
        self.failed_spool_reads = 0

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        self.polls += 1
        if self.phase == "down":
            self.polls_down += 1
            try:
                raise ConnectionLost("connection lost: EOF from hpc.example.edu:22")
            except ConnectionLost as exc:
                raise SchedulerError("squeue on hpc: connection lost") from exc
        if self.phase == "degraded":
            raise SchedulerError("squeue: Unable to contact slurm controller")
        if self.phase == "ended":
            return {i: SchedulerStatus("ended", 0, "COMPLETED") for i in scheduler_ids}
        return {i: SchedulerStatus("running") for i in scheduler_ids}

    async def cancel(self, scheduler_id: str) -> None:
        pass

    async def read_job_files(self, job_id: str) -> JobFiles:
        return JobFiles(exit=b"0\n")

    async def read_spools(self, reads: Sequence[SpoolRead]) -> Frames:
        if self.phase == "down" and self.polls_down:
            # After the poll has seen the outage (a read before it is any failure).
            self.failed_spool_reads += 1
            try:
                raise ConnectionLost("connection lost: EOF from hpc.example.edu:22")
            except ConnectionLost as exc:
                raise SchedulerError("could not read the spools on hpc: connection lost") from exc
        return Frames([])


async def wait_polls(scheduler: Outage, count: int) -> None:
    target = scheduler.polls + count
    with anyio.fail_after(5):
        while scheduler.polls < target:
            await anyio.sleep(0.005)


async def test_an_outage_ends_no_job_and_watchers_hear_of_it_once_each_way() -> None:
    scheduler = Outage()
    config = Config(server=ServerConfig(insecure_no_auth=True),
                    clusters={"hpc": ClusterConfig(name="hpc", scheduler="slurm",
                                                     delivery="http")},
                    templates={"t": Template(name="t", cluster="hpc")})
    service = JobService(config, MemoryBackend(), {"hpc": scheduler})
    async with anyio.create_task_group() as tasks:
        await service.run(tasks)
        job = await service.create("t", {}, [], client="test")
        await wait_polls(scheduler, 3)
        [before] = await service.clusters()
        scheduler.phase = "down"
        await wait_polls(scheduler, 20)
        [down] = await service.clusters()
        scheduler.phase = "degraded"  # the same outage: no second stale
        await wait_polls(scheduler, 20)
        assert (await service.get(job.id, seen_by=None)).state is JobState.RUNNING
        scheduler.phase = "up"
        await wait_polls(scheduler, 3)
        [up] = await service.clusters()
        scheduler.phase = "ended"
        with anyio.fail_after(5):
            while not (await service.get(job.id, seen_by=None)).state.terminal:
                await anyio.sleep(0.01)
        metrics = service.metrics.render()
        tasks.cancel_scope.cancel()
    assert before["state"] == "ok" and before["scheduler"] == "slurm"
    assert down["state"] == "unreachable"
    assert "hpc.example.edu" in down["last_error"]
    assert up["state"] == "ok" and up["last_error"] == "" and up["since"] > down["since"]
    events = await service.history(job.id)
    types = [event.type for event in events]
    assert types == ["starting", "submitted", "running", "stale", "recovered", "completed"]
    stale, back = events[3], events[4]
    assert stale.data["state"] == "unreachable" and stale.data["cluster"] == "hpc"
    assert stale.data["cause"] == "the server cannot reach the cluster"
    assert back.data["stale_for"] >= 0
    assert 'metis_cluster_state{cluster="hpc",state="ok"} 1' in metrics
    assert 'metis_cluster_state{cluster="hpc",state="unreachable"} 0' in metrics


async def test_an_outage_is_logged_once_not_at_each_failed_spool_read(
        caplog: pytest.LogCaptureFixture) -> None:
    """The spool reader meets the outage too (delivery ``both``, every batch cluster's
    default): the cluster's change of health says it once, not a traceback a read."""
    scheduler = Outage()
    config = Config(server=ServerConfig(insecure_no_auth=True),
                    clusters={"hpc": ClusterConfig(name="hpc", scheduler="slurm",
                                                     delivery="both", spool_interval=0.01)},
                    templates={"t": Template(name="t", cluster="hpc")})
    service = JobService(config, MemoryBackend(), {"hpc": scheduler})
    async with anyio.create_task_group() as tasks:
        await service.run(tasks)
        await service.create("t", {}, [], client="test")
        await wait_polls(scheduler, 3)
        scheduler.phase = "down"
        with anyio.fail_after(5):
            while scheduler.failed_spool_reads < 5:
                await anyio.sleep(0.005)
        scheduler.phase = "up"
        await wait_polls(scheduler, 3)
        tasks.cancel_scope.cancel()
    logged = [(r.levelname, r.getMessage()) for r in caplog.records
              if r.levelno >= logging.WARNING]
    assert len(logged) == 1, logged
    assert logged[0][0] == "WARNING" and logged[0][1].startswith("cluster hpc: unreachable")


def test_the_clusters_route_says_each_clusters_health(tmp_path: Path) -> None:
    server = ServerProcess(state_dir=tmp_path / "server")
    with running(server):
        before = httpx.get(f"{server.url}/api/clusters", timeout=10).json()["clusters"]
        response = httpx.post(f"{server.url}/api/jobs", timeout=10, json={
            "template": "tokens", "params": {"text": "a b c", "delay": 0.3}})
        job_id = response.json()["id"]
        deadline = time.monotonic() + 20
        while True:
            [after] = httpx.get(f"{server.url}/api/clusters", timeout=10).json()["clusters"]
            if after["state"] == "ok" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        httpx.delete(f"{server.url}/api/jobs/{job_id}", timeout=10)
    assert before == [{"name": "local", "scheduler": "local", "delivery": "http",
                       "link": "ssh", "state": "unknown", "since": None, "last_error": "",
                       "checked": None, "flavour": "", "version": ""}]
    assert after["state"] == "ok" and after["checked"] >= after["since"] > 0
    assert (after["flavour"], after["version"]) == ("", "")  # not a batch system


def test_the_clusters_route_needs_a_key(tmp_path: Path) -> None:
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"api_keys": [hash_api_key("k")]})
    with running(server):
        refused = httpx.get(f"{server.url}/api/clusters", timeout=10)
        allowed = httpx.get(f"{server.url}/api/clusters", timeout=10,
                            headers={"Authorization": "Bearer k"})
    assert refused.status_code == 401
    assert allowed.status_code == 200 and allowed.json()["clusters"][0]["name"] == "local"
