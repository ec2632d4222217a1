"""What only the Redis backend does: several processes on one Redis, one pub/sub
connection per process, outages, a wiped store, expiry and leases.

Each RedisBackend instance stands for one server process. Needs the
``redis_server`` fixture (tests.support.redis_server).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from metis_stream.backends.follow import follow
from metis_stream.backends.redis import RedisBackend
from metis_stream.errors import BackendUnavailable, JobNotFound, LogLost
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job, JobState, new_job_id
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

MakeBackend = Callable[..., Awaitable[RedisBackend]]


@pytest.fixture
def prefix() -> str:
    """Each test's keys apart from the others'."""
    return f"test-{secrets.token_hex(4)}:"


@pytest.fixture
async def make_backend(redis_server: RedisServer, prefix: str) -> AsyncIterator[MakeBackend]:
    """Started backends, each standing for one server process, sharing the test's prefix."""
    started: list[RedisBackend] = []

    async def make(**options: Any) -> RedisBackend:
        settings = {"socket_timeout": 1.0, "health_check_interval": 0.3, **options}
        backend = RedisBackend(redis_server.url, key_prefix=prefix, **settings)
        await backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.close()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def new_job(backend: RedisBackend, owner: str = "", user: str | None = None) -> Job:
    job = Job(id=new_job_id(), template="tokens", cluster="local", owner=owner, user=user,
              created=time.time())
    await backend.create_job(job)
    await backend.append(job.id, [NewEvent("starting"), NewEvent("submitted", "1.pbs")])
    return job


async def collect(backend: RedisBackend, job_id: str, after: int = 0) -> list[Event]:
    return [event async for event in follow(backend, job_id, after)]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_watchers_on_one_process_get_every_event_appended_on_another(
        make_backend: MakeBackend) -> None:
    watching, appending = await make_backend(), await make_backend()
    job = await new_job(appending)
    watchers = [asyncio.create_task(collect(watching, job.id, after)) for after in (0, 1, 2, 0)]
    await until(lambda: watching.hub.watcher_count() == 4)
    sizes = [random.randint(1, 30) for _ in range(20)]
    for size in sizes:
        await appending.append(job.id, [NewEvent("token", n) for n in range(size)])
    await appending.append(job.id, [NewEvent("completed")])
    log = await appending.read(job.id, 0, 10_000)
    assert len(log) == 2 + sum(sizes) + 1
    for after, received in zip((0, 1, 2, 0), await asyncio.gather(*watchers), strict=True):
        assert received == log[after:]
        assert [event.wire for event in received] == [event.wire for event in log[after:]]


async def test_idempotency_ids_across_processes(make_backend: MakeBackend) -> None:
    first, second = await make_backend(), await make_backend()
    job = await new_job(first)
    original = await first.append(job.id, [NewEvent("step", "x", id="retry-me")])
    repeated = await second.append(job.id, [NewEvent("step", "x", id="retry-me")])
    assert repeated.seqs == original.seqs == [3] and repeated.duplicates == 1
    assert len(await second.read(job.id)) == 3


async def client_list(redis: Redis, name: str) -> list[dict[str, str]]:
    clients: list[dict[str, str]] = await redis.client_list()
    return [client for client in clients if client["name"] == name]


async def test_one_pubsub_connection_for_fifty_watchers(make_backend: MakeBackend,
                                                        redis: Redis) -> None:
    backend = await make_backend(max_connections=4)
    jobs = [await new_job(backend) for _ in range(10)]
    watchers = [asyncio.create_task(collect(backend, jobs[n % 10].id)) for n in range(50)]
    await until(lambda: backend.hub.watcher_count() == 50)
    pubsub = await client_list(redis, f"{backend.client_name}:pubsub")
    assert len(pubsub) == 1 and pubsub[0]["sub"] == "10"
    # Watchers borrow command connections only to read the log, from a bounded pool.
    assert len(await client_list(redis, backend.client_name)) <= 4
    for job in jobs:
        await backend.append(job.id, [NewEvent("completed")])
    assert all(len(events) == 3 for events in await asyncio.gather(*watchers))
    await until(lambda: backend.hub.watcher_count() == 0)
    await asyncio.sleep(0.05)  # let Redis process the UNSUBSCRIBEs
    assert (await client_list(redis, f"{backend.client_name}:pubsub"))[0]["sub"] == "0"


