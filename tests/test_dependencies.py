"""Dependencies: ``after`` and ``after_any`` of a submission, from the request's metis ids
to the scheduler's ``-W depend=`` and ``--dependency=`` (JobService over a scheduler
double, the dialects' pure command building); the test cluster runs them for real in
tests/test_scheduler_truth_cluster.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import ClusterConfig, Config, ServerConfig
from metis_stream.errors import BadInput, JobNotFound, UnsafeValue
from metis_stream.events import NewEvent
from metis_stream.jobs import Job, JobState
from metis_stream.keys import ApiKey
from metis_stream.schedulers import pbs, slurm
from metis_stream.schedulers.base import Submission
from metis_stream.schedulers.dialect import JobRequest
from metis_stream.service import JobService
from metis_stream.templates import Template
from tests.support.samples import ok
from tests.support.schedulers import SchedulerDouble


def request(**dependencies: tuple[str, ...]) -> JobRequest:
    return JobRequest(name="ms-x", script="/h/run.sh", stdout="/h/o", stderr="/h/e",
                      **dependencies)  # type: ignore[arg-type]


def test_pbs_and_slurm_take_the_dependencies_on_their_command_lines() -> None:
    argv = pbs.submit_command(request(after=("15.pbs01", "16.pbs01"),
                                      after_any=("17.pbs01",))).argv
    assert argv[argv.index("-W") + 1] == "depend=afterok:15.pbs01:16.pbs01,afterany:17.pbs01"
    argv = slurm.submit_command(request(after_any=("17",))).argv
    assert "--dependency=afterany:17" in argv
    assert not any(arg.startswith(("-W", "--dependency"))
                   for arg in slurm.submit_command(request()).argv)


def test_a_dependency_that_is_not_a_job_id_never_reaches_the_cluster() -> None:
    with pytest.raises(UnsafeValue, match="dependency job id"):
        slurm.submit_command(request(after=("1;id",)))


def test_a_pending_job_behind_the_wrappers_is_asked_of_scontrol() -> None:
    """Slurm's qstat shows Q without a reason: a job that can never start would wait for
    ever, so scontrol is asked (only when the flavour is Slurm)."""
    text = "Job Id:\t5\n\tjob_state = Q\n"
    assert pbs.parse_qstat_text_result(ok(text), ["5"], "slurm").follow_up == ("5",)
    assert pbs.parse_qstat_text_result(ok(text), ["5"], "torque").follow_up == ()
    show = ok("JobId=5 JobName=x JobState=PENDING Reason=DependencyNeverSatisfied "
              "Dependency=afterok:4(failed) ExitCode=0:0\n")
    status = slurm.parse_scontrol_result(show, ["5"]).statuses["5"]
    assert (status.state, status.never_runs) == ("ended", True)


class Recording(SchedulerDouble):
    name = "hpc"

    def __init__(self) -> None:
        self.submitted: list[Submission] = []

    async def submit(self, submission: Submission) -> str:
        self.submitted.append(submission)
        return f"{len(self.submitted)}.hpc"


@asynccontextmanager
async def running(scheduler: Recording) -> AsyncIterator[JobService]:
    config = Config(server=ServerConfig(insecure_no_auth=True),
                    clusters={"hpc": ClusterConfig(name="hpc", scheduler="pbs"),
                              "other": ClusterConfig(name="other", scheduler="pbs"),
                              "here": ClusterConfig(name="here")},
                    templates={"t": Template(name="t", cluster="hpc"),
                               "o": Template(name="o", cluster="other"),
                               "l": Template(name="l", cluster="here")})
    schedulers = {"hpc": scheduler, "other": Recording(), "here": Recording()}
    service = JobService(config, MemoryBackend(), schedulers)
    async with anyio.create_task_group() as tasks:
        await service.run(tasks)
        yield service
        tasks.cancel_scope.cancel()


async def settled(service: JobService, job_id: str) -> Job:
    with anyio.fail_after(5):
        while (job := await service.get(job_id, seen_by=None)).state in (
                JobState.CREATED, JobState.SUBMITTING):
            await anyio.sleep(0.01)
    return job


async def test_the_metis_ids_become_the_parents_scheduler_ids() -> None:
    scheduler = Recording()
    async with running(scheduler) as service:
        first = await service.create("t", {}, [], client="c")
        second = await service.create("t", {}, [], client="c")
        # Right after its parents: their submission may still be under way.
        child = await service.create("t", {}, [], client="c", after=[first.id],
                                     after_any=[second.id, second.id])
        await settled(service, child.id)
    [third] = [s for s in scheduler.submitted if s.job_id == child.id]
    ids = {s.job_id: f"{n}.hpc" for n, s in enumerate(scheduler.submitted, 1)}
    assert (third.after, third.after_any) == ((ids[first.id],), (ids[second.id],))


async def test_a_parent_that_failed_here_ends_its_child_before_it_reaches_the_cluster() -> None:
    scheduler = Recording()
    async with running(scheduler) as service:
        parent = await service.create("t", {}, [], client="c")
        await settled(service, parent.id)
        await service.backend.append(parent.id, [NewEvent("fatal", {"error": "x"})])
        ended = await service.create("t", {}, [], client="c", after_any=[parent.id])
        child = await service.create("t", {}, [], client="c", after=[parent.id])
        job = await settled(service, child.id)
        await settled(service, ended.id)
        history = await service.history(child.id)
    assert job.state is JobState.FAILED
    assert history[-1].data == {"error": f"will never run: job {parent.id} it depends on failed"}
    assert [s.job_id for s in scheduler.submitted] == [parent.id, ended.id]
    # after_any: an ended parent counts as met, and the scheduler is not asked about it.
    assert scheduler.submitted[-1].after_any == ()


@pytest.mark.parametrize(
    ("template", "after", "error", "match"),
    [
        ("t", ["j_01HX0000000000000000000000"], JobNotFound, "unknown job"),
        ("o", "PARENT", BadInput, "only for jobs of its own cluster"),
        ("l", "PARENT", BadInput, "need a batch cluster"),
        ("t", "j_1", BadInput, "must be a list of job ids"),
        ("t", [1], BadInput, "must be a list of job ids"),
        ("t", ["j_1"] * 65, BadInput, "at most 64"),
    ],
)
async def test_a_dependency_that_cannot_be_is_refused_and_records_nothing(
        template: str, after: object, error: type[Exception], match: str) -> None:
    async with running(Recording()) as service:
        parent = await service.create("t", {}, [], client="c")
        before = await service.jobs(seen_by=None)
        with pytest.raises(error, match=match):
            await service.create(template, {}, [], client="c",
                                 after=[parent.id] if after == "PARENT" else after)
        assert await service.jobs(seen_by=None) == before


async def test_another_keys_job_is_unknown_as_elsewhere() -> None:
    alice, bob = ApiKey("alice", "a"), ApiKey("bob", "b")
    async with running(Recording()) as service:
        parent = await service.create("t", {}, [], client="c", owner="alice")
        with pytest.raises(JobNotFound):
            await service.create("t", {}, [], client="c", owner="bob", after=[parent.id],
                                 seen_by=bob)
        child = await service.create("t", {}, [], client="c", owner="alice",
                                     after=[parent.id], seen_by=alice)
    assert child.state is not JobState.FAILED
