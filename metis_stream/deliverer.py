"""The deliverer: sends one webhook's events, in order per job, until each has arrived.

Every server process runs one per webhook, and only the holder of the webhook's lease
sends; the others wait to take over. The sender reads the backend's journal of appends
from its cursor, and each job's events from its log, and keeps how far it got with each
job (``HookProgress``) in the backend, so that a restart, or another process taking
over, resumes there: at least once, never skipping, the same ``webhook-id`` on a repeat.

A job's events go one at a time, in order; a failing job waits its backoff while the
webhook's other jobs go on, at most ``MAX_IN_FLIGHT`` requests at once. Once a job's
deliveries have failed for the webhook's ``retry_period``, its undelivered events become
dead letters (one attempt each) until a delivery succeeds again. The deliverer runs in
the service's task group, apart from ingest: a slow or dead receiver delays only its own
webhook. docs/webhooks.md has the whole story.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import anyio
import httpx
from anyio.abc import TaskGroup

from metis_stream.backends.contract import Backend
from metis_stream.errors import JobNotFound, LogLost, MetisError, WebhookFailed
from metis_stream.events import Event
from metis_stream.jobs import Job, JobState, state_after
from metis_stream.metrics import Metrics
from metis_stream.webhooks import DeadLetter, HookProgress, Webhook

logger = logging.getLogger(__name__)

CHANGES_INTERVAL = 0.25
"""Seconds between looks at the journal of changes while it has nothing new."""
LEASE_TTL = 10.0
"""A deliverer that stops renewing its lease (a killed process) is taken over after this."""
MAX_IN_FLIGHT = 8
"""Requests one webhook has open at once, each for a different job."""
UNWANTED_KEPT = 10_000
"""Jobs remembered as not the webhook's (another template, another key's), so that their
changes cost no lookup of the job."""
ERROR_CHARS = 300


async def send(client: httpx.AsyncClient, webhook: Webhook, job: Job, event: Event) -> None:
    """One attempt to send ``event``; WebhookFailed says what went wrong. Only a 2xx answer
    counts (a redirect is not followed: it would take the signed body elsewhere)."""
    body, headers = webhook.request(job, event, int(time.time()))
    try:
        response = await client.post(webhook.url, content=body, headers=headers,
                                     timeout=webhook.timeout)
    except httpx.TimeoutException:
        raise WebhookFailed(f"webhook {webhook.name}: no answer within {webhook.timeout:g} s"
                            ) from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise WebhookFailed(f"webhook {webhook.name}: {reason}"[:ERROR_CHARS]) from None
    if not 200 <= response.status_code < 300:
        raise WebhookFailed(f"webhook {webhook.name}: the receiver answered HTTP "
                            f"{response.status_code}")


@dataclass(slots=True)
class _Job:
    """What the sender knows of one job with events to send, while it leads."""

    progress: HookProgress
    dirty: bool = True
    """New events may have come since the job's log was last read."""
    running: bool = False
    """A task is sending its events."""
    retrying: bool = False
    pending_since: float | None = None
    """The time of the oldest event it has yet to send."""
    done: bool = False
    """Its terminal event is sent or skipped: it has no more to send."""