async def append_until_redis_answers(backend: RedisBackend, job_id: str,
                                     events: list[NewEvent]) -> list[int]:
    """What metis-emit does: retry on 503 with the same idempotency ids."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return (await backend.append(job_id, events)).seqs
        except BackendUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_redis_crash_and_restart_in_the_middle_of_a_job(
        make_backend: MakeBackend, redis_server: RedisServer) -> None:
    watching, appending = await make_backend(), await make_backend()
    job = await new_job(appending)
    watcher = asyncio.create_task(collect(watching, job.id))
    await until(lambda: watching.hub.watcher_count() == 1)
    acknowledged = [1, 2]
    for n in range(5):
        acknowledged += (await appending.append(job.id, [NewEvent("token", n, id=f"a{n}")])).seqs

    redis_server.kill()
    for n in range(3):
        with pytest.raises(BackendUnavailable):
            await appending.append(job.id, [NewEvent("token", n, id=f"lost{n}")])
    with pytest.raises(BackendUnavailable):
        await appending.get_job(job.id)
    with pytest.raises(BackendUnavailable):  # no new subscription during the outage
        async with watching.subscribe(new_job_id()):
            pass
    redis_server.start()

    for n in range(5, 10):
        acknowledged += await append_until_redis_answers(
            appending, job.id, [NewEvent("token", n, id=f"a{n}")])
    acknowledged += await append_until_redis_answers(appending, job.id,
                                                     [NewEvent("completed", id="end")])
    received = await asyncio.wait_for(watcher, 10)
    assert [event.seq for event in received] == acknowledged == list(range(1, 14))
    assert [event.data for event in received[2:-1]] == list(range(10))


async def test_a_flushed_store_is_reported_not_skipped(make_backend: MakeBackend,
                                                       redis: Redis) -> None:
    # Every process notices, not only the first to look after the wipe.
    watching = [await make_backend() for _ in range(3)]
    appending = await make_backend()
    job = await new_job(appending)
    await appending.append(job.id, [NewEvent("step", "one")])
    streams = [follow(backend, job.id) for backend in watching]
    for stream in streams:
        assert [(await anext(stream)).seq for _ in range(3)] == [1, 2, 3]
    waiting = [asyncio.ensure_future(anext(stream)) for stream in streams]
    await asyncio.sleep(0.2)  # until each waits for live events
    await redis.flushall()
    for task in waiting:
        with pytest.raises(LogLost, match="gone from Redis"):
            await asyncio.wait_for(task, 5)
    with pytest.raises(JobNotFound):
        await appending.get_job(job.id)
    with pytest.raises(JobNotFound):
        await appending.append(job.id, [NewEvent("step", "two")])


async def test_events_lost_by_redis_are_reported(make_backend: MakeBackend, redis: Redis,
                                                 prefix: str) -> None:
    """Redis restored from an older copy: the log is shorter than what was delivered."""
    backend = await make_backend()
    job = await new_job(backend)
    await backend.append(job.id, [NewEvent("token", n) for n in range(8)])
    assert len(await backend.read(job.id)) == 10
    await redis.hset(f"{prefix}job:{job.id}", "last_seq", "4")
    await redis.xtrim(f"{prefix}log:{job.id}", minid="0-5")
    with pytest.raises(LogLost, match="lost acknowledged events"):
        await backend.read(job.id, 10)


async def test_a_terminal_job_expires_after_the_retention(make_backend: MakeBackend,
                                                          redis: Redis, prefix: str) -> None:
    backend = await make_backend(retention=60)
    job = await new_job(backend)
    await backend.append(job.id, [NewEvent("step", id="s")])
    keys = [f"{prefix}{kind}:{job.id}" for kind in ("job", "log", "ids")]
    assert [await redis.ttl(key) for key in keys] == [-1, -1, -1]
    await backend.append(job.id, [NewEvent("completed")])
    assert all(55 <= ttl <= 60 for ttl in [await redis.ttl(key) for key in keys])


async def test_a_lease_has_one_holder(make_backend: MakeBackend) -> None:
    first, second = await make_backend(), await make_backend()
    assert await first.hold_lease("monitor:metis", "process-1", 0.3)
    assert not await second.hold_lease("monitor:metis", "process-2", 0.3)
    assert await first.hold_lease("monitor:metis", "process-1", 0.3)  # renewed
    await asyncio.sleep(0.4)
    assert await second.hold_lease("monitor:metis", "process-2", 0.3)
    assert not await first.hold_lease("monitor:metis", "process-1", 0.3)


async def test_concurrent_appends_share_round_trips_and_keep_every_job_gapless(
        make_backend: MakeBackend) -> None:
    backend = await make_backend()
    jobs = [await new_job(backend) for _ in range(10)]
    posts = [(job.id, NewEvent("token", n, id=f"k{n}")) for n in range(40) for job in jobs]
    random.shuffle(posts)
    results = await asyncio.gather(*(backend.append(job_id, [event]) for job_id, event in posts))
    assert all(len(result.events) == 1 for result in results)
    for job in jobs:
        log = await backend.read(job.id)
        assert [event.seq for event in log] == list(range(1, 43))
        assert sorted(event.data for event in log[2:]) == list(range(40))
    repeated = await asyncio.gather(*(backend.append(job_id, [event]) for job_id, event in posts))
    assert all(result.duplicates == 1 for result in repeated)


async def test_appends_survive_a_server_that_lost_its_scripts(make_backend: MakeBackend,
                                                               redis: Redis) -> None:
    backend = await make_backend()
    job = await new_job(backend)
    await redis.script_flush()
    appended = await backend.append(job.id, [NewEvent("log", "after the flush")])
    assert appended.seqs == [3]
    assert [event.data for event in await backend.read(job.id, 2)] == ["after the flush"]


# The sweep: indexes pruned, unfinished jobs given a maximum lifetime


async def index_members(redis: Redis, prefix: str) -> dict[str, set[str]]:
    """Every index of the test's prefix: its key (without the prefix) and its job ids."""
    indexes = {}
    async for key in redis.scan_iter(match=f"{prefix}jobs:*:*"):
        members = cast(list[bytes], await redis.zrange(key, 0, -1))
        indexes[key.decode().removeprefix(prefix)] = {member.decode() for member in members}
    return indexes


