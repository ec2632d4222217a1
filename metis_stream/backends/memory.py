"""The embedded backend: everything in this process's memory.

For the demo, tests and a single server process. Nothing survives a restart;
use the Redis backend for that and for several processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace

from metis_stream.backends.contract import (
    DEFAULT_MAX_EVENTS_PER_JOB,
    DEFAULT_MAX_JOB_BYTES,
    READ_PAGE,
    READ_PAGE_BYTES,
    AppendResult,
    JobLimits,
)
from metis_stream.backends.hub import Hub, Subscription
from metis_stream.clusters import AgentPresence, ClusterHealth
from metis_stream.errors import JobEnded, JobNotFound, JobNotSubmitted, NotFound
from metis_stream.events import Event, NewEvent, decode_event
from metis_stream.jobs import Job, JobState, apply_event
from metis_stream.spool import SpoolCursor
from metis_stream.webhooks import Change, DeadLetter, HookProgress


@dataclass
class _Entry:
    job: Job
    log: list[str] = field(default_factory=list)
    """Each event's wire JSON, seq 1 first: one copy of the event, decoded when read (an
    Event would keep its decoded data beside it, twice the memory)."""
    size: int = 0
    """The bytes of the log's wire JSON, against the job's budget."""
    seq_of_key: dict[str, int] = field(default_factory=dict)
    spool: SpoolCursor | None = None


class _Queue:
    """Items in order, and a way to wait for the next."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.arrived = asyncio.Event()

    def put(self, item: bytes) -> None:
        self.items.append(item)
        self.arrived.set()

    async def take(self, wait: float, limit: int) -> list[bytes]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while not self.items:
                    self.arrived.clear()
                    await self.arrived.wait()
        return [self.items.popleft() for _ in range(min(limit, len(self.items)))]


