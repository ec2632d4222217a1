"""The spool reader: one cluster's spools, read with one command per poll, appended
through the normal path (docs/spool.md).

The cursors live in the backend, and an event is appended before its cursor moves: a
server that dies in between reads the event again, and its idempotency id drops it. So
a restarted server, or the process that takes over the cluster's lease, goes on without
loss and without duplicates.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio

from metis_stream.backends.contract import AppendResult, Backend
from metis_stream.errors import EventLimitReached, JobEnded, JobNotFound
from metis_stream.events import NewEvent
from metis_stream.jobs import Job
from metis_stream.metrics import Metrics
from metis_stream.schedulers.base import Scheduler
from metis_stream.spool import SpoolChunk, SpoolCursor, SpoolRead, read_request, take

logger = logging.getLogger(__name__)

MAX_DRAIN_READS = 64
"""Reads of one ended job's spool before the monitor judges it anyway: a spool that keeps
growing after its job ended is someone else's doing."""

Ingest = Callable[[str, Sequence[NewEvent]], Awaitable[AppendResult]]
Report = Callable[[str, list[str]], Awaitable[None]]


class SpoolReader:
    """Reads the spools of one cluster's live jobs. ``ingest`` appends a job's events as
    the job's own (counted as arrived by the spool); ``report`` tells a job's watchers
    what of its spool was skipped."""

    def __init__(self, backend: Backend, scheduler: Scheduler, ingest: Ingest, report: Report,
                 *, max_bytes: int, max_event_bytes: int, metrics: Metrics) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._ingest = ingest
        self._report = report
        self._max_bytes = max_bytes
        self._max_event_bytes = max_event_bytes
        self._metrics = metrics
        self._lock = anyio.Lock()
        self._caught_up = time.monotonic()
        metrics.gauge("metis_spool_lag_seconds", self.lag, cluster=scheduler.name)

    def lag(self) -> float:
        """Seconds since a read left no spool behind: about the read interval while the
        reader keeps up; more when it cannot reach the cluster or falls behind."""
        return time.monotonic() - self._caught_up

    async def read(self, jobs: Sequence[Job]) -> bool:
        """Read the new lines of these jobs' spools once; True when any spool had any."""
        live = [job for job in jobs if job.scheduler_id and not job.state.terminal]
        if not live:
            self._caught_up = time.monotonic()
            return False
        async with self._lock:
            return await self._read(live)

    async def remove_old(self, keep_seconds: float) -> None:
        """Remove the spools kept past ``spool_keep`` (docs/spool.md, "Cleanup")."""
        await self._scheduler.remove_old_spools(keep_seconds)

    async def drain(self, job: Job) -> None:
        """Read an ended job's spool to its end: what it holds comes before the monitor
        judges how the job ended."""
        for _ in range(MAX_DRAIN_READS):
            if not await self.read([await self._backend.get_job(job.id)]):
                return

    async def _read(self, jobs: list[Job]) -> bool:
        cursors = await self._backend.spool_cursors([job.id for job in jobs])
        # Each job's share of the bound, and never less than one whole event: one chatty
        # job cannot starve the others, and the largest event still gets through.
        share = max(self._max_bytes // len(jobs), self._max_event_bytes + 1)
        reads = {job.id: read_request(job.id, cursors.get(job.id, SpoolCursor()), share)
                 for job in jobs}
        frames = await self._scheduler.read_spools(list(reads.values()))
        self._metrics.count("metis_spool_reads_total", cluster=self._scheduler.name)
        for problem in frames.problems:
            logger.warning("spool reader of cluster %s: %s", self._scheduler.name, problem)
        behind = not frames.whole or bool(frames.problems)
        for chunk in frames.chunks:
            self._metrics.count("metis_spool_bytes_total", len(chunk.data),
                                cluster=self._scheduler.name)
            cursor = cursors.get(chunk.job_id, SpoolCursor())
            await self._take(chunk, cursor)
            behind = behind or _cut_short(chunk, reads[chunk.job_id])
        if not behind:
            self._caught_up = time.monotonic()
        return bool(frames.chunks)

    async def _take(self, chunk: SpoolChunk, cursor: SpoolCursor) -> None:
        taken = take(chunk, cursor, self._max_event_bytes)
        if taken.damage:
            logger.warning("job %s: spool: %s", chunk.job_id, "; ".join(taken.damage))
            self._metrics.count("metis_spool_damage_total", cluster=self._scheduler.name)
            await self._report(chunk.job_id, taken.damage)
        if taken.events:
            await self._append(chunk.job_id, taken.events)
        with contextlib.suppress(JobNotFound):  # expired meanwhile: nothing to read it for
            await self._backend.set_spool_cursor(chunk.job_id, taken.cursor)

    async def _append(self, job_id: str, events: list[NewEvent]) -> None:
        """Append, dropping what the job's log refuses, as it refuses it from HTTP: after
        the job's end, or past its budget (a terminal event is still taken there)."""
        try:
            await self._ingest(job_id, events)
            return
        except JobEnded:
            return  # what HTTP delivered is dropped by id first; the rest came too late
        except EventLimitReached:
            pass
        for event in events:  # the batch is all or nothing: take what still fits
            try:
                await self._ingest(job_id, [event])
            except (JobEnded, EventLimitReached) as exc:
                logger.info("job %s: spool event %s refused: %s", job_id, event.id, exc)


def _cut_short(chunk: SpoolChunk, read: SpoolRead) -> bool:
    """Whether the reader stopped at the bound before the spool's end."""
    return chunk.start + len(chunk.data) < chunk.size and len(chunk.data) >= read.max_bytes
