"""Unit tests of Subscription, Hub, and follow() over the memory backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from metis_stream.backends.contract import READ_PAGE, READ_PAGE_BYTES
from metis_stream.backends.follow import follow
from metis_stream.backends.hub import Hub, Subscription
from metis_stream.backends.memory import MemoryBackend
from metis_stream.errors import LogLost
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job

JOB = "j_01HX3ZJ5K1ABCDEFGHJKMNPQRS"


def event(seq: int, event_type: str = "token") -> Event:
    return Event(job=JOB, seq=seq, type=event_type, data=seq, time=float(seq))


async def next_soon(subscription: Subscription) -> Event | None:
    return await asyncio.wait_for(subscription.next(), 1)


async def nothing_ready(subscription: Subscription) -> bool:
    try:
        await asyncio.wait_for(subscription.next(), 0.02)
    except TimeoutError:
        return True
    return False


# Subscription


async def test_subscription_delivers_in_order():
    sub = Subscription(JOB, maxsize=10)
    for seq in (1, 2, 3):
        sub.deliver(event(seq))
    assert [(await next_soon(sub)).seq for _ in range(3)] == [1, 2, 3]  # type: ignore[union-attr]
    assert await nothing_ready(sub)


async def test_next_waits_for_a_delivery():
    sub = Subscription(JOB)
    waiter = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    assert not waiter.done()
    sub.deliver(event(1))
    assert await asyncio.wait_for(waiter, 1) == event(1)


async def test_overflow_marks_lagged_and_next_returns_none_once():
    sub = Subscription(JOB, maxsize=3)
    for seq in (1, 2, 3):
        sub.deliver(event(seq))
    sub.deliver(event(4))  # one too many: the buffer is dropped
    assert await next_soon(sub) is None
    assert await nothing_ready(sub)  # None only once, and nothing buffered is kept
    sub.deliver(event(5))
    assert await next_soon(sub) == event(5)


async def test_a_full_buffer_is_not_yet_lagged():
    sub = Subscription(JOB, maxsize=2)
    sub.deliver(event(1))
    sub.deliver(event(2))
    assert await next_soon(sub) == event(1)
    sub.deliver(event(3))  # room again after a read
    assert [await next_soon(sub), await next_soon(sub)] == [event(2), event(3)]


async def test_mark_lagged_wakes_a_waiting_reader():
    sub = Subscription(JOB)
    waiter = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    sub.mark_lagged()
    assert await asyncio.wait_for(waiter, 1) is None


async def test_lagged_twice_before_reading_is_still_one_none():
    sub = Subscription(JOB, maxsize=1)
    sub.deliver(event(1))
    sub.deliver(event(2))
    sub.deliver(event(3))
    sub.deliver(event(4))  # full again, lagged again
    assert await next_soon(sub) is None
    assert await nothing_ready(sub)


# Hub


class Hooks:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_first = False

    async def on_first(self, job_id: str) -> None:
        self.calls.append(("first", job_id))
        await asyncio.sleep(0)
        if self.fail_first:
            raise ConnectionError("SUBSCRIBE failed")

    async def on_last(self, job_id: str) -> None:
        self.calls.append(("last", job_id))


async def test_publish_reaches_every_subscriber_of_that_job_only():
    hub = Hub()
    async with hub.subscribe(JOB) as a, hub.subscribe(JOB) as b, hub.subscribe("other") as c:
        assert hub.watcher_count() == 3
        assert set(hub.job_ids) == {JOB, "other"}
        hub.publish(JOB, event(1))
        assert await next_soon(a) == event(1)
        assert await next_soon(b) == event(1)
        assert await nothing_ready(c)
    assert hub.watcher_count() == 0
    assert not hub.job_ids


async def test_publish_without_subscribers_is_kept_nowhere():
    hub = Hub()
    hub.publish(JOB, event(1))
    assert list(hub.job_ids) == []
    assert hub.watcher_count() == 0
    async with hub.subscribe(JOB) as subscription:
        hub.publish(JOB, event(2))
        received = await subscription.next()
    assert received is not None
    assert received.seq == 2  # event 1 was not kept for a later watcher


async def test_hooks_run_once_per_job():
    hooks = Hooks()
    hub = Hub(on_first=hooks.on_first, on_last=hooks.on_last)
    async with hub.subscribe(JOB):
        assert hooks.calls == [("first", JOB)]
        async with hub.subscribe(JOB):
            async with hub.subscribe("other"):
                assert hooks.calls == [("first", JOB), ("first", "other")]
            assert hooks.calls[-1] == ("last", "other")
        assert ("last", JOB) not in hooks.calls  # one watcher of JOB is left
    assert hooks.calls == [("first", JOB), ("first", "other"), ("last", "other"), ("last", JOB)]
    async with hub.subscribe(JOB):  # a new first watcher: subscribe again
        pass
    assert hooks.calls[-2:] == [("first", JOB), ("last", JOB)]


async def test_hooks_with_many_concurrent_watchers():
    hooks = Hooks()
    hub = Hub(on_first=hooks.on_first, on_last=hooks.on_last)
    release = asyncio.Event()

    async def watch() -> None:
        async with hub.subscribe(JOB):
            await release.wait()

    tasks = [asyncio.create_task(watch()) for _ in range(20)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert hub.watcher_count() == 20
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert hooks.calls == [("first", JOB), ("last", JOB)]
    assert hub.watcher_count() == 0


async def test_a_failing_on_first_leaves_no_subscriber_behind():
    hooks = Hooks()
    hooks.fail_first = True
    hub = Hub(on_first=hooks.on_first, on_last=hooks.on_last)
    with pytest.raises(ConnectionError):
        async with hub.subscribe(JOB):
            pytest.fail("the subscription must not be handed out")
    assert hub.watcher_count() == 0
    assert JOB not in hub.job_ids
    assert hooks.calls == [("first", JOB)]  # no on_last for a subscribe that never happened
    hooks.fail_first = False
    async with hub.subscribe(JOB) as sub:  # the next watcher tries again
        hub.publish(JOB, event(1))
        assert await next_soon(sub) == event(1)
    assert hooks.calls == [("first", JOB), ("first", JOB), ("last", JOB)]


async def test_a_second_watcher_waits_for_on_first_to_finish():
    gate = asyncio.Event()
    done: list[str] = []

    async def slow_first(job_id: str) -> None:
        await gate.wait()
        done.append(job_id)

    hub = Hub(on_first=slow_first)
    handed_out: list[bool] = []

    async def watch() -> None:
        async with hub.subscribe(JOB):
            handed_out.append(bool(done))

    first = asyncio.create_task(watch())
    await asyncio.sleep(0)
    second = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert handed_out == [True, True]


async def test_a_failing_on_first_leaves_no_concurrent_subscriber_behind():
    gate = asyncio.Event()

    async def failing_first(job_id: str) -> None:
        await gate.wait()
        raise ConnectionError("SUBSCRIBE failed")

    hub = Hub(on_first=failing_first)
    release = asyncio.Event()

    async def watch() -> None:
        async with hub.subscribe(JOB):
            await release.wait()

    first = asyncio.create_task(watch())
    await asyncio.sleep(0)
    second = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.sleep(0.01)
    try:
        assert hub.watcher_count() == 0
    finally:
        release.set()
        await asyncio.gather(first, second, return_exceptions=True)


async def test_mark_all_lagged_reaches_every_subscription():
    hub = Hub()
    async with hub.subscribe(JOB) as a, hub.subscribe("other") as b:
        hub.mark_all_lagged()
        assert await next_soon(a) is None
        assert await next_soon(b) is None


async def test_hub_buffer_bound_applies_to_its_subscriptions():
    hub = Hub(buffer=2)
    async with hub.subscribe(JOB) as sub:
        for seq in (1, 2, 3):
            hub.publish(JOB, event(seq))
        assert await next_soon(sub) is None


# follow() over the memory backend


async def new_backend(*types: str) -> MemoryBackend:
    backend = MemoryBackend()
    await backend.create_job(Job(id=JOB, template="t", cluster="c"))
    if types:
        await backend.append(JOB, [NewEvent(t, i) for i, t in enumerate(types, 1)])
    return backend


async def collect(stream: AsyncIterator[Event], timeout: float = 2) -> list[Event]:
    async def run() -> list[Event]:
        return [e async for e in stream]

    return await asyncio.wait_for(run(), timeout)


async def test_follow_reads_the_log_and_ends_after_the_terminal_event():
    backend = await new_backend("starting", "submitted", "token", "token", "completed")
    events = await collect(follow(backend, JOB))
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert [e.type for e in events] == ["starting", "submitted", "token", "token", "completed"]
    assert backend.hub.watcher_count() == 0  # unsubscribed at the end


@pytest.mark.parametrize("after", [0, 1, 3, 4])
async def test_follow_resumes_after(after):
    backend = await new_backend("starting", "submitted", "token", "token", "fatal")
    events = await collect(follow(backend, JOB, after))
    assert [e.seq for e in events] == list(range(after + 1, 6))
    assert events[-1].type == "fatal"


async def test_follow_switches_from_the_log_to_live():
    backend = await new_backend("starting", "submitted")
    seen: list[int] = []

    async def watch() -> None:
        async for e in follow(backend, JOB):
            seen.append(e.seq)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.01)
    assert seen == [1, 2]
    await backend.append(JOB, [NewEvent("token", "a")])
    await backend.append(JOB, [NewEvent("token", "b"), NewEvent("completed")])
    await asyncio.wait_for(task, 1)
    assert seen == [1, 2, 3, 4, 5]


async def test_follow_is_gapless_with_concurrent_appends():
    backend = await new_backend("starting", "submitted")
    total = 300

    async def produce() -> None:
        for i in range(total):
            batch = [NewEvent("token", i)] if i % 7 else [NewEvent("token", i)] * 3
            await backend.append(JOB, batch)
            if i % 3 == 0:
                await asyncio.sleep(0)
        await backend.append(JOB, [NewEvent("completed")])

    watchers = [asyncio.create_task(collect(follow(backend, JOB, after), 5))
                for after in (0, 1, 2)]
    await asyncio.sleep(0)
    producer = asyncio.create_task(produce())
    results = await asyncio.gather(*watchers)
    await producer
    last = (await backend.get_job(JOB)).last_seq
    for after, events in zip((0, 1, 2), results, strict=True):
        assert [e.seq for e in events] == list(range(after + 1, last + 1))
        assert events[-1].type == "completed"


async def test_a_lagged_subscription_backfills_from_the_log():
    backend = await new_backend("starting")
    backend.hub = Hub(buffer=3)
    stream = follow(backend, JOB)
    first = await asyncio.wait_for(anext(stream), 1)
    assert first.seq == 1
    # The watcher is now subscribed; ten events at once overflow its buffer of 3.
    await backend.append(JOB, [NewEvent("token", i) for i in range(10)])
    await backend.append(JOB, [NewEvent("completed")])
    rest = await collect(stream)
    assert [e.seq for e in rest] == list(range(2, 13))
    assert rest[-1].type == "completed"


async def test_follow_fills_a_gap_in_live_delivery():
    backend = await new_backend("starting")
    stream = follow(backend, JOB)
    assert (await asyncio.wait_for(anext(stream), 1)).seq == 1
    # An event reaches the log without live delivery (a lost pub/sub message)...
    hub = backend.hub
    backend.hub = Hub()
    await backend.append(JOB, [NewEvent("token", "lost")])
    backend.hub = hub
    # ... the next live one shows the gap, and follow reads the missing event from the log.
    await backend.append(JOB, [NewEvent("token", "seen"), NewEvent("completed")])
    rest = await collect(stream)
    assert [(e.seq, e.data) for e in rest] == [(2, "lost"), (3, "seen"), (4, None)]


async def test_follow_drops_live_duplicates_of_what_the_log_gave():
    backend = await new_backend("starting", "token")
    stream = follow(backend, JOB)
    assert [(await anext(stream)).seq for _ in range(2)] == [1, 2]
    # replay an old event live, as a reconnecting pub/sub might
    backend.hub.publish(JOB, (await backend.read(JOB))[1])
    await backend.append(JOB, [NewEvent("completed")])
    assert [e.seq for e in await collect(stream)] == [3]


async def test_follow_raises_log_lost_when_the_log_was_wiped():
    class WipedBackend(MemoryBackend):
        async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE,
                       max_bytes: int = READ_PAGE_BYTES) -> list[Event]:
            return [e for e in await super().read(job_id, after, limit, max_bytes) if e.seq > 2]

    backend = WipedBackend()
    await backend.create_job(Job(id=JOB, template="t", cluster="c"))
    await backend.append(JOB, [NewEvent("log", i) for i in range(4)])
    with pytest.raises(LogLost, match="events 1 to 2"):
        await collect(follow(backend, JOB))
    assert backend.hub.watcher_count() == 0


async def test_follow_reads_a_long_log_in_pages():
    backend = await new_backend()
    await backend.append(JOB, [NewEvent("log", i) for i in range(2500)])
    await backend.append(JOB, [NewEvent("completed")])
    events = await collect(follow(backend, JOB), 5)
    assert [e.seq for e in events] == list(range(1, 2502))


async def test_follow_after_the_terminal_event_ends_at_once():
    backend = await new_backend("starting", "submitted", "completed")
    assert await collect(follow(backend, JOB, after=3), timeout=0.5) == []
