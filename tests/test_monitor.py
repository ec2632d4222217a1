"""Unit tests of metis_stream.monitor: reconcile (pure), and the spool reader's schedule."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import cast

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.backends.memory import MemoryBackend
from metis_stream.events import Event, NewEvent, parse_new_event
from metis_stream.jobs import ACTIVE_STATES, TERMINAL_STATES, Job, JobState, apply_event
from metis_stream.monitor import MISSES_BEFORE_VANISHED, Monitor, reconcile
from metis_stream.schedulers.base import JobFiles, Scheduler, SchedulerStatus
from metis_stream.spool_reader import SpoolReader

S = JobState
ENDED = SchedulerStatus("ended", exit_status=271, detail="F")
RUNNING = SchedulerStatus("running", detail="R")
QUEUED = SchedulerStatus("queued", detail="Q")


def job_in(state: JobState) -> Job:
    return Job(id="j_01HX3ZJ5K1ABCDEFGHJKMNPQRS", template="t", cluster="c", state=state,
               scheduler_id="42.pbs", last_seq=3)


def test_vanished_needs_the_documented_number_of_misses():
    assert MISSES_BEFORE_VANISHED >= 2  # one miss may be a job not listed yet


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_not_listed_is_nothing_until_enough_misses(state):
    for misses in range(MISSES_BEFORE_VANISHED):
        assert reconcile(job_in(state), None, misses) == []


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
@pytest.mark.parametrize("extra", [0, 1, 10])
def test_vanished_after_enough_misses_is_fatal(state, extra):
    events = reconcile(job_in(state), None, MISSES_BEFORE_VANISHED + extra)
    assert len(events) == 1
    event = events[0]
    assert event.type == "fatal"
    assert event.terminal
    assert "vanished" in event.data["error"]
    assert event.data["scheduler_state"] == "unknown"


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_ended_without_terminal_event_is_fatal_with_what_the_scheduler_knows(state):
    events = reconcile(job_in(state), ENDED, 0)
    assert events == [NewEvent("fatal", {
        "error": "the job ended without reporting completion: F",
        "exit_status": 271, "scheduler_state": "F"})]


def test_ended_with_unknown_exit_status():
    [event] = reconcile(job_in(S.RUNNING), SchedulerStatus("ended", detail="TIMEOUT"), 0)
    assert event.data["exit_status"] is None
    assert "TIMEOUT" in event.data["error"]


@pytest.mark.parametrize("state", [S.CREATED, S.SUBMITTING, S.QUEUED])
def test_running_is_reported_when_the_job_has_not_said_so(state):
    assert reconcile(job_in(state), RUNNING, 0) == [NewEvent("running", {"source": "scheduler"})]


def test_running_is_not_repeated_once_the_job_runs():
    assert reconcile(job_in(S.RUNNING), RUNNING, 0) == []


@pytest.mark.parametrize("state", sorted(ACTIVE_STATES))
def test_queued_changes_nothing(state):
    assert reconcile(job_in(state), QUEUED, 0) == []


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("status", [None, ENDED, RUNNING, QUEUED])
@pytest.mark.parametrize("misses", [0, MISSES_BEFORE_VANISHED, 99])
def test_nothing_for_terminal_jobs(state, status, misses):
    assert reconcile(job_in(state), status, misses) == []


def test_the_events_are_ones_the_server_may_append_and_drive_the_job():
    job = job_in(S.QUEUED)
    [running] = reconcile(job, RUNNING, 0)
    assert parse_new_event({"type": running.type, "data": running.data}) == running
    apply_event(job, Event(job.id, 4, running.type, running.data, 10.0))
    assert job.state == "running"
    [fatal] = reconcile(job, ENDED, 0)
    apply_event(job, Event(job.id, 5, fatal.type, fatal.data, 11.0))
    assert job.state is S.FAILED
    assert job.exit_status == 271
    assert job.error == "the job ended without reporting completion: F"
    assert job.ended == 11.0
    assert reconcile(job, ENDED, 0) == []


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(S)), st.sampled_from([None, ENDED, RUNNING, QUEUED]),
       st.integers(0, 5))
def test_at_most_one_event_and_only_fatal_or_running(state, status, misses):
    events = reconcile(job_in(state), status, misses)
    assert len(events) <= 1
    for event in events:
        assert event.type in ("fatal", "running")
        assert not state.terminal
        if event.type == "running":
            assert status is RUNNING
            assert state.rank < S.RUNNING.rank
        else:
            assert status is ENDED or (status is None and misses >= MISSES_BEFORE_VANISHED)


# What the job's folder says (the launcher's exit file, the end of stderr)

TRACEBACK = (b"partial line of an earlier one\nTraceback (most recent call last):\n"
             b'  File "train.py", line 3, in <module>\n'
             b"ValueError: bad input\n")


def test_an_ended_job_gets_its_real_status_and_last_stderr_lines():
    files = JobFiles(exit=b"1\n", stderr_tail=TRACEBACK, stderr_cut=True)
    [event] = reconcile(job_in(S.RUNNING), ENDED, 0, files, tail_lines=2)
    assert event == NewEvent("fatal", {
        "error": "the job ended without reporting completion: F", "exit_status": 1,
        "scheduler_state": "F",
        "stderr_tail": ['  File "train.py", line 3, in <module>', "ValueError: bad input"]})


def test_a_walltime_kill_says_what_happened_in_words_and_the_signal():
    timeout = SchedulerStatus("ended", None, "TIMEOUT, TimeLimit, ExitCode=0:15",
                              "killed: ran past its 00:30:00 walltime")
    files = JobFiles(exit=b"143 SIGTERM\n", stderr_tail=b"epoch 3\nslow\n")
    [event] = reconcile(job_in(S.RUNNING), timeout, 0, files)
    assert event.data == {
        "error": "killed: ran past its 00:30:00 walltime",
        "exit_status": 143, "signal": "SIGTERM",
        "scheduler_state": "TIMEOUT, TimeLimit, ExitCode=0:15",
        "stderr_tail": ["epoch 3", "slow"]}


class NeverRuns:
    """A cluster that holds one job that can never start; notes what is cancelled."""

    name = "c"
    poll_interval = 5.0
    shared = True
    flavour = None

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        return {"1.c": SchedulerStatus(
            "ended", None, "PENDING, DependencyNeverSatisfied",
            "will never run: a job it depends on did not end as required", never_runs=True)}

    async def cancel(self, scheduler_id: str) -> None:
        self.cancelled.append(scheduler_id)


async def test_a_job_that_can_never_run_is_cancelled_there_and_ends_fatal_here():
    backend, scheduler = MemoryBackend(), NeverRuns()

    async def append(job_id: str, events: list[NewEvent]) -> None:
        await backend.append(job_id, events)

    job = Job(id="j_01HX3ZJ5K1ABCDEFGHJKMNPQRS", template="t", cluster="c")
    await backend.create_job(job)
    await backend.append(job.id, [NewEvent("starting"), NewEvent("submitted", "1.c")])
    await Monitor(backend, cast(Scheduler, scheduler), append).poll_once()
    assert scheduler.cancelled == ["1.c"]
    events = await backend.read(job.id)
    assert events[-1].type == "fatal"
    assert (await backend.get_job(job.id)).state == S.FAILED
    assert events[-1].data == {
        "error": "will never run: a job it depends on did not end as required",
        "exit_status": None, "scheduler_state": "PENDING, DependencyNeverSatisfied"}


def test_a_vanished_job_ends_with_the_status_of_its_exit_file():
    files = JobFiles(exit=b"3\n", stderr_tail=b"")
    [event] = reconcile(job_in(S.RUNNING), None, MISSES_BEFORE_VANISHED, files)
    assert event == NewEvent("fatal", {
        "error": "the job is no longer known to the scheduler: the script exited with "
                 "status 3",
        "exit_status": 3, "scheduler_state": "unknown"})
    # Not before it counts as vanished.
    assert reconcile(job_in(S.RUNNING), None, MISSES_BEFORE_VANISHED - 1, files) == []


@pytest.mark.parametrize("status", [None, ENDED])
def test_a_job_whose_script_succeeded_completes(status):
    files = JobFiles(exit=b"0\n", stderr_tail=b"warning: nothing\n")
    [event] = reconcile(job_in(S.RUNNING), status, MISSES_BEFORE_VANISHED, files)
    assert event.type == "completed"
    assert event.data["exit_status"] == 0
    assert event.data["source"] == "monitor"


def test_without_an_exit_file_the_scheduler_s_word_stands():
    files = JobFiles(exit=None, stderr_tail=b"Killed\n")
    [event] = reconcile(job_in(S.RUNNING), ENDED, 0, files)
    assert event.data == {"error": "the job ended without reporting completion: F",
                          "exit_status": 271, "scheduler_state": "F",
                          "stderr_tail": ["Killed"]}
    [event] = reconcile(job_in(S.RUNNING), ENDED, 0, JobFiles(exit=b"garbage"))
    assert event.data["exit_status"] == 271


def test_a_job_that_has_ended_is_left_alone_whatever_its_files_say():
    for state in TERMINAL_STATES:
        assert reconcile(job_in(state), ENDED, 0, JobFiles(exit=b"0\n")) == []


# The spool reader's schedule (Monitor._read_spools_forever)


class FindsNothing:
    """Stands in for the SpoolReader: notes when it read which jobs, finds nothing new."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, int]] = []

    async def read(self, jobs: Sequence[Job]) -> bool:
        self.reads.append((time.monotonic(), sum(1 for job in jobs if job.scheduler_id)))
        return False


