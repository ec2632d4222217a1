"""The production backend: Redis holds the job database and the event logs, and carries
live events between server processes.

Per job (``P`` is the key prefix, ``metis:`` by default):

- ``P job:<id>``: HASH, the :class:`~metis_stream.jobs.Job` fields (text for id,
  template, cluster and state; JSON for the rest), plus ``epoch`` (a random token
  written at creation) and ``order`` (the job's rank in creation order).
- ``P log:<id>``: STREAM, one entry per event with id ``0-<seq>`` and one field
  ``e``: the event's exact wire JSON. Capped at ``max_events_per_job + 1`` (the one
  terminal event still taken at the limit), so the cap never trims an accepted event.
- ``P ids:<id>``: HASH, idempotency id -> seq.
- ``P ch:<id>``: the pub/sub channel that carries each new event's wire JSON.

Indexes: ``P jobs:state:<state>`` and ``P jobs:cluster:<cluster>``, sorted sets of
job ids scored by ``order``. Ids of expired jobs are dropped when a listing meets them.

One Lua script appends a whole batch (checks, seqs, log, job hash, index, expiry,
PUBLISH) in one round trip: Redis runs it atomically, so every process sees the
same seqs, and an event is published only if it is in the log. docs/redis.md has
the operator's view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from metis_stream.backends.contract import DEFAULT_MAX_EVENTS_PER_JOB, READ_PAGE, AppendResult
from metis_stream.backends.hub import Hub, Subscription
from metis_stream.backends.redis.coalescer import Coalescer
from metis_stream.backends.redis.codec import (
    job_from_hash,
    job_patch,
    job_to_hash,
    to_json,
    wire_head,
    wire_tail,
)
from metis_stream.backends.redis.connection import (
    CONNECTION_ERRORS,
    command_client,
    pubsub_factory,
    unavailable_on_errors,
)
from metis_stream.backends.redis.scripts import (
    APPEND_LUA,
    CREATE_LUA,
    LEASE_LUA,
    SCRIPT_ERRORS,
    STATES,
)
from metis_stream.errors import (
    BackendUnavailable,
    JobNotFound,
    LogLost,
)
from metis_stream.events import Event, NewEvent, decode_event
from metis_stream.jobs import (
    Job,
    JobState,
)

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 7 * 24 * 3600.0
_SEEN_CAP = 100_000
_RECONNECT_BASE = 0.05
_RECONNECT_CAP = 2.0


def _backoff(attempt: int) -> float:
    """Capped exponential backoff with jitter, so that many processes do not reconnect in step."""
    return min(_RECONNECT_CAP, _RECONNECT_BASE * 2.0 ** attempt) * random.uniform(0.5, 1.0)


@dataclasses.dataclass(slots=True)
class _Seen:
    """What this process has seen of a job's log: to tell a wiped log from an empty one."""

    epoch: bytes
    seq: int = 0


