"""Counts of what this process holds open against the configured limits: long-lived streams
(websockets and Server-Sent Events) per job and in all, and history reads per client."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator

from starlette.requests import HTTPConnection

from metis_stream.errors import TooManyStreams

RETRY_AFTER = 5.0
HISTORY_RETRY_AFTER = 1.0


class Tally:
    """How many of something each key holds at once, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[Hashable, int] = {}

    def full(self, key: Hashable) -> bool:
        return self._held.get(key, 0) >= self.limit

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """One more for ``key`` while the block runs (checking the limit is the caller's)."""
        self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                del self._held[key]


class SocketSlots:
    """Streams watching jobs; a stream past any limit is refused with 429."""

    def __init__(self, per_job: int, total: int, per_client: int) -> None:
        self._total = total
        self._count = 0
        self._by_job = Tally(per_job)
        self._by_client = Tally(per_client)
        """Keyed by (client, job): one client's streams of one job."""

    @property
    def open(self) -> int:
        return self._count

    def _check(self, job_id: str, client: str) -> None:
        """Raise 429 if one more stream of ``job_id`` for ``client`` would be over a limit."""
        if self._count >= self._total:
            raise TooManyStreams("this server has too many open streams; retry later",
                                 RETRY_AFTER)
        if not job_id:
            return  # a submit socket: its job does not exist yet
        if self._by_job.full(job_id):
            raise TooManyStreams(f"job {job_id} has {self._by_job.limit} watchers already",
                                 RETRY_AFTER)
        if self._by_client.full((client, job_id)):
            raise TooManyStreams(f"you have {self._by_client.limit} streams of job {job_id} "
                                 "open already", RETRY_AFTER)

    @contextlib.contextmanager
    def take(self, job_id: str, client: str) -> Iterator[None]:
        """One stream watching ``job_id`` (empty for a submit socket before its job exists)
        for ``client`` (``auth.client_identity``)."""
        self._check(job_id, client)
        self._count += 1
        try:
            with self._by_job.hold(job_id), self._by_client.hold((client, job_id)):
                yield
        finally:
            self._count -= 1


class HistoryReads:
    """History pages being read, per client: each holds a page of events until it is sent."""

    def __init__(self, per_client: int) -> None:
        self._by_client = Tally(per_client)

    @contextlib.contextmanager
    def take(self, client: str) -> Iterator[None]:
        if self._by_client.full(client):
            raise TooManyStreams("too many history reads at once from this client; read "
                                 "one page after another", HISTORY_RETRY_AFTER)
        with self._by_client.hold(client):
            yield


def slots_of(conn: HTTPConnection) -> SocketSlots:
    slots: SocketSlots = conn.app.state.socket_slots
    return slots


def history_reads_of(conn: HTTPConnection) -> HistoryReads:
    reads: HistoryReads = conn.app.state.history_reads
    return reads
