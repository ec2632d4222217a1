"""The backend contract, run against every backend: memory (the reference) and Redis.

The Redis runs need the ``redis_server`` fixture (tests.support.redis_server).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metis_stream.backends.contract import Backend, page_is_full
from metis_stream.backends.follow import follow
from metis_stream.backends.hub import DEFAULT_SUBSCRIPTION_BUFFER
from metis_stream.backends.memory import MemoryBackend
from metis_stream.backends.redis import RedisBackend
from metis_stream.clusters import AgentPresence, ClusterHealth
from metis_stream.errors import (
    EventLimitReached,
    JobEnded,
    JobNotFound,
    JobNotSubmitted,
    NotFound,
)
from metis_stream.events import Event, NewEvent, encode_event
from metis_stream.jobs import Job, JobState, apply_event, new_job_id
from metis_stream.spool import SpoolCursor
from metis_stream.webhooks import DeadLetter, HookProgress

MakeBackend = Callable[..., Backend]
SHARED_FIXTURE = settings(suppress_health_check=[HealthCheck.function_scoped_fixture],
                          deadline=None)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_backend(request: pytest.FixtureRequest) -> MakeBackend:
    if request.param == "memory":
        return MemoryBackend
    server = request.getfixturevalue("redis_server")
    prefix = f"test-{secrets.token_hex(4)}:"

    def make(**options: Any) -> Backend:
        return RedisBackend(server.url, key_prefix=prefix, socket_timeout=2.0,
                            health_check_interval=0.5, **options)
    return make


@pytest.fixture
async def backend(make_backend: MakeBackend) -> AsyncIterator[Backend]:
    started = make_backend()
    await started.start()
    yield started
    await started.close()


async def new_job(backend: Backend, *, cluster: str = "local", submitted: bool = True,
                  owner: str = "", user: str | None = None) -> Job:
    job = Job(id=new_job_id(), template="tokens", cluster=cluster,
              params={"text": "héllo", "delay": 0.5}, inputs=["a.txt"], owner=owner,
              user=user, created=time.time())
    await backend.create_job(job)
    if submitted:
        await backend.append(job.id, [NewEvent("starting"), NewEvent("submitted", "42.pbs")])
    return job


def events(*types: str) -> list[NewEvent]:
    return [NewEvent(event_type, {"n": n}) for n, event_type in enumerate(types)]


def wire_bytes(event: Event) -> int:
    return len(event.wire.encode())


async def read_all(backend: Backend, job_id: str) -> list[Event]:
    return await backend.read(job_id, 0, 100_000)


# Job database


async def test_create_get_and_list_newest_first(backend: Backend) -> None:
    first = await new_job(backend, submitted=False)
    second = await new_job(backend, cluster="metis")
    third = await new_job(backend, submitted=False)

    assert await backend.get_job(first.id) == first
    fetched = await backend.get_job(second.id)
    assert (fetched.state, fetched.scheduler_id, fetched.last_seq) == (JobState.QUEUED, "42.pbs", 2)
    assert fetched.params == {"text": "héllo", "delay": 0.5} and fetched.inputs == ["a.txt"]

    listed = [job.id for job in await backend.list_jobs()]
    assert listed[:3] == [third.id, second.id, first.id]
    assert [job.id for job in await backend.list_jobs(limit=2)] == [third.id, second.id]
    created = await backend.list_jobs(states=[JobState.CREATED])
    assert [job.id for job in created][:2] == [third.id, first.id]
    assert second.id not in {job.id for job in created}
    assert [job.id for job in await backend.list_jobs(states=[JobState.QUEUED, JobState.CREATED],
                                                     limit=3)] == [third.id, second.id, first.id]
    assert [job.id for job in await backend.list_jobs(cluster="metis")] == [second.id]
    assert await backend.list_jobs(states=[JobState.RUNNING], cluster="metis") == []


async def test_list_by_owner_and_end_user(backend: Backend) -> None:
    """What a client key lists (its own jobs), and one end user's, with every other
    filter; a job without an owner or end user is in no such listing."""
    a1 = await new_job(backend, owner="a", user="u1")
    b1 = await new_job(backend, owner="b", user="u1")
    a2 = await new_job(backend, owner="a", user="u2", cluster="metis", submitted=False)
    nobody = await new_job(backend)
    a3 = await new_job(backend, owner="a")

    async def listed(**filters: Any) -> list[str]:
        return [job.id for job in await backend.list_jobs(**filters)]

    record = await backend.get_job(a1.id)
    assert (record.owner, record.user) == ("a", "u1")
    assert (await backend.get_job(nobody.id)).owner == ""
    assert (await backend.get_job(nobody.id)).user is None
    assert await listed(owner="a") == [a3.id, a2.id, a1.id]
    assert await listed(owner="b") == [b1.id]
    assert await listed(owner="c") == []
    assert await listed(user="u1") == [b1.id, a1.id]
    assert await listed(owner="a", user="u1") == [a1.id]
    assert await listed(owner="b", user="u2") == []
    assert await listed(owner="a", limit=2) == [a3.id, a2.id]
    assert await listed(owner="a", states=[JobState.CREATED]) == [a2.id]
    assert await listed(owner="a", states=[JobState.QUEUED], user="u1") == [a1.id]
    assert await listed(owner="a", cluster="metis") == [a2.id]
    assert await listed(user="u2", cluster="local") == []
    assert (await listed())[:5] == [a3.id, nobody.id, a2.id, b1.id, a1.id]
    # The filters follow the job's state as it moves.
    await backend.append(a1.id, [NewEvent("completed")])
    assert await listed(owner="a", states=[JobState.QUEUED]) == [a3.id]
    assert await listed(owner="a", user="u1", states=[JobState.COMPLETED]) == [a1.id]


async def test_unknown_job(backend: Backend) -> None:
    with pytest.raises(JobNotFound):
        await backend.get_job(new_job_id())
    with pytest.raises(JobNotFound):
        await backend.append(new_job_id(), events("step"))
    with pytest.raises(JobNotFound):
        await backend.read(new_job_id())
    with pytest.raises(JobNotFound):
        await backend.set_error_detail(new_job_id(), "details")
    with pytest.raises(JobNotFound):
        await backend.set_spool_cursor(new_job_id(), SpoolCursor(1))


async def test_error_detail_is_kept_on_the_record_and_in_no_event(backend: Backend) -> None:
    job = await new_job(backend, submitted=False)
    assert (await backend.get_job(job.id)).error_detail is None
    await backend.append(job.id, [NewEvent("starting")])
    await backend.set_error_detail(job.id, "ShellError: cannot connect to [héllo]:22")
    await backend.append(job.id, [NewEvent("fatal", {"error": "submission failed"})])
    record = await backend.get_job(job.id)
    assert (record.state, record.error, record.error_detail) == (
        JobState.FAILED, "submission failed", "ShellError: cannot connect to [héllo]:22")
    assert [job.id for job in await backend.list_jobs()] == [job.id]
    assert (await backend.list_jobs())[0] == record
    assert all("héllo]" not in event.wire for event in await backend.read(job.id))


async def test_spool_cursors_are_kept_per_job_and_outside_the_record(backend: Backend) -> None:
    first, second, third = [await new_job(backend) for _ in range(3)]
    assert await backend.spool_cursors([first.id, second.id]) == {}
    record = await backend.get_job(first.id)
    cursor = SpoolCursor(offset=120, check=b'"id":"e7"}\n\xff', skipping=True)
    await backend.set_spool_cursor(first.id, SpoolCursor(offset=5))
    await backend.set_spool_cursor(first.id, cursor)
    await backend.set_spool_cursor(third.id, SpoolCursor(offset=7))
    assert await backend.spool_cursors([first.id, second.id, third.id, new_job_id()]) == {
        first.id: cursor, third.id: SpoolCursor(offset=7)}
    assert await backend.get_job(first.id) == record


async def test_cluster_health_is_kept_per_cluster(backend: Backend) -> None:
    assert await backend.cluster_health() == {}
    down = ClusterHealth("metis", "unreachable", 1.5, "ConnectionLost: EOF")
    await backend.set_cluster_health(ClusterHealth("metis", "ok", 1.0))
    await backend.set_cluster_health(down)
    await backend.set_cluster_health(ClusterHealth("other", "ok", 2.0))
    assert await backend.cluster_health() == {"metis": down,
                                              "other": ClusterHealth("other", "ok", 2.0)}


# Agent links


async def test_agent_operations_are_taken_once_in_order(make_backend: MakeBackend) -> None:
    # Two backends on one store (Redis): two server processes, one that the agent's poll
    # reached; the memory backend is one process's only.
    sender = make_backend()
    poller = sender if isinstance(sender, MemoryBackend) else make_backend()
    for each in {id(sender): sender, id(poller): poller}.values():
        await each.start()
    try:
        assert await poller.agent_take("c1", wait=0.05, limit=10) == []
        for n in range(5):
            await sender.agent_send("c1", b"op%d" % n)
        await sender.agent_send("c2", b"other")
        assert await poller.agent_take("c1", wait=1, limit=3) == [b"op0", b"op1", b"op2"]
        assert await sender.agent_withdraw("c1", b"op3") is True
        assert await sender.agent_withdraw("c1", b"op0") is False  # taken already
        assert await poller.agent_take("c1", wait=1, limit=10) == [b"op4"]
        assert await poller.agent_take("c2", wait=1, limit=10) == [b"other"]
    finally:
        for each in {id(sender): sender, id(poller): poller}.values():
            await each.close()


async def test_agent_take_waits_for_an_operation(backend: Backend) -> None:
    async def send_later() -> None:
        await anyio.sleep(0.3)
        await backend.agent_send("c", b"late")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(send_later)
        started = time.monotonic()
        assert await backend.agent_take("c", wait=5, limit=10) == [b"late"]
    assert 0.2 < time.monotonic() - started < 3


async def test_agent_replies_reach_their_inbox_only(backend: Backend) -> None:
    assert await backend.agent_replies("c:a", wait=0.05) == []  # the inbox is read
    await backend.agent_reply("c:a", b"one")
    await backend.agent_reply("c:a", b"two")
    assert await backend.agent_replies("c:a", wait=1) == [b"one", b"two"]
    assert await backend.agent_replies("c:a", wait=0.05) == []


async def test_agent_presence_is_kept_per_cluster(backend: Backend) -> None:
    assert await backend.agent_presence() == {}
    seen = AgentPresence("metis", seen=10.0, since=5.0, last_error="refused: 401")
    await backend.set_agent_presence(AgentPresence("metis", seen=1.0))
    await backend.set_agent_presence(seen)
    assert await backend.agent_presence() == {"metis": seen}


# Appending and reading


async def test_seqs_start_at_one_without_gaps(backend: Backend) -> None:
    job = await new_job(backend, submitted=False)
    one = await backend.append(job.id, [NewEvent("starting")])
    many = await backend.append(job.id, events("step", "progress", "token", "token"))
    assert one.seqs == [1] and many.seqs == [2, 3, 4, 5]
    assert [event.seq for event in many.events] == [2, 3, 4, 5] and many.duplicates == 0
    logged = await read_all(backend, job.id)
    assert [event.seq for event in logged] == [1, 2, 3, 4, 5]
    assert logged == one.events + many.events
    # The text that watchers get is the event's own encoding, the same from every path.
    assert [event.wire for event in logged] == [event.wire for event in one.events + many.events]
    assert all(event.wire == encode_event(event) for event in logged)
    assert (await backend.get_job(job.id)).last_seq == 5


async def test_an_event_says_how_it_arrived_only_when_it_came_by_the_spool(
        backend: Backend) -> None:
    job = await new_job(backend)
    result = await backend.append(job.id, [NewEvent("step", "a", "e1", via="spool"),
                                           NewEvent("step", "b", "e2")])
    logged = await read_all(backend, job.id)
    assert logged[-2:] == result.events
    assert [(event.via, '"via"' in event.wire) for event in logged[-2:]] == [
        ("spool", True), (None, False)]
    assert logged[-2].as_dict()["via"] == "spool" and "via" not in logged[-1].as_dict()
    assert all(event.wire == encode_event(event) for event in logged)


async def test_read_after_n_in_pages(backend: Backend) -> None:
    job = await new_job(backend)
    await backend.append(job.id, events(*["token"] * 23))
    assert [event.seq for event in await backend.read(job.id, 5, 10)] == list(range(6, 16))
    assert [event.seq for event in await backend.read(job.id, 15, 10)] == list(range(16, 26))
    assert await backend.read(job.id, 25) == []


async def test_read_pages_stop_at_a_byte_bound(backend: Backend) -> None:
    job = await new_job(backend)
    await backend.append(job.id, [NewEvent("token", "x" * 1000) for _ in range(20)])
    page = await backend.read(job.id, 2, 100, max_bytes=5000)
    sizes = list(map(wire_bytes, page))
    assert [event.seq for event in page] == [3, 4, 5, 6, 7]
    assert sum(sizes[:-1]) < 5000 <= sum(sizes)  # the event that reaches the bound is last
    assert page_is_full(page, 100, 5000)
    # An event larger than the bound is a page of its own; the count still bounds a page.
    assert [event.seq for event in await backend.read(job.id, 2, 100, max_bytes=10)] == [3]
    assert [event.seq for event in await backend.read(job.id, 2, 2, max_bytes=10**6)] == [3, 4]
    rest = await backend.read(job.id, 17, 100, max_bytes=10**6)
    assert [event.seq for event in rest] == [18, 19, 20, 21, 22]
    assert not page_is_full(rest, 100, 10**6)


async def test_follow_reads_a_log_of_many_byte_bounded_pages(backend: Backend) -> None:
    job = await new_job(backend)
    big = "y" * 60_000
    for _ in range(4):  # about 3.6 MB of events: many pages of READ_PAGE_BYTES
        await backend.append(job.id, [NewEvent("token", big) for _ in range(15)])
    await backend.append(job.id, events("completed"))
    received = await collect(backend, job.id, 0)
    assert [event.seq for event in received] == list(range(1, 64))
    assert received[-1].type == "completed"


async def test_a_batch_is_all_or_nothing(backend: Backend) -> None:
    job = await new_job(backend)
    with pytest.raises(JobEnded):
        await backend.append(job.id, events("step", "completed", "token"))
    assert len(await read_all(backend, job.id)) == 2
    assert (await backend.get_job(job.id)).state == JobState.QUEUED
    # The idempotency ids of a refused batch are not remembered either.
    with pytest.raises(JobEnded):
        await backend.append(job.id, [NewEvent("step", id="s1"), NewEvent("fatal"),
                                      NewEvent("step", id="s2")])
    result = await backend.append(job.id, [NewEvent("step", id="s1")])
    assert result.seqs == [3] and result.duplicates == 0


async def test_idempotency_ids(backend: Backend) -> None:
    job = await new_job(backend)
    first = await backend.append(job.id, [NewEvent("step", "a", id="k1"),
                                          NewEvent("step", "b", id="k2")])
    again = await backend.append(job.id, [NewEvent("step", "b", id="k2"),
                                          NewEvent("token", "c", id="k3"),
                                          NewEvent("token", "c", id="k3")])
    assert first.seqs == [3, 4]
    assert again.seqs == [4, 5, 5] and again.duplicates == 2
    assert [event.seq for event in again.events] == [5]
    await backend.append(job.id, [NewEvent("completed", None, id="done")])
    # After the end, a retried event (even the terminal one) still gets its original seq.
    late = await backend.append(job.id, [NewEvent("step", "a", id="k1"),
                                         NewEvent("completed", None, id="done")])
    assert late.seqs == [3, 6] and late.events == []
    assert [event.seq for event in await read_all(backend, job.id)] == [1, 2, 3, 4, 5, 6]


async def test_no_event_after_a_terminal_one(backend: Backend) -> None:
    job = await new_job(backend)
    await backend.append(job.id, events("step", "cancelled"))
    for batch in (events("token"), events("completed"), [NewEvent("step", id="new")]):
        with pytest.raises(JobEnded):
            await backend.append(job.id, batch)
    assert len(await read_all(backend, job.id)) == 4


async def test_a_job_cannot_post_before_its_submission_is_recorded(backend: Backend) -> None:
    job = await new_job(backend, submitted=False)
    with pytest.raises(JobNotSubmitted):
        await backend.append(job.id, events("step"), from_job=True)
    await backend.append(job.id, [NewEvent("starting")])
    with pytest.raises(JobNotSubmitted):
        await backend.append(job.id, events("step"), from_job=True)
    await backend.append(job.id, [NewEvent("submitted", "7.pbs")])
    assert (await backend.append(job.id, events("step"), from_job=True)).seqs == [3]


async def test_event_limit_still_takes_the_terminal_event(make_backend: MakeBackend) -> None:
    backend = make_backend(max_events_per_job=5)
    await backend.start()
    try:
        job = await new_job(backend)
        await backend.append(job.id, events("step", "token", "token"))
        with pytest.raises(EventLimitReached):
            await backend.append(job.id, events("token"))
        with pytest.raises(EventLimitReached):  # all or nothing: not even the terminal one
            await backend.append(job.id, events("token", "completed"))
        assert (await backend.append(job.id, events("fatal"))).seqs == [6]
        assert (await backend.get_job(job.id)).state == JobState.FAILED
        with pytest.raises(JobEnded):
            await backend.append(job.id, events("completed"))
    finally:
        await backend.close()


async def test_byte_budget_still_takes_the_terminal_event(make_backend: MakeBackend) -> None:
    """A job's events may hold at most ``max_job_bytes`` of wire JSON in all; past it only a
    terminal event is taken, as with the event count."""
    budget = 4096
    backend = make_backend(max_job_bytes=budget)
    await backend.start()
    try:
        job = await new_job(backend)
        used = sum(map(wire_bytes, await read_all(backend, job.id)))
        big = "x" * 1000
        result = await backend.append(job.id, events(*["token"] * 3))
        used += sum(map(wire_bytes, result.events))
        filler = NewEvent("token", "y" * (budget - used - 200))
        used += wire_bytes((await backend.append(job.id, [filler])).events[0])
        assert used <= budget
        with pytest.raises(EventLimitReached, match=f"{budget} bytes"):
            await backend.append(job.id, [NewEvent("token", big)])
        with pytest.raises(EventLimitReached):  # all or nothing: not even the terminal one
            await backend.append(job.id, [NewEvent("token", big), NewEvent("completed")])
        assert (await backend.get_job(job.id)).last_seq == 6
        # Small events still fit until the budget is spent exactly.
        small = await backend.append(job.id, [NewEvent("step")])
        used += wire_bytes(small.events[0])
        assert used <= budget
        ended = await backend.append(job.id, [NewEvent("fatal", {"error": big})])
        assert ended.seqs == [8] and used + wire_bytes(ended.events[0]) > budget
        assert (await backend.get_job(job.id)).state == JobState.FAILED
    finally:
        await backend.close()


async def test_the_byte_budget_counts_each_job_apart(make_backend: MakeBackend) -> None:
    backend = make_backend(max_job_bytes=2048)
    await backend.start()
    try:
        first, second = await new_job(backend), await new_job(backend)
        await backend.append(first.id, [NewEvent("token", "a" * 1500)])
        assert (await backend.append(second.id, [NewEvent("token", "b" * 1500)])).seqs == [3]
        with pytest.raises(EventLimitReached):
            await backend.append(first.id, [NewEvent("token", "a" * 600)])
    finally:
        await backend.close()


# The job state machine


async def test_state_machine_effects(backend: Backend) -> None:
    job = await new_job(backend, submitted=False)
    assert (await backend.get_job(job.id)).state == JobState.CREATED
    await backend.append(job.id, [NewEvent("starting")])
    assert (await backend.get_job(job.id)).state == JobState.SUBMITTING
    await backend.append(job.id, [NewEvent("submitted", "99.metis")])
    queued = await backend.get_job(job.id)
    assert (queued.state, queued.scheduler_id) == (JobState.QUEUED, "99.metis")
    await backend.append(job.id, [NewEvent("step", "Downloading"), NewEvent("queued")])
    assert (await backend.get_job(job.id)).state == JobState.RUNNING  # forward only
    await backend.append(job.id, [NewEvent("result", {"size": 3})])
    done = await backend.append(job.id, [NewEvent("completed", {"sha256": "ab"})])
    final = await backend.get_job(job.id)
    assert final.state == JobState.COMPLETED and final.result == {"sha256": "ab"}
    assert final.ended == final.updated == done.events[0].time
    assert final.error is None and final.exit_status is None

    failed = await new_job(backend)
    await backend.append(failed.id, [NewEvent("fatal", {"error": "walltime", "exit_status": 271})])
    record = await backend.get_job(failed.id)
    assert (record.state, record.error, record.exit_status) == (JobState.FAILED, "walltime", 271)
    assert record.ended is not None


EVENT_TYPES = st.sampled_from(["starting", "submitted", "queued", "running", "step", "result",
                               "token", "my.custom-type", "completed", "fatal", "cancelled"])
INT64 = st.integers(-(2**63), 2**63 - 1)  # what JSON (orjson) carries
EVENT_DATA = st.one_of(st.none(), st.text(max_size=8), INT64, st.booleans(),
                       st.fixed_dictionaries({"error": st.text(max_size=5),
                                              "exit_status": st.one_of(INT64, st.booleans())}))


@settings(SHARED_FIXTURE, max_examples=40)
@given(batches=st.lists(st.lists(st.tuples(EVENT_TYPES, EVENT_DATA), min_size=1, max_size=4),
                        max_size=5))
async def test_job_record_follows_jobs_apply_event(backend: Backend,
                                                   batches: list[list[tuple[str, object]]]
                                                   ) -> None:
    """Whatever the events, the stored record is what jobs.apply_event makes of them."""
    job = await new_job(backend, submitted=False)
    model = await backend.get_job(job.id)
    for batch in batches:
        new = [NewEvent(event_type, data) for event_type, data in batch]
        ends_early = model.state.terminal or any(event.terminal for event in new[:-1])
        try:
            result = await backend.append(job.id, new)
        except JobEnded:
            assert ends_early
            continue
        assert not ends_early
        for event in result.events:
            apply_event(model, event)
    assert await backend.get_job(job.id) == model


# Following: the log, then live, without gap or duplicate


async def collect(backend: Backend, job_id: str, after: int) -> list[Event]:
    return [event async for event in follow(backend, job_id, after)]


@settings(SHARED_FIXTURE, max_examples=25)
@given(before=st.integers(0, 30), after_fraction=st.floats(0, 1),
       batches=st.lists(st.integers(1, 40), max_size=6), pause=st.sampled_from([0, 0.001, 0.01]))
async def test_follow_from_any_point_while_appending(backend: Backend, before: int,
                                                     after_fraction: float, batches: list[int],
                                                     pause: float) -> None:
    job = await new_job(backend)
    if before:
        await backend.append(job.id, events(*["token"] * before))
    last_before = 2 + before
    after = round(after_fraction * last_before)
    watcher = asyncio.create_task(collect(backend, job.id, after))
    for size in batches:
        await asyncio.sleep(pause)
        await backend.append(job.id, events(*["chunk"] * size))
    await backend.append(job.id, events("completed"))
    received = await asyncio.wait_for(watcher, 10)
    total = last_before + sum(batches) + 1
    assert [event.seq for event in received] == list(range(after + 1, total + 1))
    assert received == (await read_all(backend, job.id))[after:]


async def test_a_slow_watcher_loses_nothing(backend: Backend) -> None:
    """A watcher that does not read while more than its buffer is published is caught up
    from the log."""
    job = await new_job(backend)
    stream = follow(backend, job.id, 0)
    assert (await anext(stream)).seq == 1
    count = DEFAULT_SUBSCRIPTION_BUFFER + 500
    for _ in range(0, count, 100):
        await backend.append(job.id, events(*["token"] * 100))
    await backend.append(job.id, events("completed"))
    await asyncio.sleep(0.2)  # let every live message reach the (overflowing) buffer
    rest = [event.seq async for event in stream]
    assert rest == list(range(2, count + 4))  # submitted, the tokens, completed


# Webhooks: the journal of changes, each webhook's progress, the dead letters


@pytest.fixture
async def journaled(make_backend: MakeBackend) -> AsyncIterator[Backend]:
    """A backend that keeps the journal of changes, as a server with webhooks builds it."""
    started = make_backend(changes_kept=3600.0)
    await started.start()
    yield started
    await started.close()


async def test_the_journal_has_each_appended_batch_in_order(journaled: Backend) -> None:
    start = await journaled.changes_end()
    a = await new_job(journaled)
    b = await new_job(journaled, submitted=False)
    await journaled.append(b.id, [NewEvent("starting")])
    await journaled.append(a.id, [NewEvent("step", id="once"), NewEvent("step")])
    await journaled.append(a.id, [NewEvent("step", id="once")])  # a repeat: nothing new
    changes = await journaled.changes(start)
    assert [(change.job, change.first, change.last) for change in changes] == [
        (a.id, 1, 2), (b.id, 1, 1), (a.id, 3, 4)]
    assert await journaled.changes_end() == changes[-1].id
    assert await journaled.changes(changes[-1].id) == []
    assert await journaled.changes(start, limit=2) == changes[:2]
    assert await journaled.changes(changes[0].id) == changes[1:]


async def test_without_webhooks_no_journal_is_kept(backend: Backend) -> None:
    start = await backend.changes_end()
    await new_job(backend)
    assert await backend.changes(start) == []


async def test_webhook_progress_is_kept_per_webhook_and_forgotten(backend: Backend) -> None:
    assert await backend.webhook_progress("app") == (None, {})
    running = HookProgress(delivered=3, state=JobState.RUNNING)
    failing = HookProgress(delivered=7, state=None, failing_since=12.5, attempts=2)
    await backend.save_webhook_progress("app", cursor="5", jobs={"j_a": running,
                                                                "j_b": failing})
    await backend.save_webhook_progress("other", cursor="1")
    assert await backend.webhook_progress("app") == ("5", {"j_a": running, "j_b": failing})
    # Without a cursor the kept one stays; None forgets a job.
    await backend.save_webhook_progress("app", jobs={"j_a": None, "j_c": HookProgress(0)})
    assert await backend.webhook_progress("app") == ("5", {"j_b": failing,
                                                           "j_c": HookProgress(0)})
    assert await backend.webhook_progress("other") == ("1", {})


async def test_dead_letters_are_listed_oldest_first_and_removed_once(backend: Backend) -> None:
    def letter(webhook: str, seq: int, failed: float) -> DeadLetter:
        return DeadLetter(webhook=webhook, job="j_a", seq=seq, type="step", attempts=4,
                          error="HTTP 500", failed=failed)

    assert await backend.dead_letters() == []
    late, early = letter("app", 3, 20.0), letter("other", 3, 10.0)
    await backend.add_dead_letter(late)
    await backend.add_dead_letter(early)
    await backend.add_dead_letter(late)  # once more: the same letter
    assert await backend.dead_letters() == [early, late]
    assert await backend.remove_dead_letter(late.id) == late
    with pytest.raises(NotFound):
        await backend.remove_dead_letter(late.id)
    assert await backend.dead_letters() == [early]