class _Listener:
    """This process's one pub/sub connection and the one task that reads it.

    The hub calls :meth:`_subscribe` for a job's first local watcher and
    :meth:`_unsubscribe` for its last. A broken connection is replaced with backoff;
    the new one subscribes every job the hub still has, and then every watcher is
    told to backfill from the log what it may have missed meanwhile.
    """

    def __init__(self, pool: ConnectionPool, channel_prefix: str, *, interval: float,
                 timeout: float, store_was_wiped: Callable[[], Awaitable[bool]],
                 on_event: Callable[[Event], None]) -> None:
        self.hub = Hub(on_first=self._subscribe, on_last=self._unsubscribe)
        self._pool = pool
        self._prefix = channel_prefix
        self._interval = interval
        self._timeout = timeout
        self._store_was_wiped = store_was_wiped
        self._on_event = on_event
        self._conn: AbstractConnection | None = None
        self._confirmations: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._ping_pending = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with unavailable_on_errors():
            await self._connect()
        self._task = asyncio.create_task(self._run(), name="metis-stream redis pub/sub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._drop()

    def channel(self, job_id: str) -> bytes:
        return (self._prefix + job_id).encode()

    async def _subscribe(self, job_id: str) -> None:
        """SUBSCRIBE, and return only once Redis confirms: follow() reads the log next."""
        conn = self._conn
        # A connection that is down must not be re-opened here behind the reader's back
        # (send_command would); the reader reconnects and subscribes this job itself.
        if conn is None or not conn.is_connected:
            raise BackendUnavailable("Redis pub/sub is reconnecting")
        channel = self.channel(job_id)
        confirmed = self._expect(channel)
        try:
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
            async with asyncio.timeout(self._timeout):
                await confirmed
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            raise BackendUnavailable(f"Redis did not confirm SUBSCRIBE: {exc!r}") from exc

    async def _unsubscribe(self, job_id: str) -> None:
        conn = self._conn
        if conn is None or not conn.is_connected:
            return  # the next connection subscribes only the jobs the hub still has
        try:
            await conn.send_command("UNSUBSCRIBE", self.channel(job_id), check_health=False)
        except CONNECTION_ERRORS:
            return  # the reader notices the broken connection and reconnects

    def _expect(self, channel: bytes) -> asyncio.Future[None]:
        """A future resolved by the reader at this channel's next subscribe confirmation;
        Redis confirms in the order the SUBSCRIBEs were sent, hence a FIFO per channel."""
        future = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, deque()).append(future)
        return future

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                    attempt = 0
                await self._read()
            except Exception as exc:
                # Whatever broke (the connection, or a message that would not decode), a
                # fresh connection and a backfill from the log lose nothing; a dead reader would
                # leave every watcher of this process waiting forever.
                log.warning("Redis pub/sub reader failed (%r); reconnecting", exc,
                            exc_info=not isinstance(exc, CONNECTION_ERRORS))
                await self._drop()
                await asyncio.sleep(_backoff(attempt))
                attempt += 1

    async def _connect(self) -> None:
        """A new connection, subscribed to every job the hub has, then every watcher
        backfills: what was published while no connection listened is only in the log."""
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        self._conn = conn
        self._ping_pending = False
        channels = [self.channel(job_id) for job_id in self.hub.job_ids]
        if channels:
            confirmations = [self._expect(channel) for channel in channels]
            await conn.send_command("SUBSCRIBE", *channels, check_health=False)
            while not all(future.done() for future in confirmations):
                response = await conn.read_response(timeout=self._timeout)
                if response is None:
                    raise RedisTimeoutError("no SUBSCRIBE confirmation from Redis")
                self._handle(response)
        self.hub.mark_all_lagged()

    async def _read(self) -> None:
        """Read messages; every ``interval`` seconds PING (a half-open connection never
        answers) and check the store was not wiped under a connection that stayed up."""
        assert self._conn is not None
        conn = self._conn
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._interval
        while True:
            response = await conn.read_response(timeout=max(0.0, next_check - loop.time()))
            if response is not None:
                self._ping_pending = False
                self._handle(response)
                continue
            if self._ping_pending:
                raise RedisTimeoutError(f"no answer to PING within {self._interval}s")
            self._ping_pending = True
            await conn.send_command("PING", check_health=False)
            if await self._store_was_wiped():
                log.warning("Redis lost its data (flushed or replaced); watchers re-read logs")
                self.hub.mark_all_lagged()
            next_check = loop.time() + self._interval

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list):
            return  # the PONG of a connection that has no subscription
        kind = response[0]
        if kind == b"message":
            # One message per append: its events' JSON, a line each (encoded JSON never
            # holds a raw newline).
            for wire in response[2].split(b"\n"):
                event = decode_event(wire)
                self._on_event(event)
                self.hub.publish(event.job, event)
        elif kind == b"subscribe":
            waiting = self._confirmations.get(response[1])
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirmations[response[1]]
                if not future.done():  # its subscriber may have timed out or left
                    future.set_result(None)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        for waiting in self._confirmations.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(BackendUnavailable("Redis pub/sub connection lost"))
        self._confirmations.clear()
        if conn is not None:
            await conn.disconnect(nowait=True)


