"""The production backend: Redis holds the job database and the event logs, and carries
live events between server processes.

Per job (``P`` is the key prefix, ``metis:`` by default):

- ``P job:<id>``: HASH, the :class:`~metis_stream.jobs.Job` fields (text for id,
  template, cluster and state; JSON for the rest), plus ``epoch`` (a random token
  written at creation), ``order`` (the job's rank in creation order), ``bytes``
  (the size of its log's wire JSON, against ``max_job_bytes``) and ``spool`` (how far
  its spool was read, JSON: metis_stream.spool.SpoolCursor).
- ``P log:<id>``: STREAM, one entry per event with id ``0-<seq>`` and one field
  ``e``: the event's exact wire JSON. Capped at ``max_events_per_job + 1`` (the one
  terminal event still taken at the limit), so the cap never trims an accepted event.
- ``P ids:<id>``: HASH, idempotency id -> seq.
- ``P ch:<id>``: the pub/sub channel that carries each new event's wire JSON.

Webhooks (metis_stream.deliverer): ``P changes``, STREAM, one entry per appended batch
(``j`` job id, ``f`` and ``l`` its first and last seq), written by the append script only
on a server with webhooks and trimmed to ``changes_kept``; ``P webhook:<name>``, HASH,
``cursor`` (the webhook's place in ``changes``) and ``job:<id>`` -> JSON of its progress
with that job (metis_stream.webhooks.HookProgress); ``P webhooks:failed``, HASH, dead
letter id -> JSON (metis_stream.webhooks.DeadLetter).

Per cluster: ``P clusters:health``, HASH, cluster name -> its health as JSON
(metis_stream.clusters.ClusterHealth), written by the process that polls it.

Agent links (metis_stream.shells.agent): ``P agent:ops:<cluster>``, LIST, the operations
waiting for the cluster's agent (RPUSH by any process, BLPOP by the process its poll
reached); ``P agent:inbox:<inbox>``, LIST, the replies for one shell of one process
(expiring ``AGENT_INBOX_TTL`` after the last); ``P agents:all``, HASH, cluster name -> what
is known of its agent as JSON (metis_stream.clusters.AgentPresence).

Indexes: ``P jobs:state:<state>``, ``P jobs:cluster:<cluster>``, ``P jobs:owner:<key
name>`` (jobs created by a named key: metis_stream.keys) and ``P jobs:user:<end user>``
(jobs given one), sorted sets of job ids scored by ``order``. A listing pages through the
smallest of the indexes its filters name (by ZCARD) and checks the other filters on each
record, so a client key's listing costs about its own jobs, and one end user's about
that user's. Ids of expired jobs are dropped when a listing meets them, and by the
sweep: every ``sweep_interval``, whichever process holds the ``sweep`` lease removes the
index entries of expired jobs and ends with a ``fatal`` event every unfinished job older
than ``max_job_lifetime``, whose keys then expire like those of any ended job.

One Lua script appends a whole batch (checks, seqs, log, job hash, index, expiry,
PUBLISH) in one round trip: Redis runs it atomically, so every process sees the
same seqs, and an event is published only if it is in the log. docs/redis.md has
the operator's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

import anyio
import orjson
from redis.exceptions import ResponseError

from metis_stream.backends.contract import (
    DEFAULT_MAX_EVENTS_PER_JOB,
    DEFAULT_MAX_JOB_BYTES,
    READ_PAGE,
    READ_PAGE_BYTES,
    AppendResult,
    JobLimits,
)
from metis_stream.backends.hub import Subscription
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
    command_client,
    pubsub_factory,
    unavailable_on_errors,
)
from metis_stream.backends.redis.listener import Listener
from metis_stream.backends.redis.scripts import (
    APPEND_LUA,
    CREATE_LUA,
    LEASE_LUA,
    READ_LUA,
    SCRIPT_ERRORS,
    SET_FIELD_LUA,
    STATES,
)
from metis_stream.clusters import AgentPresence, ClusterHealth
from metis_stream.errors import JobEnded, JobNotFound, LogLost, MetisError, NotFound
from metis_stream.events import Event, NewEvent, decode_event
from metis_stream.jobs import Job, JobState
from metis_stream.spool import SpoolCursor
from metis_stream.webhooks import Change, DeadLetter, HookProgress

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 7 * 24 * 3600.0
DEFAULT_MAX_JOB_LIFETIME = 30 * 24 * 3600.0
DEFAULT_SWEEP_INTERVAL = 600.0
_SEEN_CAP = 100_000
AGENT_INBOX_TTL = 600
_BLOCK_SLICE = 1.0
"""The longest BLPOP: well under the socket timeout, which a blocked read would hit."""
_SWEEP_PAGE = 500


@dataclasses.dataclass(slots=True)
class _Seen:
    """What this process has seen of a job's log: to tell a wiped log from an empty one."""

    epoch: bytes
    seq: int = 0


