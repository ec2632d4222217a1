"""Counts of this process's long-lived streams (websockets and Server-Sent Events), per job
and in all, against the configured limits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from starlette.requests import HTTPConnection

from metis_stream.errors import TooManyStreams

RETRY_AFTER = 5.0


class SocketSlots:
    """Streams watching jobs; a stream past either limit is refused with 429."""

    def __init__(self, per_job: int, total: int) -> None:
        self._per_job = per_job
        self._total = total
        self._count = 0
        self._by_job: dict[str, int] = {}

    @property
    def open(self) -> int:
        return self._count

    def check(self, job_id: str) -> None:
        """Raise 429 if one more stream of ``job_id`` would be over a limit."""
        if self._count >= self._total:
            raise TooManyStreams("this server has too many open streams; retry later",
                                 RETRY_AFTER)
        if job_id and self._by_job.get(job_id, 0) >= self._per_job:
            raise TooManyStreams(f"job {job_id} has {self._per_job} watchers already",
                                 RETRY_AFTER)

    @contextlib.contextmanager
    def take(self, job_id: str) -> Iterator[None]:
        """One stream watching ``job_id`` (empty for a submit socket before its job exists)."""
        self.check(job_id)
        self._count += 1
        self._by_job[job_id] = self._by_job.get(job_id, 0) + 1
        try:
            yield
        finally:
            self._count -= 1
            self._by_job[job_id] -= 1
            if not self._by_job[job_id]:
                del self._by_job[job_id]


def slots_of(conn: HTTPConnection) -> SocketSlots:
    slots: SocketSlots = conn.app.state.socket_slots
    return slots
