"""JobService with keys: a job keeps its creator's key name and its end user, the end user
reaches the scheduler in the job's name, and every job the service hands out is one the
asking key sees (a scheduler double that records what it is given)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import anyio
import pytest

from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import ClusterConfig, Config, ServerConfig
from metis_stream.errors import BadInput, JobNotFound
from metis_stream.jobs import JobState, new_job_id
from metis_stream.keys import ApiKey, Role
from metis_stream.schedulers.base import SchedulerStatus, Submission
from metis_stream.service import JobService
from metis_stream.templates import Template
from tests.support.schedulers import SchedulerDouble

A = ApiKey("a", "key-a", Role.CLIENT)
B = ApiKey("b", "key-b", Role.CLIENT)
OPS = ApiKey("ops", "key-ops", Role.ADMIN)


class Recording(SchedulerDouble):
    def __init__(self) -> None:
        self.submitted: list[Submission] = []

    async def submit(self, submission: Submission) -> str:
        self.submitted.append(submission)
        return f"{len(self.submitted)}.double"

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        # Queued for good: a job that the monitor moved on to running between two looks
        # of `queued` below was never seen queued (it failed so once under load).
        return {i: SchedulerStatus("queued") for i in scheduler_ids}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[JobService]:
    """A running service (a fixture's setup and teardown run in different tasks, which a
    task group does not allow)."""
    config = Config(server=ServerConfig(keys=(A, B, OPS)),
                    clusters={"double": ClusterConfig(name="double")},
                    templates={"t": Template(name="t", cluster="double")})
    service = JobService(config, MemoryBackend(), {"double": Recording()})
    async with anyio.create_task_group() as tasks:
        await service.run(tasks)
        yield service
        tasks.cancel_scope.cancel()


def recorded(service: JobService) -> list[Submission]:
    scheduler = service.schedulers["double"]
    assert isinstance(scheduler, Recording)
    return scheduler.submitted


async def queued(service: JobService, job_id: str) -> None:
    with anyio.fail_after(5):
        while (await service.get(job_id, seen_by=None)).state is not JobState.QUEUED:
            await anyio.sleep(0.01)


async def test_the_end_user_ends_the_jobs_name_on_the_cluster() -> None:
    async with serving() as service:
        await end_user_in_name(service)


async def end_user_in_name(service: JobService) -> None:
    job = await service.create("t", {}, [], client="c", owner="a", user="u-42")
    await queued(service, job.id)
    assert (job.owner, job.user) == ("a", "u-42")
    [submission] = recorded(service)
    assert submission.name == f"ms-{job.id[-12:]}-u-42"
    assert submission.user == "u-42"
    plain = await service.create("t", {}, [], client="c", owner="a")
    await queued(service, plain.id)
    assert recorded(service)[1].name == f"ms-{plain.id[-12:]}"
    assert recorded(service)[1].user is None


@pytest.mark.parametrize("user", [7, "", "a b", "a@b.c", "x" * 65, ["u"], {"id": "u"}])
async def test_a_bad_end_user_creates_nothing(user: object) -> None:
    async with serving() as service:
        with pytest.raises(BadInput, match="'user' must be 1 to 64 letters"):
            await service.create("t", {}, [], client="c", owner="a", user=user)
        assert await service.jobs(seen_by=OPS) == []
        assert recorded(service) == []


async def test_a_key_gets_only_the_jobs_it_sees() -> None:
    async with serving() as service:
        await only_what_it_sees(service)


async def only_what_it_sees(service: JobService) -> None:
    mine = await service.create("t", {}, [], client="c", owner="a", user="u1")
    theirs = await service.create("t", {}, [], client="c", owner="b", user="u1")
    await queued(service, mine.id)
    await queued(service, theirs.id)

    assert [job.id for job in await service.jobs(seen_by=A)] == [mine.id]
    assert [job.id for job in await service.jobs(seen_by=OPS)] == [theirs.id, mine.id]
    assert [job.id for job in await service.jobs(seen_by=OPS, user="u1")] == [theirs.id,
                                                                              mine.id]
    assert await service.jobs(seen_by=B, user="u2") == []
    with pytest.raises(BadInput):
        await service.jobs(seen_by=A, user="not an id")

    assert (await service.get(mine.id, seen_by=A)).id == mine.id
    assert (await service.get(theirs.id, seen_by=OPS)).id == theirs.id
    for job_id in (theirs.id, new_job_id()):
        with pytest.raises(JobNotFound) as unknown:
            await service.get(job_id, seen_by=A)
        assert unknown.value.message == "unknown job"
        with pytest.raises(JobNotFound):
            await service.cancel(job_id, seen_by=A)
    assert (await service.get(theirs.id, seen_by=None)).state is JobState.QUEUED
    assert (await service.cancel(theirs.id, seen_by=OPS)).state is JobState.CANCELLED
