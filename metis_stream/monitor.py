"""The monitor: reconcile the job database with what each scheduler knows.

The job's own callback is the fast path; this is the safety net. A job that
the scheduler says has ended (walltime kill, node failure, ``qdel`` by an
admin), or no longer knows, but that never reported a terminal event gets a
``fatal`` event with what the scheduler knows and what the job's folder says: the
script's real exit status (the launcher's ``exit`` file) and its last lines of
stderr.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio

from metis_stream.arrays import reconcile_array
from metis_stream.backends.contract import Backend
from metis_stream.clusters import (
    CAUSES,
    RECOVERED,
    STALE,
    ClusterHealth,
    after_poll,
    recovered,
    state_of_failure,
    went_stale,
)
from metis_stream.errors import MetisError
from metis_stream.events import NewEvent
from metis_stream.jobs import ACTIVE_STATES, Job, JobState
from metis_stream.launcher import parse_exit, tail_lines
from metis_stream.schedulers.base import JobFiles, Scheduler, SchedulerStatus
from metis_stream.shells.base import TakesLogin
from metis_stream.spool_reader import SpoolReader
from metis_stream.templates import DEFAULT_STDERR_TAIL_LINES

logger = logging.getLogger(__name__)

SPOOL_SWEEP_INTERVAL = 600.0
"""Seconds between removals of spools kept past ``spool_keep``."""

DRAIN_FAILURES_BEFORE_JUDGING = 3
"""Polls in a row an ended job's spool may fail to be read before the job is judged on
the scheduler's word and its folder's files alone."""

MISSES_BEFORE_VANISHED = 2
"""Polls in a row a job may be missing from the scheduler before it counts as gone:
one miss can be a job that the scheduler has not listed yet."""


def has_ended(job: Job, status: SchedulerStatus | None, misses: int) -> bool:
    """Whether the scheduler says that ``job``, which has not reported its end, ended:
    then its folder is read for the truth (:func:`reconcile`'s ``files``)."""
    if job.state.terminal:
        return False
    if status is None:
        return misses >= MISSES_BEFORE_VANISHED
    return status.state == "ended"


def reconcile(job: Job, status: SchedulerStatus | None, misses: int,
              files: JobFiles | None = None,
              tail_lines: int = DEFAULT_STDERR_TAIL_LINES) -> list[NewEvent]:
    """The events that bring ``job`` in line with the scheduler's view of it, and with
    its folder's ``files`` when the scheduler says it ended: the launcher's ``exit``
    file has the script's own status (a job whose launcher could not report it, one
    that the scheduler no longer remembers), and ``fatal`` carries the last lines of
    its stderr."""
    if not has_ended(job, status, misses):
        if (status is not None and status.state == "running"
                and job.state.rank < JobState.RUNNING.rank):
            return [NewEvent("running", {"source": "scheduler"})]
        return []
    record = parse_exit(files.exit) if files is not None else None
    stderr = tail_lines_of(files, tail_lines)
    if status is None:
        scheduler_state = "unknown"
        error = "the job vanished from the scheduler without reporting an outcome"
        if record is not None:
            error = f"the job is no longer known to the scheduler: {record.describe()}"
    else:
        scheduler_state = status.detail
        error = status.outcome or (
            f"the job ended without reporting completion: {status.detail}")
    if record is not None and record.status == 0:
        return [NewEvent("completed", {"exit_status": 0, "source": "monitor",
                                       "scheduler_state": scheduler_state})]
    data: dict[str, object] = {"error": error}
    if record is not None:
        data.update(record.as_data())
    elif status is not None:
        data["exit_status"] = status.exit_status
    data["scheduler_state"] = scheduler_state
    if stderr:
        data["stderr_tail"] = stderr
    return [NewEvent("fatal", data)]


def tail_lines_of(files: JobFiles | None, count: int) -> list[str]:
    if files is None:
        return []
    return tail_lines(files.stderr_tail, count, cut=files.stderr_cut)


Appender = Callable[[str, list[NewEvent]], Awaitable[None]]
TailLines = Callable[[Job], int]
"""How many lines of stderr a job's ``fatal`` carries (its template says)."""


class Monitor:
    """Polls one scheduler for all of its live jobs, every ``poll_interval`` seconds, and
    with a ``spool`` reader reads their spools every ``spool_interval`` (backing off to
    ``poll_interval`` while nothing changes).

    With several server processes on one backend, a lease makes only one of them
    poll each cluster at a time.
    """

    def __init__(self, backend: Backend, scheduler: Scheduler, append: Appender,
                 tail_lines: TailLines = lambda job: DEFAULT_STDERR_TAIL_LINES, *,
                 spool: SpoolReader | None = None, spool_interval: float = 1.0,
                 spool_keep: float = 0.0) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._append = append
        self._tail_lines = tail_lines
        self._spool = spool
        self._spool_interval = spool_interval
        self._spool_keep = spool_keep
        self._misses: dict[str, int] = {}
        self._drain_failures: dict[str, int] = {}
        self._health: ClusterHealth | None = None
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            if self._spool is not None:
                tasks.start_soon(self._read_spools_forever, self._spool)
                if self._spool_keep > 0:
                    tasks.start_soon(self._remove_old_spools_forever, self._spool)
            await self._poll_forever()

    async def _poll_forever(self) -> None:
        interval = self._scheduler.poll_interval
        while True:
            try:
                if await self._leading():
                    await self.poll_once()
            except MetisError as exc:
                # Logged with the cluster's change of health; each poll of an outage
                # would only repeat it.
                logger.debug("monitor of cluster %s: poll failed: %s", self._scheduler.name,
                             exc)
            except Exception:
                logger.exception("monitor of cluster %s: poll failed", self._scheduler.name)
            await anyio.sleep(interval)

    async def _read_spools_forever(self, spool: SpoolReader) -> None:
        interval = self._spool_interval
        while True:
            changed = idle = False
            try:
                if await self._leading():
                    jobs = await self._live_jobs()
                    idle = not any(job.scheduler_id for job in jobs)
                    changed = await spool.read(jobs)
            except Exception as exc:
                if isinstance(exc, MetisError) and (
                        (self._health is not None and self._health.state != "ok")
                        or state_of_failure(exc) == "login_needed"):
                    # Logged with the cluster's change of health (the poll's); each read
                    # of an outage would only repeat it, with a traceback.
                    logger.debug("spool reader of cluster %s: read failed: %s",
                                 self._scheduler.name, exc)
                else:
                    logger.exception("spool reader of cluster %s: read failed",
                                     self._scheduler.name)
            # Only a read that found nothing backs off: with no job to read, the next job
            # is looked for every spool_interval, or its first events would wait for a
            # reader that backed off while the cluster was idle (up to poll_interval).
            interval = self._spool_interval if changed or idle else min(
                interval * 2, max(self._scheduler.poll_interval, self._spool_interval))
            await anyio.sleep(interval)

    async def _remove_old_spools_forever(self, spool: SpoolReader) -> None:
        while True:
            try:
                if await self._leading():
                    await spool.remove_old(self._spool_keep)
            except Exception:
                logger.exception("cluster %s: removing old spools failed", self._scheduler.name)
            await anyio.sleep(SPOOL_SWEEP_INTERVAL)

    async def _leading(self) -> bool:
        """Whether this process polls the cluster now (it alone, when the cluster is shared)."""
        ttl = max(3 * self._scheduler.poll_interval, 5.0)
        return not self._scheduler.shared or await self._backend.hold_lease(
            f"monitor:{self._scheduler.name}", self._owner, ttl=ttl)

    async def _live_jobs(self) -> list[Job]:
        return await self._backend.list_jobs(states=ACTIVE_STATES,
                                             cluster=self._scheduler.name, limit=10_000)

    async def poll_once(self) -> None:
        jobs = {job.scheduler_id: job for job in await self._live_jobs() if job.scheduler_id}
        if not jobs:
            # Nothing to ask, and nothing to be stale about; but a lost login is shown all
            # the same, before a submission meets it.
            await self._note_login([])
            return
        try:
            statuses = await self._scheduler.poll(list(jobs))
        except Exception as exc:
            # No job is judged from an outage: the poll stops here, and is taken up again
            # when the cluster answers (docs/clusters.md).
            await self._note_health(exc, list(jobs.values()))
            raise
        await self._note_health(None, list(jobs.values()))
        misses = {}
        for scheduler_id, job in jobs.items():
            status = statuses.get(scheduler_id)
            if status is None and not self._scheduler.shared:
                continue  # another server process's child, or one from before a restart
            misses[job.id] = 0 if status is not None else self._misses.get(job.id, 0) + 1
            files = None
            if job.array is not None:
                await self._reconcile_array(job, status, misses[job.id])
                continue
            if status is not None and status.never_runs and has_ended(job, status, 0):
                await self._cancel_never_runs(job, scheduler_id)
            elif has_ended(job, status, misses[job.id]):
                if self._spool is not None:
                    # What the job spooled before it ended may be how it ended.
                    if not await self._drained(job):
                        continue
                    job = await self._backend.get_job(job.id)
                    if job.state.terminal:
                        continue
                try:
                    files = await self._scheduler.read_job_files(job.id)
                except MetisError as exc:
                    # The scheduler's word alone, then: the job must end either way.
                    logger.warning("monitor: job %s: %s", job.id, exc)
            events = reconcile(job, status, misses[job.id], files, self._tail_lines(job))
            if events:
                try:
                    await self._append(job.id, events)
                except MetisError as exc:
                    logger.info("monitor: job %s: %s", job.id, exc)
        self._misses = misses

    async def _reconcile_array(self, job: Job, status: SchedulerStatus | None,
                               misses: int) -> None:
        """An array's tally and, once the scheduler says it ended, its verdict, from its
        elements' exit files (metis_stream.arrays)."""
        try:
            exits = await self._scheduler.read_element_exits(job.id)
        except MetisError as exc:
            logger.warning("monitor: array %s: %s", job.id, exc)
            return  # judged at a later poll: an array must not fail for a read that failed
        events = reconcile_array(job, status, has_ended(job, status, misses), exits)
        if events:
            try:
                await self._append(job.id, events)
            except MetisError as exc:
                logger.info("monitor: array %s: %s", job.id, exc)

    async def _cancel_never_runs(self, job: Job, scheduler_id: str) -> None:
        """A job that can never start stays queued on the cluster (Slurm without
        ``kill_invalid_depend``): it is cancelled there before it is ended here."""
        try:
            await self._scheduler.cancel(scheduler_id)
        except MetisError as exc:
            # Ended here all the same: its user must not wait for a job that never starts.
            logger.warning("monitor: job %s can never run, and cancelling %s failed: %s",
                           job.id, scheduler_id, exc)

    async def check_login(self) -> None:
        """Note now whether the cluster waits for a login (docs/login.md): after a login
        opened its connection, its jobs' watchers hear that their news is fresh again
        without waiting for the next poll."""
        if await self._leading():
            await self._note_login(await self._live_jobs())

    async def _note_login(self, jobs: list[Job]) -> None:
        """``login_needed`` when the cluster's connection waits for a login, and back to
        ``ok`` when a login opened it; nothing to note on a cluster without logins."""
        if not isinstance(self._scheduler, TakesLogin):
            return
        needed = self._scheduler.needs_login()
        waiting = (await self._known_health(time.time())).state == "login_needed"
        if (needed is not None) != waiting:
            await self._note_health(needed, jobs)

    async def _known_health(self, now: float) -> ClusterHealth:
        """The cluster's health as this process last noted it, or as the backend keeps it
        (``ok`` since ``now`` when it keeps none)."""
        if self._health is None:
            kept = await self._backend.cluster_health()
            self._health = kept.get(self._scheduler.name,
                                    ClusterHealth(self._scheduler.name, "ok", since=now))
        return self._health

    async def _note_health(self, error: BaseException | None, jobs: list[Job]) -> None:
        """Keep the cluster's health after a poll; tell the watchers of its live jobs
        once that their news went stale, and once that it is fresh again."""
        now = time.time()
        before = await self._known_health(now)
        after = after_poll(before, error, now)
        detected = self._scheduler.flavour
        if detected is not None:
            after = replace(after, flavour=detected.flavour, version=detected.version)
        self._health = after
        await self._backend.set_cluster_health(after)
        if after.state != before.state:
            log = logger.info if after.state == "ok" else logger.warning
            log("cluster %s: %s (%s)", self._scheduler.name, after.state,
                after.last_error or "polls work again")
        news = None
        if went_stale(before, after):
            news = NewEvent(STALE, {"cluster": self._scheduler.name, "state": after.state,
                                    "cause": CAUSES[after.state]})
        elif recovered(before, after):
            news = NewEvent(RECOVERED, {"cluster": self._scheduler.name,
                                        "stale_for": round(now - before.since, 1)})
        if news is None:
            return
        for job in jobs:
            try:
                await self._append(job.id, [news])
            except MetisError as exc:
                logger.info("monitor: job %s: %s", job.id, exc)

    def health(self) -> ClusterHealth | None:
        """The cluster's health as this process last saw it (None before its first poll)."""
        return self._health

    async def _drained(self, job: Job) -> bool:
        """Whether the ended job's spool was read to its end (or could not be, polls in a
        row: then the scheduler's word must do, or the job would never end)."""
        assert self._spool is not None
        try:
            await self._spool.drain(job)
        except MetisError as exc:
            failures = self._drain_failures[job.id] = self._drain_failures.get(job.id, 0) + 1
            logger.warning("monitor: job %s: its spool could not be read (%d): %s", job.id,
                           failures, exc)
            if failures < DRAIN_FAILURES_BEFORE_JUDGING:
                return False
        self._drain_failures.pop(job.id, None)
        return True
