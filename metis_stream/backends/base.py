"""The contract of a backend (job database + event log + pub/sub) and the parts all share.

A backend stores job records and each job's event log, and delivers appended
events to the watchers of this process through its :class:`Hub`. ``follow``
turns a backend into the gapless stream that every watcher reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from metis_stream.errors import LogLost
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job, JobState

DEFAULT_MAX_EVENTS_PER_JOB = 10_000
DEFAULT_SUBSCRIPTION_BUFFER = 1_000
READ_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class AppendResult:
    events: list[Event]
    """The events newly appended, in order."""
    seqs: list[int]
    """For each event asked for, its seq: the original one for a repeated idempotency id."""

    @property
    def duplicates(self) -> int:
        return len(self.seqs) - len(self.events)


class Subscription:
    """Live events of one job for one watcher, buffered up to a bound.

    A watcher that falls more than ``maxsize`` events behind is not allowed to
    hold memory without bound: its buffer is dropped and ``next`` returns
    ``None`` once, telling it to catch up from the log instead.
    """

    def __init__(self, job_id: str, maxsize: int = DEFAULT_SUBSCRIPTION_BUFFER) -> None:
        self.job_id = job_id
        self._queue: deque[Event] = deque()
        self._maxsize = maxsize
        self._lagged = False
        self._ready = asyncio.Event()

    def deliver(self, event: Event) -> None:
        if len(self._queue) >= self._maxsize:
            self.mark_lagged()
            return
        self._queue.append(event)
        self._ready.set()

    def mark_lagged(self) -> None:
        """Live delivery broke (a full buffer, a lost connection): the watcher must backfill."""
        self._queue.clear()
        self._lagged = True
        self._ready.set()

    async def next(self) -> Event | None:
        while not self._queue and not self._lagged:
            self._ready.clear()
            await self._ready.wait()
        if self._lagged:
            self._lagged = False
            return None
        return self._queue.popleft()


SubscribeHook = Callable[[str], Awaitable[None]]


async def _no_hook(job_id: str) -> None:
    return None


class Hub:
    """Fans each job's events out to this process's watchers of that job.

    ``on_first`` runs when a job gets its first local watcher (before the
    subscription is handed out) and ``on_last`` when its last one leaves: the
    Redis backend uses them to SUBSCRIBE and UNSUBSCRIBE its one connection.
    """

    def __init__(self, on_first: SubscribeHook = _no_hook, on_last: SubscribeHook = _no_hook,
                 buffer: int = DEFAULT_SUBSCRIPTION_BUFFER) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._ready: dict[str, asyncio.Future[None]] = {}
        self._on_first = on_first
        self._on_last = on_last
        self._buffer = buffer

    def publish(self, job_id: str, event: Event) -> None:
        for subscription in self._subscribers.get(job_id, ()):
            subscription.deliver(event)

    def mark_all_lagged(self) -> None:
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.mark_lagged()

    @property
    def job_ids(self) -> Collection[str]:
        return self._subscribers.keys()

    def watcher_count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    @asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[Subscription]:
        """A subscription that receives every event published from the moment it is handed
        out: when a job gets its first watcher, only once ``on_first`` has finished, and
        watchers that arrive meanwhile wait for it too."""
        subscription = Subscription(job_id, self._buffer)
        subscriptions = self._subscribers.setdefault(job_id, set())
        first = not subscriptions
        subscriptions.add(subscription)
        try:
            if first:
                ready = self._ready[job_id] = asyncio.get_running_loop().create_future()
                try:
                    await self._on_first(job_id)
                except BaseException as exc:
                    ready.set_exception(exc)
                    ready.exception()  # retrieved here, so an unawaited failure is not logged
                    raise
                else:
                    ready.set_result(None)
                finally:
                    del self._ready[job_id]
            elif job_id in self._ready:
                await asyncio.shield(self._ready[job_id])
        except BaseException:
            if self._leave(subscription) and not first:
                await self._on_last(job_id)
            raise
        try:
            yield subscription
        finally:
            if self._leave(subscription):
                await self._on_last(job_id)

    def _leave(self, subscription: Subscription) -> bool:
        """Forget a subscription; True when it was its job's last one."""
        subscriptions = self._subscribers.get(subscription.job_id)
        if subscriptions is None:
            return False
        subscriptions.discard(subscription)
        if subscriptions:
            return False
        del self._subscribers[subscription.job_id]
        return True


class Backend(Protocol):
    hub: Hub

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create_job(self, job: Job) -> None: ...

    async def get_job(self, job_id: str) -> Job:
        """The job's record; raises JobNotFound."""
        ...

    async def list_jobs(self, *, states: Collection[JobState] | None = None,
                        cluster: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first."""
        ...

    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        """Append all events atomically, or none: the next seqs, idempotency ids, the job's
        state, and delivery to every watcher on every process.

        Raises JobNotFound, JobEnded (the job already has a terminal event, or one in
        ``events`` is followed by more), EventLimitReached, and, when ``from_job`` is true
        and the server has not yet recorded the submission, JobNotSubmitted.
        """
        ...

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE) -> list[Event]:
        """Events with seq > ``after``, oldest first, at most ``limit``."""
        ...

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        """Live events of a job, from the moment this returns."""
        ...

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a lease that expires after ``ttl`` seconds unless renewed; False
        while another owner holds it. Several server processes use it so that only one
        polls each cluster."""
        ...


async def follow(backend: Backend, job_id: str, after: int = 0) -> AsyncIterator[Event]:
    """Every event of a job with seq > ``after``: the log, then live, without gap or duplicate,
    ending after the terminal event.

    It subscribes before it reads the log, so an event appended in between is in
    one or the other (or both: live events at or below the last seq sent are
    dropped). A gap in live delivery is filled from the log.
    """
    async with backend.subscribe(job_id) as live:
        last = after
        async for event in _backfill(backend, job_id, last):
            yield event
            last = event.seq
            if event.terminal:
                return
        job = await backend.get_job(job_id)
        if job.state.terminal and job.last_seq <= last:
            return  # the watcher already has the terminal event: nothing more will come
        while True:
            pushed = await live.next()
            if pushed is not None and pushed.seq <= last:
                continue
            if pushed is None or pushed.seq > last + 1:
                async for missed in _backfill(backend, job_id, last):
                    yield missed
                    last = missed.seq
                    if missed.terminal:
                        return
                continue
            yield pushed
            last = pushed.seq
            if pushed.terminal:
                return


async def _backfill(backend: Backend, job_id: str, after: int) -> AsyncIterator[Event]:
    while True:
        page = await backend.read(job_id, after)
        if page and page[0].seq != after + 1:
            raise LogLost(f"events {after + 1} to {page[0].seq - 1} of job {job_id} are gone")
        for event in page:
            yield event
        if len(page) < READ_PAGE:
            return
        after = page[-1].seq
