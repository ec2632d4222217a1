"""The contract of a backend: the job database, each job's event log, and live delivery.

A backend stores job records and each job's event log, and delivers appended
events to the watchers of this process through its :class:`~metis_stream.backends.hub.Hub`.
``memory`` and ``redis`` implement it; :func:`~metis_stream.backends.follow.follow`
reads any of them. Pure: a Protocol, its result record and the limits shared by all.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from metis_stream.backends.hub import Hub, Subscription
from metis_stream.clusters import AgentPresence, ClusterHealth
from metis_stream.errors import EventLimitReached
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job, JobState
from metis_stream.spool import SpoolCursor
from metis_stream.webhooks import Change, DeadLetter, HookProgress

__all__ = [
    "AppendResult",
    "Backend",
]

DEFAULT_MAX_EVENTS_PER_JOB = 10_000
DEFAULT_MAX_JOB_BYTES = 64 * 1024 * 1024
READ_PAGE = 1_000
READ_PAGE_BYTES = 256 * 1024
"""A page of the log stops at READ_PAGE events or at this much wire JSON, whichever comes
first: what one reader holds at once, however large the job's events."""


@dataclass(frozen=True, slots=True)
class JobLimits:
    """What one job's log may hold. Past either limit only a terminal event is still taken,
    so that a job that spent its budget can still say how it ended."""

    events: int = DEFAULT_MAX_EVENTS_PER_JOB
    bytes: int = DEFAULT_MAX_JOB_BYTES
    """The wire JSON of all its events, in UTF-8 bytes."""

    def events_reached(self, job_id: str) -> EventLimitReached:
        return EventLimitReached(f"job {job_id} has reached {self.events} events")

    def bytes_reached(self, job_id: str) -> EventLimitReached:
        return EventLimitReached(f"job {job_id} has reached its budget of {self.bytes} bytes "
                                 "of events")


@dataclass(frozen=True, slots=True)
class AppendResult:
    events: list[Event]
    """The events newly appended, in order."""
    seqs: list[int]
    """For each event asked for, its seq: the original one for a repeated idempotency id."""

    @property
    def duplicates(self) -> int:
        return len(self.seqs) - len(self.events)


def page_is_full(page: Sequence[Event], limit: int = READ_PAGE,
                 max_bytes: int = READ_PAGE_BYTES) -> bool:
    """Whether a page that ``read`` gave stopped at one of its bounds, so that the log may
    go on after it (a shorter page was the end of the log when it was read)."""
    return len(page) >= limit or sum(event.size for event in page) >= max_bytes