class MemoryBackend:
    def __init__(self, *, max_events_per_job: int = DEFAULT_MAX_EVENTS_PER_JOB,
                 max_job_bytes: int = DEFAULT_MAX_JOB_BYTES, changes_kept: float = 0.0
                 ) -> None:
        self.hub = Hub()
        self._entries: dict[str, _Entry] = {}
        self._health: dict[str, ClusterHealth] = {}
        self._limits = JobLimits(events=max_events_per_job, bytes=max_job_bytes)
        self._changes_kept = changes_kept
        self._changes: deque[tuple[float, Change]] = deque()
        self._last_change = 0
        self._webhooks: dict[str, tuple[str | None, dict[str, HookProgress]]] = {}
        self._dead_letters: dict[str, DeadLetter] = {}
        self._agent_queues: dict[str, _Queue] = {}
        self._agent_presence: dict[str, AgentPresence] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create_job(self, job: Job) -> None:
        self._entries[job.id] = _Entry(job=replace(job))

    async def get_job(self, job_id: str) -> Job:
        return replace(self._entry(job_id).job)

    async def list_jobs(self, *, states: Collection[JobState] | None = None,
                        cluster: str | None = None, owner: str | None = None,
                        user: str | None = None, limit: int = 100) -> list[Job]:
        jobs = []
        for entry in reversed(self._entries.values()):
            job = entry.job
            if ((states is None or job.state in states) and cluster in (None, job.cluster)
                    and owner in (None, job.owner) and user in (None, job.user)):
                jobs.append(replace(job))
                if len(jobs) >= limit:
                    break
        return jobs

    async def set_error_detail(self, job_id: str, detail: str) -> None:
        self._entry(job_id).job.error_detail = detail

    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        entry = self._entry(job_id)
        job = entry.job
        if from_job and job.state in (JobState.CREATED, JobState.SUBMITTING):
            raise JobNotSubmitted(job_id)
        seqs, appended, keys = self._plan(entry, events, time.time())
        for event in appended:
            entry.log.append(event.wire)
            entry.size += event.size
            apply_event(job, event)
        entry.seq_of_key.update(keys)
        if appended and self._changes_kept > 0:
            self._journal(job_id, appended[0].seq, appended[-1].seq)
        for event in appended:
            self.hub.publish(job_id, event)
        return AppendResult(events=appended, seqs=seqs)

    def _plan(self, entry: _Entry, events: Sequence[NewEvent], now: float
              ) -> tuple[list[int], list[Event], dict[str, int]]:
        """Check a whole batch before anything changes: all or nothing."""
        job = entry.job
        ended = job.state.terminal
        size = entry.size
        seqs: list[int] = []
        fresh: list[Event] = []
        keys: dict[str, int] = {}
        for new in events:
            known = keys.get(new.id) if new.id else None
            if new.id and known is None:
                known = entry.seq_of_key.get(new.id)
            if known is not None:
                seqs.append(known)
                continue
            if ended:
                raise JobEnded(job.id)
            event = Event(job=job.id, seq=job.last_seq + len(fresh) + 1, type=new.type,
                          data=new.data, time=now, via=new.via, element=new.element)
            size += event.size
            if not new.terminal:
                if len(entry.log) + len(fresh) >= self._limits.events:
                    raise self._limits.events_reached(job.id)
                if size > self._limits.bytes:
                    raise self._limits.bytes_reached(job.id)
            if new.id:
                keys[new.id] = event.seq
            seqs.append(event.seq)
            fresh.append(event)
            ended = new.terminal
        return seqs, fresh, keys

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Event]:
        page: list[Event] = []
        size = 0
        for wire in self._entry(job_id).log[after:after + limit]:
            page.append(decode_event(wire))
            size += page[-1].size
            if size >= max_bytes:
                break
        return page

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        return self.hub.subscribe(job_id)

    async def spool_cursors(self, job_ids: Sequence[str]) -> dict[str, SpoolCursor]:
        entries = [self._entries.get(job_id) for job_id in job_ids]
        return {job_id: entry.spool for job_id, entry in zip(job_ids, entries, strict=True)
                if entry is not None and entry.spool is not None}

    async def set_spool_cursor(self, job_id: str, cursor: SpoolCursor) -> None:
        self._entry(job_id).spool = cursor

    async def set_cluster_health(self, health: ClusterHealth) -> None:
        self._health[health.name] = health

    async def cluster_health(self) -> dict[str, ClusterHealth]:
        return dict(self._health)

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        return True  # one process: nobody else to share with

    async def agent_send(self, cluster: str, operation: bytes) -> None:
        self._agent_queue(f"ops:{cluster}").put(operation)

    async def agent_withdraw(self, cluster: str, operation: bytes) -> bool:
        items = self._agent_queue(f"ops:{cluster}").items
        if operation not in items:
            return False
        items.remove(operation)
        return True

    async def agent_take(self, cluster: str, *, wait: float, limit: int) -> list[bytes]:
        return await self._agent_queue(f"ops:{cluster}").take(wait, limit)

    async def agent_reply(self, inbox: str, reply: bytes) -> None:
        queue = self._agent_queues.get(f"inbox:{inbox}")
        if queue is not None:  # else its shell is gone: nobody would take it
            queue.put(reply)

    async def agent_replies(self, inbox: str, *, wait: float) -> list[bytes]:
        return await self._agent_queue(f"inbox:{inbox}").take(wait, READ_PAGE)

    async def set_agent_presence(self, presence: AgentPresence) -> None:
        self._agent_presence[presence.name] = presence

    async def agent_presence(self) -> dict[str, AgentPresence]:
        return dict(self._agent_presence)

    def _agent_queue(self, name: str) -> _Queue:
        return self._agent_queues.setdefault(name, _Queue())

    def _journal(self, job_id: str, first: int, last: int) -> None:
        now = time.time()
        while self._changes and self._changes[0][0] < now - self._changes_kept:
            self._changes.popleft()
        self._last_change += 1
        self._changes.append((now, Change(str(self._last_change), job_id, first, last)))

    async def changes(self, after: str, limit: int = READ_PAGE) -> list[Change]:
        position = int(after)
        return [change for _, change in self._changes if int(change.id) > position][:limit]

    async def changes_end(self) -> str:
        return str(self._last_change)

    async def webhook_progress(self, webhook: str) -> tuple[str | None, dict[str, HookProgress]]:
        cursor, jobs = self._webhooks.get(webhook, (None, {}))
        return cursor, dict(jobs)

    async def save_webhook_progress(self, webhook: str, *, cursor: str | None = None,
                                    jobs: Mapping[str, HookProgress | None] | None = None
                                    ) -> None:
        kept, progress = self._webhooks.setdefault(webhook, (None, {}))
        for job_id, job in (jobs or {}).items():
            if job is None:
                progress.pop(job_id, None)
            else:
                progress[job_id] = job
        self._webhooks[webhook] = (kept if cursor is None else cursor, progress)

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        self._dead_letters[letter.id] = letter

    async def dead_letters(self) -> list[DeadLetter]:
        return sorted(self._dead_letters.values(), key=lambda letter: letter.failed)

    async def remove_dead_letter(self, letter_id: str) -> DeadLetter:
        try:
            return self._dead_letters.pop(letter_id)
        except KeyError:
            raise NotFound(f"no dead letter {letter_id[:200]!r}") from None

    def _entry(self, job_id: str) -> _Entry:
        try:
            return self._entries[job_id]
        except KeyError:
            raise JobNotFound(job_id) from None