class QuietScheduler:
    name = "c"
    poll_interval = 5.0
    shared = False

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        return {}


async def test_the_reader_backs_off_only_while_reads_find_nothing_not_while_no_job_is_live():
    """With no live job there is no read, and nothing to back off from: a job that comes
    after an idle while is read within spool_interval, not after up to poll_interval."""
    backend, reader = MemoryBackend(), FindsNothing()

    async def append(job_id: str, events: list[NewEvent]) -> None:
        await backend.append(job_id, events)

    monitor = Monitor(backend, cast(Scheduler, QuietScheduler()), append,
                      spool=cast(SpoolReader, reader), spool_interval=0.02)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(monitor.run)
        await anyio.sleep(1.0)
        idle = len(reader.reads)
        job = Job(id="j_01HX3ZJ5K1ABCDEFGHJKMNPQRS", template="t", cluster="c")
        await backend.create_job(job)
        await backend.append(job.id, [NewEvent("starting"), NewEvent("submitted", "1.c")])
        added = time.monotonic()
        await anyio.sleep(1.0)
        tasks.cancel_scope.cancel()
    # Every 0.02 s while idle; backing off, 5 reads would have reached 0.62 s.
    assert idle >= 20, reader.reads
    first = next(at for at, jobs in reader.reads if jobs)
    assert first - added < 0.2
    # A live job whose reads find nothing: 0.02, 0.04, ... 1.28 s: 6 reads at most.
    assert sum(1 for _, jobs in reader.reads if jobs) <= 7
