"""A cancel kills the job and then says so: the monitor, which meanwhile sees the job
die, must not take the death for the job's own failure (JobService, a real monitor, a
scheduler double that dies slowly)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anyio

from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import ClusterConfig, Config, ServerConfig
from metis_stream.jobs import JobState
from metis_stream.schedulers.base import JobFiles, SchedulerStatus
from metis_stream.service import JobService
from metis_stream.templates import Template
from tests.support.schedulers import SchedulerDouble


class SlowToCancel(SchedulerDouble):
    """A scheduler whose job is dead as soon as the cancel begins, and whose cancel
    returns only after the monitor has polled it several times."""

    name = "slow"

    def __init__(self) -> None:
        self.killed = False
        self.polls_after_kill = 0

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        if not self.killed:
            return {i: SchedulerStatus("running") for i in scheduler_ids}
        self.polls_after_kill += 1
        return {i: SchedulerStatus("ended", 143, "killed: Terminated") for i in scheduler_ids}

    async def cancel(self, scheduler_id: str) -> None:
        self.killed = True
        with anyio.move_on_after(2):  # a monitor that judged the job polls it no more
            while self.polls_after_kill < 5:
                await anyio.sleep(0.01)

    async def read_job_files(self, job_id: str) -> JobFiles:
        return JobFiles(exit=b"143 SIGTERM\n")


async def test_a_cancelled_job_ends_cancelled_however_fast_the_monitor_sees_it_die() -> None:
    scheduler = SlowToCancel()
    config = Config(server=ServerConfig(insecure_no_auth=True),
                    clusters={"slow": ClusterConfig(name="slow")},
                    templates={"t": Template(name="t", cluster="slow")})
    service = JobService(config, MemoryBackend(), {"slow": scheduler})
    async with anyio.create_task_group() as tasks:
        await service.run(tasks)
        job = await service.create("t", {}, [], client="test")
        with anyio.fail_after(5):
            while (await service.get(job.id, seen_by=None)).state is not JobState.QUEUED:
                await anyio.sleep(0.01)
        cancelled = await service.cancel(job.id, seen_by=None)
        tasks.cancel_scope.cancel()
    assert scheduler.polls_after_kill >= 5, "the monitor saw the job dead meanwhile"
    assert cancelled.state is JobState.CANCELLED
    events = await service.history(job.id)
    assert [event.type for event in events] == ["starting", "submitted", "cancelled"]
