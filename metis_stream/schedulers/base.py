"""The contract between the server and a cluster's scheduler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from metis_stream.templates import Template

__all__ = [
    "JobFiles",
    "Scheduler",
    "SchedulerState",
    "SchedulerStatus",
    "Submission",
]

SchedulerState = Literal["queued", "running", "ended"]


@dataclass(frozen=True, slots=True)
class Submission:
    """Everything a scheduler needs to start one job."""

    job_id: str
    name: str
    """The scheduler's job name: short, ``[A-Za-z0-9_-]``, unique per job."""
    template: Template
    env: Mapping[str, str]
    """``METIS_JOB_ID``, ``METIS_EVENTS_URL`` and one variable per parameter. A scheduler
    that cannot pass a value safely leaves it out: the job reads it from its spec."""
    token: str
    """The job's secret: delivered in a file readable only by the job's user, never in env."""
    spec: Mapping[str, object] = field(default_factory=dict)
    """The job's full spec (params, inputs), for jobs whose values did not fit the env."""


@dataclass(frozen=True, slots=True)
class SchedulerStatus:
    """What the scheduler knows of one job."""

    state: SchedulerState
    exit_status: int | None = None
    detail: str = ""
    """The scheduler's own words for the state, such as ``C`` or ``TIMEOUT``."""


@dataclass(frozen=True, slots=True)
class JobFiles:
    """What a job's folder tells of its end (see metis_stream.launcher)."""

    exit: bytes | None = None
    """The launcher's ``exit`` file; None when it has not written one."""
    stderr_tail: bytes | None = None
    """The end of the script's ``stderr`` file."""
    stderr_cut: bool = False
    """True when ``stderr_tail`` may begin in the middle of a line."""

    @classmethod
    def as_read(cls, exit: bytes | None, stderr_tail: bytes | None) -> JobFiles:
        """The files as a scheduler read them: at most EXIT_FILE_BYTES of ``exit`` and
        the last STDERR_TAIL_BYTES of ``stderr``, which a full read may have cut."""
        return cls(exit=exit, stderr_tail=stderr_tail,
                   stderr_cut=stderr_tail is not None and len(stderr_tail) == STDERR_TAIL_BYTES)


EXIT_FILE_BYTES = 64
"""How much of the ``exit`` file is read: one short line."""
STDERR_TAIL_BYTES = 64 * 1024
"""How much of the end of ``stderr`` is read: enough for a traceback's last lines."""


class Scheduler(Protocol):
    """One cluster's batch system, as the server uses it."""

    name: str
    poll_interval: float
    shared: bool
    """True when every server process sees the same jobs (a cluster's batch system): one
    process at a time polls it. False for the local scheduler, whose jobs are children of
    one process: each process polls only its own, and a job it does not know is not
    taken for vanished."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, submission: Submission) -> str:
        """Submit and return the scheduler's job id."""
        ...

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        """Status of the given jobs in one batched query; an id the scheduler no longer
        knows is left out of the result."""
        ...

    async def cancel(self, scheduler_id: str) -> None: ...

    async def read_job_files(self, job_id: str) -> JobFiles:
        """The ``exit`` file and the end of ``stderr`` in the job's folder, for a job that
        ended without reporting it. Raises SchedulerError when they cannot be read."""
        ...

    async def release(self, job_id: str) -> None:
        """The job has ended: remove its token file and anything else staged for it."""
        ...
