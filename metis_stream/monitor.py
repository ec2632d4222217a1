"""The monitor: reconcile the job database with what each scheduler knows.

The job's own callback is the fast path; this is the safety net. A job that
the scheduler says has ended (walltime kill, node failure, ``qdel`` by an
admin) but that never reported a terminal event gets a ``fatal`` event with
what the scheduler knows.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable

import anyio

from metis_stream.backends.contract import Backend
from metis_stream.errors import MetisError
from metis_stream.events import NewEvent
from metis_stream.jobs import ACTIVE_STATES, Job, JobState
from metis_stream.schedulers.base import Scheduler, SchedulerStatus

logger = logging.getLogger(__name__)

MISSES_BEFORE_VANISHED = 2
"""Polls in a row a job may be missing from the scheduler before it counts as gone:
one miss can be a job that the scheduler has not listed yet."""


def reconcile(job: Job, status: SchedulerStatus | None, misses: int) -> list[NewEvent]:
    """The events that bring ``job`` in line with the scheduler's view of it."""
    if job.state.terminal:
        return []
    if status is None:
        if misses < MISSES_BEFORE_VANISHED:
            return []
        return [NewEvent("fatal", {"error": "the job vanished from the scheduler "
                                            "without reporting an outcome",
                                   "scheduler_state": "unknown"})]
    if status.state == "ended":
        return [NewEvent("fatal", {
            "error": f"the job ended without reporting completion: {status.detail}",
            "exit_status": status.exit_status,
            "scheduler_state": status.detail,
        })]
    if status.state == "running" and job.state.rank < JobState.RUNNING.rank:
        return [NewEvent("running", {"source": "scheduler"})]
    return []


Appender = Callable[[str, list[NewEvent]], Awaitable[None]]


class Monitor:
    """Polls one scheduler for all of its live jobs, every ``poll_interval`` seconds.

    With several server processes on one backend, a lease makes only one of them
    poll each cluster at a time.
    """

    def __init__(self, backend: Backend, scheduler: Scheduler, append: Appender) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._append = append
        self._misses: dict[str, int] = {}
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"

    async def run(self) -> None:
        interval = self._scheduler.poll_interval
        while True:
            try:
                if not self._scheduler.shared or await self._backend.hold_lease(
                        f"monitor:{self._scheduler.name}", self._owner,
                        ttl=max(3 * interval, 5.0)):
                    await self.poll_once()
            except Exception:
                logger.exception("monitor of cluster %s: poll failed", self._scheduler.name)
            await anyio.sleep(interval)

    async def poll_once(self) -> None:
        jobs = {job.scheduler_id: job for job in await self._backend.list_jobs(
                    states=ACTIVE_STATES, cluster=self._scheduler.name, limit=10_000)
                if job.scheduler_id}
        statuses = await self._scheduler.poll(list(jobs)) if jobs else {}
        misses = {}
        for scheduler_id, job in jobs.items():
            status = statuses.get(scheduler_id)
            if status is None and not self._scheduler.shared:
                continue  # another server process's child, or one from before a restart
            misses[job.id] = 0 if status is not None else self._misses.get(job.id, 0) + 1
            events = reconcile(job, status, misses[job.id])
            if events:
                try:
                    await self._append(job.id, events)
                except MetisError as exc:
                    logger.info("monitor: job %s: %s", job.id, exc)
        self._misses = misses