class Backend(Protocol):
    hub: Hub

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create_job(self, job: Job) -> None: ...

    async def get_job(self, job_id: str) -> Job:
        """The job's record; raises JobNotFound."""
        ...

    async def list_jobs(self, *, states: Collection[JobState] | None = None,
                        cluster: str | None = None, owner: str | None = None,
                        user: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first: those in one of ``states``, on ``cluster``, created by the
        key named ``owner`` and for the end user ``user``, each filter when given. A
        listing costs about what its narrowest filter holds, never every job."""
        ...

    async def set_error_detail(self, job_id: str, detail: str) -> None:
        """Keep the details of the job's failure on its record (``Job.error_detail``);
        raises JobNotFound."""
        ...

    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        """Append all events atomically, or none: the next seqs, idempotency ids, the job's
        state, and delivery to every watcher on every process.

        Raises JobNotFound, JobEnded (the job already has a terminal event, or one in
        ``events`` is followed by more), EventLimitReached (a non-terminal event past the
        job's event count or byte budget, :class:`JobLimits`), and, when ``from_job`` is true
        and the server has not yet recorded the submission, JobNotSubmitted.
        """
        ...

    async def read(self, job_id: str, after: int = 0, limit: int = READ_PAGE,
                   max_bytes: int = READ_PAGE_BYTES) -> list[Event]:
        """Events with seq > ``after``, oldest first: at most ``limit``, and none after the
        one that brings their wire JSON to ``max_bytes`` (so a page holds at least one)."""
        ...

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        """Live events of a job, from the moment this returns."""
        ...

    async def spool_cursors(self, job_ids: Sequence[str]) -> dict[str, SpoolCursor]:
        """How far each job's spool was read (metis_stream.spool); a job without a cursor,
        or without a record, is left out."""
        ...

    async def set_spool_cursor(self, job_id: str, cursor: SpoolCursor) -> None:
        """Keep how far the job's spool was read, on its record; raises JobNotFound."""
        ...

    async def set_cluster_health(self, health: ClusterHealth) -> None:
        """Keep a cluster's health, as its monitor saw it last, for every process to show."""
        ...

    async def cluster_health(self) -> dict[str, ClusterHealth]:
        """The health each cluster's monitor kept, by cluster name."""
        ...

    async def hold_lease(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew a lease that expires after ``ttl`` seconds unless renewed; False
        while another owner holds it. Several server processes use it so that only one
        polls each cluster."""
        ...

    # Agent links (metis_stream.shells.agent): a queue of operations per cluster, which the
    # poll of the cluster's agent takes from on whichever process it reached, and an inbox
    # per shell for the replies, which the agent may send through any process. Operations
    # and replies are opaque bytes here.

    async def agent_send(self, cluster: str, operation: bytes) -> None:
        """Put ``operation`` at the end of the cluster's queue."""
        ...

    async def agent_withdraw(self, cluster: str, operation: bytes) -> bool:
        """Take ``operation`` back out of the queue: True when it was still there (the
        agent never saw it), False when an agent took it already."""
        ...

    async def agent_take(self, cluster: str, *, wait: float, limit: int) -> list[bytes]:
        """The operations at the head of the queue, oldest first, at most ``limit``,
        waiting up to ``wait`` seconds for the first; each is taken once, by one caller."""
        ...

    async def agent_reply(self, inbox: str, reply: bytes) -> None:
        """Put a reply in ``inbox``; one nobody takes is dropped after a while."""
        ...

    async def agent_replies(self, inbox: str, *, wait: float) -> list[bytes]:
        """The replies in ``inbox``, oldest first, waiting up to ``wait`` seconds for one."""
        ...

    async def set_agent_presence(self, presence: AgentPresence) -> None:
        """Keep what the server knows of a cluster's agent, for every process to show."""
        ...

    async def agent_presence(self) -> dict[str, AgentPresence]:
        """What was kept of each cluster's agent, by cluster name."""
        ...

    # Webhooks (metis_stream.deliverer). Each webhook's deliverer keeps a cursor in a
    # journal of appends (job, first and last seq: a few bytes a batch, written by the
    # append itself) and reads the events from the job's log, rather than copying every
    # event into an outbox per webhook: one write per batch whatever the number of
    # webhooks, and the log stays the one copy of each event.

    async def changes(self, after: str, limit: int = READ_PAGE) -> list[Change]:
        """The appends after ``after`` (a change's id, or :meth:`changes_end`), oldest
        first, at most ``limit``. Kept only by a backend built with ``changes_kept`` above
        0 (a server with webhooks), for that many seconds."""
        ...

    async def changes_end(self) -> str:
        """The id of the last change so far: where a new webhook starts."""
        ...

    async def webhook_progress(self, webhook: str) -> tuple[str | None, dict[str, HookProgress]]:
        """The webhook's cursor in the changes (None: it never ran) and its progress with
        each job that may still have events to send."""
        ...

    async def save_webhook_progress(self, webhook: str, *, cursor: str | None = None,
                                    jobs: Mapping[str, HookProgress | None] | None = None
                                    ) -> None:
        """Keep, at once, the cursor (when given) and each job's progress (None: the job
        has nothing left to send, and is forgotten)."""
        ...

    async def add_dead_letter(self, letter: DeadLetter) -> None: ...

    async def dead_letters(self) -> list[DeadLetter]:
        """Every webhook's dead letters, oldest first."""
        ...

    async def remove_dead_letter(self, letter_id: str) -> DeadLetter:
        """Take a dead letter out (it was replayed); raises NotFound."""
        ...