async def test_the_sweep_removes_the_index_entries_of_expired_jobs(
        make_backend: MakeBackend, redis: Redis, prefix: str) -> None:
    backend = await make_backend(retention=0.2, sweep_interval=0.2)
    live = await new_job(backend, owner="web")
    ended = [await new_job(backend, owner=owner, user="u1") for owner in ("web", "app", "")]
    for job in ended:
        await backend.append(job.id, [NewEvent("completed")])
    await asyncio.sleep(0.3)  # the ended jobs' keys expire; their ids stay in the indexes
    assert not await redis.exists(f"{prefix}job:{ended[0].id}")
    # Emptied indexes (jobs:owner:app, jobs:user:u1) are gone: Redis deletes an empty set.
    expected = {"jobs:cluster:local": {live.id}, "jobs:state:queued": {live.id},
                "jobs:owner:web": {live.id}}
    deadline = time.monotonic() + 5
    while (indexes := await index_members(redis, prefix)) != expected:
        assert time.monotonic() < deadline, indexes
        await asyncio.sleep(0.05)
    assert [job.id for job in await backend.list_jobs()] == [live.id]


async def test_a_listing_pages_through_its_narrowest_index(
        make_backend: MakeBackend, redis: Redis, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client key's listing reads its own jobs' records, not every job's: of the indexes
    its filters name, the one with the fewest ids."""
    backend = await make_backend()
    others = [await new_job(backend, owner="big", user=f"u{n % 3}") for n in range(120)]
    mine = [await new_job(backend, owner="small", user="u1") for _ in range(3)]
    loaded: list[str] = []
    load = backend._load

    async def counting(sources: list[str], job_ids: list[str]) -> list[Job]:
        loaded.extend(job_ids)
        return await load(sources, job_ids)

    monkeypatch.setattr(backend, "_load", counting)
    listed = await backend.list_jobs(owner="small", states=[JobState.QUEUED])
    assert [job.id for job in listed] == [job.id for job in reversed(mine)]
    assert sorted(loaded) == sorted(job.id for job in mine)
    loaded.clear()
    listed = await backend.list_jobs(owner="big", user="u2", limit=1000)
    assert len(listed) == 40 and len(loaded) == 40  # the user's index: 40, the owner's 120
    loaded.clear()
    listed = await backend.list_jobs(owner="small", user="u1")
    assert len(listed) == 3 and len(loaded) == 3
    listed = await backend.list_jobs(owner="big", limit=1000)
    assert {job.id for job in listed} == {job.id for job in others}


async def test_an_unfinished_job_past_the_maximum_lifetime_is_ended_and_then_expires(
        make_backend: MakeBackend, redis: Redis, prefix: str) -> None:
    backend = await make_backend(max_job_lifetime=60, retention=0.5, sweep_interval=0.2)
    old = Job(id=new_job_id(), template="tokens", cluster="local", created=time.time() - 61)
    await backend.create_job(old)
    await backend.append(old.id, [NewEvent("starting"), NewEvent("submitted", "1.pbs")])
    young = await new_job(backend)
    forgotten = Job(id=new_job_id(), template="tokens", cluster="local",
                    created=time.time() - 3600)  # never even started
    await backend.create_job(forgotten)
    watched = await asyncio.wait_for(collect(backend, old.id), 5)
    assert watched[-1].type == "fatal"
    assert "exceeded the maximum lifetime" in watched[-1].data["error"]
    ended = await backend.get_job(old.id)
    assert ended.state == JobState.FAILED and "maximum lifetime" in (ended.error or "")
    assert (await backend.get_job(young.id)).state == JobState.QUEUED
    # Ended like any job, its keys expire, and a later sweep drops it from the indexes.
    deadline = time.monotonic() + 5
    while await redis.exists(f"{prefix}job:{old.id}", f"{prefix}job:{forgotten.id}"):
        assert time.monotonic() < deadline, "the ended jobs' keys never expired"
        await asyncio.sleep(0.05)
    while old.id in set().union(*(await index_members(redis, prefix)).values()):
        assert time.monotonic() < deadline, "the expired job stayed in an index"
        await asyncio.sleep(0.05)
    assert await backend.list_jobs() == [await backend.get_job(young.id)]


async def test_one_process_sweeps_at_a_time(make_backend: MakeBackend, redis: Redis,
                                            prefix: str) -> None:
    backends = [await make_backend(max_job_lifetime=60, sweep_interval=0.1) for _ in range(3)]
    old = Job(id=new_job_id(), template="tokens", cluster="local", created=time.time() - 61)
    await backends[0].create_job(old)
    watched = await asyncio.wait_for(collect(backends[1], old.id), 5)
    assert [event.type for event in watched] == ["fatal"]  # ended once, by one of them
    owner = await redis.get(f"{prefix}lease:sweep")
    assert owner is not None
    await asyncio.sleep(0.3)
    assert await redis.get(f"{prefix}lease:sweep") == owner  # renewed by the same process
