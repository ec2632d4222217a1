"""Fan-out within one process: each job's live events to this process's watchers of it.

No I/O: a backend publishes into its hub what it appended or heard of, and the
hub's hooks tell it when a job gains its first local watcher or loses its last.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager

from metis_stream.events import Event

DEFAULT_SUBSCRIPTION_BUFFER = 1_000


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