class RedisBackend:
    """Job database, event logs and cross-process delivery in Redis (see docs/redis.md).

    Call :meth:`start` before use and :meth:`close` at shutdown.
    """

    def __init__(self, url: str, *, max_events_per_job: int = DEFAULT_MAX_EVENTS_PER_JOB,
                 retention: float = DEFAULT_RETENTION, key_prefix: str = "metis:",
                 socket_timeout: float = 5.0, health_check_interval: float = 5.0,
                 max_connections: int = 32) -> None:
        self._max_events = max_events_per_job
        self._retention_ms = max(1, int(retention * 1000))
        self._prefix = key_prefix
        name = f"metis-stream:{secrets.token_hex(4)}"
        self.client_name = name
        """CLIENT SETNAME of this instance's connections (its pub/sub one gets ``:pubsub``)."""
        self._client = command_client(url, name=name, socket_timeout=socket_timeout,
                                      max_connections=max_connections)
        self._append_script = self._client.register_script(APPEND_LUA)
        self._appends = Coalescer(self._client, self._append_script)
        self._create_script = self._client.register_script(CREATE_LUA)
        self._lease_script = self._client.register_script(LEASE_LUA)
        pubsub = pubsub_factory(url, name=name, socket_timeout=socket_timeout)
        self._listener = _Listener(pubsub, f"{key_prefix}ch:", interval=health_check_interval,
                                   timeout=socket_timeout, store_was_wiped=self._store_was_wiped,
                                   on_event=self._saw)
        self.hub = self._listener.hub
        self._seen: dict[str, _Seen] = {}
        self._store_token: bytes | None = None

    async def start(self) -> None:
        with unavailable_on_errors():
            for script in (self._append_script, self._create_script, self._lease_script):
                await self._client.script_load(script.script)
            await self._store_was_wiped()
        await self._listener.start()

    async def close(self) -> None:
        await self._listener.close()
        await self._client.aclose()

    # Keys

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    def _job_keys(self, job_id: str) -> list[str]:
        return [self._key("job", job_id), self._key("log", job_id), self._key("ids", job_id)]

    def _state_index(self, state: JobState) -> str:
        return self._key("jobs:state", state.value)

    def _cluster_index(self, cluster: str) -> str:
        return self._key("jobs:cluster", cluster)

    # Job database

    async def create_job(self, job: Job) -> None:
        epoch = secrets.token_hex(8)
        record = job_to_hash(job) | {"epoch": epoch}
        keys = [*self._job_keys(job.id), self._key("jobs", "order"),
                self._cluster_index(job.cluster), *map(self._state_index, STATES)]
        args: list[str | int] = [job.id, STATES.index(job.state) + 1,
                *(item for pair in record.items() for item in pair)]
        with unavailable_on_errors():
            await self._create_script(keys=keys, args=args)
        self._remember(job.id, epoch.encode())

    async def get_job(self, job_id: str) -> Job:
        with unavailable_on_errors():
            raw = cast(dict[bytes, bytes], await self._client.hgetall(self._key("job", job_id)))
        if not raw:
            raise JobNotFound(job_id)
        self._remember(job_id, raw[b"epoch"])
        return job_from_hash(raw)

    async def list_jobs(self, *, states: Collection[JobState] | None = None,
                        cluster: str | None = None, limit: int = 100) -> list[Job]:
        if states is not None:
            sources = [self._state_index(JobState(state)) for state in set(states)]
        elif cluster is not None:
            sources = [self._cluster_index(cluster)]
        else:
            sources = [self._state_index(state) for state in STATES]
        page = min(max(limit, 50), 1000)
        jobs: list[Job] = []
        below = "+inf"
        with unavailable_on_errors():
            while len(jobs) < limit:
                ids = await self._newest(sources, below, page)
                for job in await self._load(sources, [job_id for job_id, _ in ids]):
                    if (states is None or job.state in states) and cluster in (None, job.cluster):
                        jobs.append(job)
                if len(ids) < page:
                    break
                below = f"({ids[-1][1]!r}"
        return jobs[:limit]

    async def _newest(self, sources: list[str], below: str, page: int
                      ) -> list[tuple[str, float]]:
        """The ``page`` newest ids under score ``below`` across all ``sources``, newest first:
        each source's ``page`` newest are enough to find the overall ``page`` newest."""
        async with self._client.pipeline(transaction=False) as pipe:
            for source in sources:
                pipe.zrevrangebyscore(source, below, "-inf", start=0, num=page, withscores=True)
            replies: list[list[tuple[bytes, float]]] = await pipe.execute()
        merged = sorted((entry for reply in replies for entry in reply),
                        key=lambda entry: entry[1], reverse=True)
        return [(job_id.decode(), score) for job_id, score in merged[:page]]

    async def _load(self, sources: list[str], job_ids: list[str]) -> list[Job]:
        """The records of ``job_ids`` in order; ids whose record expired leave the indexes."""
        async with self._client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self._key("job", job_id))
            records: list[dict[bytes, bytes]] = await pipe.execute()
        gone = [job_id for job_id, raw in zip(job_ids, records, strict=True) if not raw]
        if gone:
            async with self._client.pipeline(transaction=False) as pipe:
                for source in sources:
                    pipe.zrem(source, *gone)
                await pipe.execute()
        return [job_from_hash(raw) for raw in records if raw]

    # Event log

    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        now = time.time()
        head = wire_head(job_id)
        tails = [wire_tail(new, now) for new in events]
        args: list[str | int] = [
            job_id, self._listener.channel(job_id).decode(), to_json(now), int(from_job),
            self._max_events, self._max_events + 1, self._retention_ms, head, len(events),
        ]
        for new, tail in zip(events, tails, strict=True):
            patch = job_patch(new)
            args += [new.type, new.id or "", tail, len(patch) // 2, *patch]
        keys = [*self._job_keys(job_id), *map(self._state_index, STATES)]
        try:
            with unavailable_on_errors():
                seqs, fresh = await self._appends.call(keys, args)
        except ResponseError as exc:
            make_error = SCRIPT_ERRORS.get(str(exc).split(" ", 1)[0])
            if make_error is None:
                raise
            raise make_error(job_id, self._max_events) from None
        appended = [Event(job=job_id, seq=seqs[i - 1], type=events[i - 1].type,
                          data=events[i - 1].data, time=now,
                          wire=head + str(seqs[i - 1]) + tails[i - 1])
                    for i in fresh]
        for event in appended:
            self._saw(event)
        return AppendResult(events=appended, seqs=[int(seq) for seq in seqs])

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE) -> list[Event]:
        start = f"(0-{after}" if after > 0 else "-"
        # What this process had seen before asking: an event published after the read ran
        # may be handled before its answer is, and must not make the log look short.
        seen = self._seen.get(job_id)
        seen_before = seen.seq if seen is not None else 0
        with unavailable_on_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hmget(self._key("job", job_id), ["epoch", "last_seq"])
                pipe.xrange(self._key("log", job_id), start, "+", count=limit)
                (epoch, last_seq), entries = await pipe.execute()
        self._check_log(job_id, epoch, last_seq, after, seen_before)
        events = [decode_event(fields[b"e"]) for _, fields in entries]
        for event in events:
            self._saw(event)
        return events

    def _check_log(self, job_id: str, epoch: bytes | None, last_seq: bytes | None,
                   after: int, seen_before: int) -> None:
        """Refuse to answer "nothing new" for a log that Redis lost: a watcher would
        wait forever, or silently skip the events that later take the lost seqs."""
        seen = self._seen.get(job_id)
        if epoch is None or last_seq is None:
            if seen is not None:
                raise LogLost(f"job {job_id} and its events are gone from Redis "
                              "(flushed, expired, or replaced by an empty server)")
            raise JobNotFound(job_id)
        if seen is None:
            self._remember(job_id, epoch)
        elif seen.epoch != epoch:
            raise LogLost(f"job {job_id} was created again in Redis: its old events are gone")
        elif seen_before >= after > int(last_seq):
            raise LogLost(f"Redis has {int(last_seq)} events of job {job_id}, but event {after} "
                          "was delivered before: Redis lost acknowledged events "
                          "(restored from an older copy?)")

    def _remember(self, job_id: str, epoch: bytes) -> None:
        seen = self._seen.get(job_id)
        if seen is None or seen.epoch != epoch:
            if len(self._seen) >= _SEEN_CAP:
                del self._seen[next(iter(self._seen))]  # the oldest; a dict keeps insertion order
            self._seen[job_id] = _Seen(epoch)

    def _saw(self, event: Event) -> None:
        seen = self._seen.get(event.job)
        if seen is not None and event.seq > seen.seq:
            seen.seq = event.seq

    async def _store_was_wiped(self) -> bool:
        """True when the store's marker changed since the last look: whichever process looks
        first after a wipe writes a new random marker, and every other process sees it differ."""
        marker = self._key("store", "marker")
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(marker, secrets.token_hex(8), nx=True)
            pipe.get(marker)
            _, token = await pipe.execute()
        wiped = self._store_token is not None and token != self._store_token
        self._store_token = token
        return wiped

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        return self.hub.subscribe(job_id)

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        with unavailable_on_errors():
            held = await self._lease_script(keys=[self._key("lease", name)],
                                            args=[owner, max(1, int(ttl * 1000))])
        return bool(held)