class RedisBackend:
    """Job database, event logs and cross-process delivery in Redis (see docs/redis.md).

    Call :meth:`start` before use and :meth:`close` at shutdown.
    """

    def __init__(self, url: str, *, max_events_per_job: int = DEFAULT_MAX_EVENTS_PER_JOB,
                 max_job_bytes: int = DEFAULT_MAX_JOB_BYTES,
                 retention: float = DEFAULT_RETENTION,
                 max_job_lifetime: float = DEFAULT_MAX_JOB_LIFETIME,
                 sweep_interval: float = DEFAULT_SWEEP_INTERVAL, key_prefix: str = "metis:",
                 socket_timeout: float = 5.0, health_check_interval: float = 5.0,
                 max_connections: int = 32, changes_kept: float = 0.0) -> None:
        self._limits = JobLimits(events=max_events_per_job, bytes=max_job_bytes)
        self._retention_ms = max(1, int(retention * 1000))
        self._max_lifetime = max_job_lifetime
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._sweeping: anyio.CancelScope | None = None
        self._prefix = key_prefix
        self._changes_kept_ms = max(0, int(changes_kept * 1000))
        name = f"metis-stream:{secrets.token_hex(4)}"
        self.client_name = name
        """CLIENT SETNAME of this instance's connections (its pub/sub one gets ``:pubsub``)."""
        self._client = command_client(url, name=name, socket_timeout=socket_timeout,
                                      max_connections=max_connections)
        self._append_script = self._client.register_script(APPEND_LUA)
        self._appends = Coalescer(self._client, self._append_script)
        self._create_script = self._client.register_script(CREATE_LUA)
        self._lease_script = self._client.register_script(LEASE_LUA)
        self._set_field_script = self._client.register_script(SET_FIELD_LUA)
        self._read_script = self._client.register_script(READ_LUA)
        pubsub = pubsub_factory(url, name=name, socket_timeout=socket_timeout)
        self._listener = Listener(pubsub, f"{key_prefix}ch:", interval=health_check_interval,
                                  timeout=socket_timeout, store_was_wiped=self._store_was_wiped,
                                  on_event=self._saw)
        self.hub = self._listener.hub
        self._seen: dict[str, _Seen] = {}
        self._store_token: bytes | None = None

    async def start(self) -> None:
        with unavailable_on_errors():
            for script in (self._append_script, self._create_script, self._lease_script,
                           self._set_field_script, self._read_script):
                await self._client.script_load(script.script)
            await self._store_was_wiped()
        await self._listener.start()
        self._sweeping = anyio.CancelScope()
        self._sweeper = asyncio.create_task(self._sweep_forever(self._sweeping),
                                            name="metis-stream redis sweep")

    async def close(self) -> None:
        if self._sweeper is not None and self._sweeping is not None:
            self._sweeping.cancel()
            await self._sweeper
            self._sweeper = self._sweeping = None
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

    def _owner_index(self, owner: str) -> str:
        return self._key("jobs:owner", owner)

    def _user_index(self, user: str) -> str:
        return self._key("jobs:user", user)

    def _indexes_of(self, job: Job) -> list[str]:
        """The indexes besides the state's that list ``job``."""
        indexes = [self._cluster_index(job.cluster)]
        if job.owner:
            indexes.append(self._owner_index(job.owner))
        if job.user:
            indexes.append(self._user_index(job.user))
        return indexes

    # Job database

    async def create_job(self, job: Job) -> None:
        epoch = secrets.token_hex(8)
        record = job_to_hash(job) | {"epoch": epoch}
        keys = [*self._job_keys(job.id), self._key("jobs", "order"),
                *map(self._state_index, STATES), *self._indexes_of(job)]
        args: list[str | int] = [job.id, STATES.index(job.state) + 1, len(STATES),
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

    async def set_error_detail(self, job_id: str, detail: str) -> None:
        with unavailable_on_errors():
            found = await self._set_field_script(keys=[self._key("job", job_id)],
                                                 args=["error_detail", to_json(detail)])
        if not found:
            raise JobNotFound(job_id)

    async def spool_cursors(self, job_ids: Sequence[str]) -> dict[str, SpoolCursor]:
        with unavailable_on_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self._key("job", job_id), "spool")
                raw: list[bytes | None] = await pipe.execute()
        return {job_id: SpoolCursor.from_json(orjson.loads(value))
                for job_id, value in zip(job_ids, raw, strict=True) if value}

    async def set_spool_cursor(self, job_id: str, cursor: SpoolCursor) -> None:
        with unavailable_on_errors():
            found = await self._set_field_script(keys=[self._key("job", job_id)],
                                                 args=["spool", to_json(cursor.as_json())])
        if not found:
            raise JobNotFound(job_id)

    async def list_jobs(self, *, states: Collection[JobState] | None = None,
                        cluster: str | None = None, owner: str | None = None,
                        user: str | None = None, limit: int = 100) -> list[Job]:
        page = min(max(limit, 50), 1000)
        jobs: list[Job] = []
        below = "+inf"
        with unavailable_on_errors():
            sources = await self._narrowest(states, cluster, owner, user)
            while len(jobs) < limit:
                ids = await self._newest(sources, below, page)
                for job in await self._load(sources, [job_id for job_id, _ in ids]):
                    if ((states is None or job.state in states)
                            and cluster in (None, job.cluster) and owner in (None, job.owner)
                            and user in (None, job.user)):
                        jobs.append(job)
                if len(ids) < page:
                    break
                below = f"({ids[-1][1]!r}"
        return jobs[:limit]

    async def _narrowest(self, states: Collection[JobState] | None, cluster: str | None,
                         owner: str | None, user: str | None) -> list[str]:
        """The indexes a listing pages through: of those that its filters name, the ones
        that hold the fewest ids (every job's state indexes when it names none). A job
        without an owner or end user is in no such index, so an empty one is no filter
        to page by."""
        choices: list[list[str]] = []
        if states is not None:
            choices.append([self._state_index(JobState(state)) for state in set(states)])
        if cluster is not None:
            choices.append([self._cluster_index(cluster)])
        if owner:
            choices.append([self._owner_index(owner)])
        if user:
            choices.append([self._user_index(user)])
        if not choices:
            return [self._state_index(state) for state in STATES]
        if len(choices) == 1:
            return choices[0]
        async with self._client.pipeline(transaction=False) as pipe:
            for choice in choices:
                for index in choice:
                    pipe.zcard(index)
            sizes: list[int] = await pipe.execute()
        totals = []
        for choice in choices:
            totals.append(sum(sizes[:len(choice)]))
            sizes = sizes[len(choice):]
        return choices[totals.index(min(totals))]

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

    # Upkeep: one process at a time

    async def _sweep_forever(self, scope: anyio.CancelScope) -> None:
        ttl = max(3 * self._sweep_interval, 5.0)
        # An anyio scope, not Task.cancel(): redis-py can swallow a cancellation that lands
        # at the wrong moment, and the scope cancels again at every await until it is out.
        with scope:
            while True:
                try:
                    if await self.hold_lease("sweep", self.client_name, ttl):
                        await self.sweep()
                except MetisError as exc:
                    log.warning("redis sweep: %s", exc)
                except Exception:  # a bug: the next sweep may still do its work
                    log.exception("redis sweep failed")
                await anyio.sleep(self._sweep_interval)

    async def sweep(self) -> None:
        """End every unfinished job older than ``max_job_lifetime`` with a ``fatal`` event (its
        keys then expire after the retention), and remove from the indexes the ids of jobs
        whose keys have expired. The lease holder runs it every ``sweep_interval``."""
        with unavailable_on_errors():
            ended = await self._end_overdue_jobs()
            indexes = [key.decode() for kind in ("cluster", "owner", "user")
                       async for key in self._client.scan_iter(
                           match=self._key(f"jobs:{kind}", "*"), count=_SWEEP_PAGE)]
            pruned = 0
            for index in [*map(self._state_index, STATES), *indexes]:
                pruned += await self._prune(index)
        if ended or pruned:
            log.info("redis sweep: ended %d jobs past max_job_lifetime, removed %d index "
                     "entries of expired jobs", ended, pruned)

    async def _end_overdue_jobs(self) -> int:
        cutoff = time.time() - self._max_lifetime
        fatal = NewEvent("fatal", {"error": f"the job exceeded the maximum lifetime of "
                                            f"{self._max_lifetime:g} s (max_job_lifetime) "
                                            "without ending"})
        ended = 0
        for state in STATES:
            if state.terminal:
                continue
            async with contextlib.aclosing(self._created(self._state_index(state))) as jobs:
                async for job_id, created in jobs:
                    if created > cutoff:
                        break  # the index is in creation order: the rest are younger
                    with contextlib.suppress(JobEnded, JobNotFound):  # ended meanwhile
                        await self.append(job_id, [fatal])
                        ended += 1
        return ended

    async def _created(self, index: str) -> AsyncGenerator[tuple[str, float], None]:
        """The jobs in ``index``, oldest first, with the time each was created."""
        async with contextlib.aclosing(self._index_pages(index)) as pages:
            async for page in pages:
                async with self._client.pipeline(transaction=False) as pipe:
                    for job_id in page:
                        pipe.hget(self._key("job", job_id), "created")
                    created: list[bytes | None] = await pipe.execute()
                for job_id, when in zip(page, created, strict=True):
                    if when is not None:  # else expired: _prune's business
                        yield job_id, float(when)

    async def _prune(self, index: str) -> int:
        """Remove from ``index`` the ids whose job hash is gone; how many."""
        pruned = 0
        async for page in self._index_pages(index):
            async with self._client.pipeline(transaction=False) as pipe:
                for job_id in page:
                    pipe.exists(self._key("job", job_id))
                exists: list[int] = await pipe.execute()
            gone = [job_id for job_id, there in zip(page, exists, strict=True) if not there]
            if gone:
                await self._client.zrem(index, *gone)
                pruned += len(gone)
        return pruned

    async def _index_pages(self, index: str) -> AsyncGenerator[list[str], None]:
        """The ids in ``index``, oldest first, a page at a time; ids removed meanwhile (by
        the caller, or a job changing state) do not make it skip any."""
        low = "-inf"
        while True:
            page = cast(list[tuple[bytes, float]], await self._client.zrangebyscore(
                index, low, "+inf", start=0, num=_SWEEP_PAGE, withscores=True))
            if not page:
                return
            yield [job_id.decode() for job_id, _ in page]
            if len(page) < _SWEEP_PAGE:
                return
            low = f"({page[-1][1]!r}"

    # Event log

    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        now = time.time()
        head = wire_head(job_id)
        tails = [wire_tail(new, now) for new in events]
        args: list[str | int] = [
            job_id, self._listener.channel(job_id).decode(), to_json(now), int(from_job),
            self._limits.events, self._limits.events + 1, self._retention_ms, head, len(events),
            self._limits.bytes, self._changes_kept_ms,
        ]
        for new, tail in zip(events, tails, strict=True):
            patch = job_patch(new)
            args += [new.type, new.id or "", tail, len(patch) // 2, *patch]
        keys = [*self._job_keys(job_id), *map(self._state_index, STATES),
                self._key("changes", "all")]
        try:
            with unavailable_on_errors():
                seqs, fresh = await self._appends.call(keys, args)
        except ResponseError as exc:
            make_error = SCRIPT_ERRORS.get(str(exc).split(" ", 1)[0])
            if make_error is None:
                raise
            raise make_error(job_id, self._limits) from None
        appended = [Event(job=job_id, seq=seqs[i - 1], type=events[i - 1].type,
                          data=events[i - 1].data, time=now, via=events[i - 1].via,
                          element=events[i - 1].element,
                          wire=head + str(seqs[i - 1]) + tails[i - 1])
                    for i in fresh]
        for event in appended:
            self._saw(event)
        return AppendResult(events=appended, seqs=[int(seq) for seq in seqs])

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Event]:
        start = f"(0-{after}" if after > 0 else "-"
        # What this process had seen before asking: an event published after the read ran
        # may be handled before its answer is, and must not make the log look short.
        seen = self._seen.get(job_id)
        seen_before = seen.seq if seen is not None else 0
        with unavailable_on_errors():
            epoch, last_seq, wires = await self._read_script(
                keys=[self._key("job", job_id), self._key("log", job_id)],
                args=[start, limit, max_bytes])
        self._check_log(job_id, epoch, last_seq, after, seen_before)
        events = [decode_event(wire) for wire in wires]
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

    async def set_cluster_health(self, health: ClusterHealth) -> None:
        with unavailable_on_errors():
            await self._client.hset(self._key("clusters", "health"), health.name,
                                    to_json(health.as_json()))

    async def cluster_health(self) -> dict[str, ClusterHealth]:
        with unavailable_on_errors():
            raw = cast(dict[bytes, bytes],
                       await self._client.hgetall(self._key("clusters", "health")))
        return {name.decode(): ClusterHealth.from_json(orjson.loads(value))
                for name, value in raw.items()}

    # Agent links

    async def agent_send(self, cluster: str, operation: bytes) -> None:
        with unavailable_on_errors():
            await self._client.rpush(self._key("agent", f"ops:{cluster}"), operation)

    async def agent_withdraw(self, cluster: str, operation: bytes) -> bool:
        with unavailable_on_errors():
            removed = await self._client.lrem(  # redis-py's stubs say str; bytes are sent as is
                self._key("agent", f"ops:{cluster}"), 1, operation)  # type: ignore[arg-type]
        return bool(removed)

    async def agent_take(self, cluster: str, *, wait: float, limit: int) -> list[bytes]:
        return await self._take_list(self._key("agent", f"ops:{cluster}"), wait, limit)

    async def agent_reply(self, inbox: str, reply: bytes) -> None:
        key = self._key("agent", f"inbox:{inbox}")
        with unavailable_on_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, reply)
                pipe.expire(key, AGENT_INBOX_TTL)
                await pipe.execute()

    async def agent_replies(self, inbox: str, *, wait: float) -> list[bytes]:
        return await self._take_list(self._key("agent", f"inbox:{inbox}"), wait, READ_PAGE)

    async def _take_list(self, key: str, wait: float, limit: int) -> list[bytes]:
        """Up to ``limit`` items from the head of a list, blocking up to ``wait`` seconds
        for the first in short BLPOPs."""
        deadline = time.monotonic() + wait
        with unavailable_on_errors():
            while True:
                items = cast(list[bytes] | None, await self._client.lpop(key, limit))
                if items:
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                popped = cast(tuple[bytes, bytes] | None, await self._client.blpop(
                    [key], timeout=min(_BLOCK_SLICE, max(0.01, remaining))))
                if popped is not None:
                    rest = (cast(list[bytes] | None, await self._client.lpop(key, limit - 1))
                            if limit > 1 else None)
                    return [popped[1], *(rest or [])]

    async def set_agent_presence(self, presence: AgentPresence) -> None:
        with unavailable_on_errors():
            await self._client.hset(self._key("agents", "all"), presence.name,
                                    to_json(presence.as_json()))

    async def agent_presence(self) -> dict[str, AgentPresence]:
        with unavailable_on_errors():
            raw = cast(dict[bytes, bytes], await self._client.hgetall(self._key("agents", "all")))
        return {name.decode(): AgentPresence.from_json(orjson.loads(value))
                for name, value in raw.items()}

    # Webhooks

    async def changes(self, after: str, limit: int = READ_PAGE) -> list[Change]:
        with unavailable_on_errors():
            entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await self._client.xrange(
                self._key("changes", "all"), f"({after}", "+", count=limit))
        return [Change(entry_id.decode(), fields[b"j"].decode(), int(fields[b"f"]),
                       int(fields[b"l"])) for entry_id, fields in entries]

    async def changes_end(self) -> str:
        with unavailable_on_errors():
            last = cast(list[tuple[bytes, Any]], await self._client.xrevrange(
                self._key("changes", "all"), "+", "-", count=1))
        return last[0][0].decode() if last else "0-0"

    async def webhook_progress(self, webhook: str) -> tuple[str | None, dict[str, HookProgress]]:
        with unavailable_on_errors():
            raw = cast(dict[bytes, bytes],
                       await self._client.hgetall(self._key("webhook", webhook)))
        cursor = raw.pop(b"cursor", None)
        return (None if cursor is None else cursor.decode(),
                {name.decode().removeprefix("job:"): HookProgress.from_json(orjson.loads(value))
                 for name, value in raw.items()})

    async def save_webhook_progress(self, webhook: str, *, cursor: str | None = None,
                                    jobs: Mapping[str, HookProgress | None] | None = None
                                    ) -> None:
        jobs = jobs or {}
        kept = {f"job:{job_id}": to_json(progress.as_json())
                for job_id, progress in jobs.items() if progress is not None}
        if cursor is not None:
            kept["cursor"] = cursor
        gone = [f"job:{job_id}" for job_id, progress in jobs.items() if progress is None]
        key = self._key("webhook", webhook)
        with unavailable_on_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                if kept:
                    pipe.hset(key, mapping=kept)  # type: ignore[arg-type]
                if gone:
                    pipe.hdel(key, *gone)
                await pipe.execute()

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        with unavailable_on_errors():
            await self._client.hset(self._key("webhooks", "failed"), letter.id,
                                    to_json(letter.as_json()))

    async def dead_letters(self) -> list[DeadLetter]:
        with unavailable_on_errors():
            raw = cast(dict[bytes, bytes],
                       await self._client.hgetall(self._key("webhooks", "failed")))
        letters = [DeadLetter.from_json(orjson.loads(value)) for value in raw.values()]
        return sorted(letters, key=lambda letter: letter.failed)

    async def remove_dead_letter(self, letter_id: str) -> DeadLetter:
        key = self._key("webhooks", "failed")
        with unavailable_on_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hget(key, letter_id)
                pipe.hdel(key, letter_id)
                raw, _ = await pipe.execute()
        if raw is None:
            raise NotFound(f"no dead letter {letter_id[:200]!r}")
        return DeadLetter.from_json(orjson.loads(raw))

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        with unavailable_on_errors():
            held = await self._lease_script(keys=[self._key("lease", name)],
                                            args=[owner, max(1, int(ttl * 1000))])
        return bool(held)