class Deliverer:
    """Sends ``webhook``'s events; :meth:`run` until cancelled."""

    def __init__(self, backend: Backend, webhook: Webhook, metrics: Metrics) -> None:
        self._backend = backend
        self._webhook = webhook
        self._metrics = metrics
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self._jobs: dict[str, _Job] = {}
        self._unwanted: OrderedDict[str, None] = OrderedDict()
        self._writes = anyio.Lock()
        """Progress is written under it, each write the state in memory when it is made:
        two writes cannot land in the other order and leave an older state kept."""
        self._in_flight = anyio.Semaphore(MAX_IN_FLIGHT)
        self._client: httpx.AsyncClient | None = None
        name = webhook.name
        metrics.gauge("metis_webhook_retrying", self._retrying, webhook=name)
        metrics.gauge("metis_webhook_lag_seconds", self._lag, webhook=name)

    async def run(self) -> None:
        async with httpx.AsyncClient(follow_redirects=False) as client:
            self._client = client
            while True:
                try:
                    if await self._lease():
                        await self._lead()
                except MetisError as exc:  # the backend is away: try again soon
                    logger.warning("webhook %s: %s", self._webhook.name, exc)
                except Exception:
                    logger.exception("webhook %s: the deliverer failed", self._webhook.name)
                self._jobs = {}
                await anyio.sleep(LEASE_TTL / 3)

    async def _lease(self) -> bool:
        return await self._backend.hold_lease(f"webhook:{self._webhook.name}", self._owner,
                                              LEASE_TTL)

    async def _lead(self) -> None:
        """Send while this process holds the lease; return once it has lost it."""
        cursor, kept = await self._backend.webhook_progress(self._webhook.name)
        if cursor is None:  # a new webhook: it sends what comes from now on
            cursor = await self._backend.changes_end()
            await self._save(cursor=cursor)
        self._jobs = {job_id: _Job(progress) for job_id, progress in kept.items()}
        renewed = time.monotonic()
        async with anyio.create_task_group() as tasks:
            for job_id in list(self._jobs):
                self._wake(tasks, job_id)
            while True:
                changes = await self._backend.changes(cursor)
                opened: list[str] = []
                for change in changes:
                    if change.job in self._unwanted:
                        continue
                    if change.job not in self._jobs:
                        self._jobs[change.job] = _Job(HookProgress(delivered=change.first - 1))
                        opened.append(change.job)
                    self._jobs[change.job].dirty = True
                if changes:
                    cursor = changes[-1].id
                    await self._save(cursor=cursor, jobs=opened)
                    for change in changes:
                        if change.job in self._jobs:
                            self._wake(tasks, change.job)
                else:
                    await anyio.sleep(CHANGES_INTERVAL)
                if time.monotonic() - renewed > LEASE_TTL / 3:
                    if not await self._lease():
                        logger.warning("webhook %s: another process took over its deliveries",
                                       self._webhook.name)
                        tasks.cancel_scope.cancel()
                        return
                    renewed = time.monotonic()

    def _wake(self, tasks: TaskGroup, job_id: str) -> None:
        job = self._jobs[job_id]
        if not job.running:
            job.running = True
            tasks.start_soon(self._work, job_id, job)

    async def _work(self, job_id: str, job: _Job) -> None:
        try:
            while job.dirty and not job.done:
                job.dirty = False
                await self._send_new(job_id, job)
        except (JobNotFound, LogLost) as exc:
            logger.info("webhook %s: job %s is gone (%s): nothing more to send",
                        self._webhook.name, job_id, exc.message)
            job.done = True
        finally:
            job.running = False
        if job.done and self._jobs.get(job_id) is job:
            del self._jobs[job_id]
            await self._save(jobs=[job_id])

    async def _send_new(self, job_id: str, job: _Job) -> None:
        """Send the job's events after its progress, in order, each until it arrives or goes
        to the dead letters."""
        record = await self._backend.get_job(job_id)
        if not self._webhook.wants_job(record):  # template and owner never change
            self._unwanted[job_id] = None
            if len(self._unwanted) > UNWANTED_KEPT:
                self._unwanted.popitem(last=False)
            job.done = True
            return
        state = job.progress.state
        if state is None:
            state = await self._state_at(job_id, job.progress.delivered)
        while True:
            page = await self._backend.read(job_id, job.progress.delivered)
            if not page:
                job.pending_since = None
                return
            for event in page:
                sent = self._webhook.wants_event(event, state)
                state = state_after(state, event.type)
                if sent:
                    job.pending_since = event.time
                    await self._send(job_id, job, event)
                job.progress = replace(job.progress, delivered=event.seq, state=state)
                if sent:
                    await self._save(jobs=[job_id])
                if event.terminal:
                    job.done = True
            await self._save(jobs=[job_id])

    async def _send(self, job_id: str, job: _Job, event: Event) -> None:
        webhook = self._webhook
        backoff = webhook.backoff(job.progress.attempts)
        assert self._client is not None
        while True:
            record = await self._backend.get_job(job_id)
            try:
                async with self._in_flight:
                    await send(self._client, webhook, record, event)
            except WebhookFailed as exc:
                error = exc.message
            else:
                self._metrics.count("metis_webhook_delivered_total", webhook=webhook.name)
                job.progress = replace(job.progress, failing_since=None, attempts=0)
                job.retrying = False
                return
            now = time.time()
            since = job.progress.failing_since or now
            attempts = job.progress.attempts + 1
            job.progress = replace(job.progress, failing_since=since, attempts=attempts)
            if webhook.gives_up(since, now):
                await self._backend.add_dead_letter(DeadLetter(
                    webhook=webhook.name, job=job_id, seq=event.seq, type=event.type,
                    attempts=attempts, error=error, failed=now))
                self._metrics.count("metis_webhook_failed_total", webhook=webhook.name)
                logger.warning("webhook %s: job %s event %d is a dead letter after %d "
                               "attempts: %s", webhook.name, job_id, event.seq, attempts,
                               error)
                job.retrying = False
                return
            job.retrying = True
            await self._save(jobs=[job_id])
            await anyio.sleep(backoff.next_delay())

    async def _state_at(self, job_id: str, seq: int) -> JobState:
        """The job's state after its event ``seq``, from its log."""
        state, after = JobState.CREATED, 0
        while after < seq:
            page = await self._backend.read(job_id, after)
            if not page:
                break
            for event in page:
                if event.seq > seq:
                    return state
                state = state_after(state, event.type)
                after = event.seq
        return state

    async def _save(self, *, cursor: str | None = None, jobs: list[str] | None = None) -> None:
        """Keep the cursor and the progress of ``jobs`` as they are in memory now (a job no
        longer there is forgotten)."""
        async with self._writes:
            progress: Mapping[str, HookProgress | None] = {
                job_id: self._jobs[job_id].progress if job_id in self._jobs else None
                for job_id in jobs or ()}
            await self._backend.save_webhook_progress(self._webhook.name, cursor=cursor,
                                                      jobs=progress)

    def _retrying(self) -> float:
        return float(sum(job.retrying for job in self._jobs.values()))

    def _lag(self) -> float:
        """Seconds since the oldest event this webhook has yet to send happened."""
        pending = [job.pending_since for job in self._jobs.values()
                   if job.pending_since is not None]
        return max(0.0, time.time() - min(pending)) if pending else 0.0
