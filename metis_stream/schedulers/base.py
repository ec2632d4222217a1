"""The contract between the server and a cluster's scheduler."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import orjson

from metis_stream.errors import SchedulerError, ShellError
from metis_stream.job_folder import JobFolder
from metis_stream.schedulers.flavour import SchedulerFlavour
from metis_stream.shells.base import Shell, SpoolReading
from metis_stream.spool import (
    Frames,
    SpoolRead,
    parse_frames,
    reader_argv,
    sweep_minutes,
    sweeper_argv,
)
from metis_stream.templates import ArrayRange, Template

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
    """The scheduler's job name: ``[A-Za-z0-9_-]``, unique per job (dialect.job_name)."""
    template: Template
    env: Mapping[str, str]
    """``METIS_JOB_ID``, ``METIS_EVENTS_URL`` and one variable per parameter. A scheduler
    that cannot pass a value safely leaves it out: the job reads it from its spec."""
    token: str
    """The job's secret: delivered in a file readable only by the job's user, never in env."""
    spec: Mapping[str, object] = field(default_factory=dict)
    """The job's full spec (params, inputs), for jobs whose values did not fit the env."""
    user: str | None = None
    """The end user the job is for (``Job.user``): already at the end of ``name``."""
    after: tuple[str, ...] = ()
    """Scheduler ids of jobs that must complete successfully before this one starts."""
    after_any: tuple[str, ...] = ()
    """Scheduler ids of jobs that must end, however, before this one starts."""
    array: ArrayRange | None = None
    """Run the script once per index (docs/arrays.md); None: one job."""
    element_tokens: Mapping[int, str] = field(default_factory=dict)
    """An array's tokens, one per element (tokens.element_token), in place of ``token``."""


@dataclass(frozen=True, slots=True)
class SchedulerStatus:
    """What the scheduler knows of one job."""

    state: SchedulerState
    exit_status: int | None = None
    detail: str = ""
    """The scheduler's own words for the state, such as ``job_state=F, Exit_status=-29``
    or ``TIMEOUT, TimeLimit, ExitCode=0:15``."""
    outcome: str = ""
    """How an ended job ended, in its user's words, from the flavour's exit code table
    (exit_codes): ``killed: ran past its 00:30:00 walltime``. Empty when the scheduler
    does not know (yet)."""
    never_runs: bool = False
    """Still queued on the cluster, but it can never start (a dependency that can never
    be met): ``ended`` for the server, which cancels it there."""
    elements: Mapping[int, SchedulerStatus] = field(default_factory=dict)
    """An array's elements that the scheduler listed, by index (a pending range counts
    for each of its indices); empty for a job that is not an array. The array's own
    status is :func:`array_status` of them."""


_STATE_RANK = {"running": 2, "queued": 1, "ended": 0}


def array_status(elements: Mapping[int, SchedulerStatus]) -> SchedulerStatus:
    """An array as alive as its most alive element; once all of them ended, as ended as
    its worst: one failed element fails the array, whichever the scheduler printed first."""
    if not elements:
        raise ValueError("an array status needs at least one element")
    alive = max(elements.values(), key=lambda status: _STATE_RANK[status.state])
    if alive.state != "ended":
        return replace(alive, elements=elements)
    failed = [s for s in elements.values() if s.exit_status != 0 or s.never_runs]
    worst = failed[0] if failed else alive
    return replace(worst, elements=elements)


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
    flavour: SchedulerFlavour | None
    """Which batch system answers, once known (None: not known, or the local scheduler)."""
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

    async def read_element_exits(self, job_id: str) -> Mapping[int, bytes | None]:
        """An array's elements that started, by index: each one's ``exit`` file, or None
        while it has none. One command. Raises SchedulerError when it cannot run."""
        ...

    async def read_spools(self, reads: Sequence[SpoolRead]) -> Frames:
        """The new bytes of these jobs' spools, read with one command (metis_stream.spool).
        Raises SchedulerError when it cannot run."""
        ...

    async def remove_old_spools(self, keep_seconds: float) -> None:
        """Remove the spools of ended jobs kept longer than ``keep_seconds``, with one
        command. Raises SchedulerError when it cannot run."""
        ...

    async def release(self, job_id: str, *, keep_spool: bool = False) -> None:
        """The job has ended: remove its token file and anything else staged for it, and
        its spool unless ``keep_spool``."""
        ...

    def job_folder(self, job_id: str) -> JobFolder:
        """The job's folder and the shell that reaches it, for the files API. Raises
        UnsafeValue for an id that cannot name a folder."""
        ...


def token_file_data(submission: Submission) -> bytes:
    """The job's ``token`` file: its token, or an array's line ``INDEX TOKEN`` per
    element (docs/arrays.md)."""
    if submission.array is None:
        return submission.token.encode()
    return "".join(f"{index} {token}\n"
                   for index, token in submission.element_tokens.items()).encode()


def job_files(submission: Submission, left_out: Sequence[str] = ()) -> dict[str, bytes]:
    """The files of a job's folder that the server writes besides its token, by name:
    ``spec.json``; ``env/NAME`` for each variable that could not travel in the
    scheduler's environment list (the launcher exports them); ``input-urls``, the
    submission's input links one a line, for a job that cannot ask the server."""
    files = {"spec.json": orjson.dumps(submission.spec)}
    files.update({f"env/{name}": submission.env[name].encode() for name in left_out})
    inputs = submission.spec.get("inputs")
    if isinstance(inputs, list) and inputs:
        files["input-urls"] = "".join(f"{url}\n" for url in inputs).encode()
    return files


ELEMENT_EXITS_READER = """\
cd "$1" 2>/dev/null || exit 0
for element in [0-9]*; do
    [ -d "$element" ] || continue
    if [ -f "$element/exit" ]; then
        printf '%s %s\\n' "$element" "$(head -c 64 "$element/exit" | tr -d '\\n')"
    else
        printf '%s -\\n' "$element"
    fi
done
"""


async def read_element_exits_with(shell: Shell, elements_dir: str, timeout: float,
                                  cluster: str) -> dict[int, bytes | None]:
    """Run ELEMENT_EXITS_READER over ``shell`` for one array's ``elements`` folder."""
    try:
        result = await shell.run(["sh", "-c", ELEMENT_EXITS_READER, "metis-elements",
                                  elements_dir], timeout=timeout)
    except ShellError as exc:
        raise SchedulerError(f"could not read an array's elements on {cluster}: {exc}") from exc
    if result.exit_status != 0:
        raise SchedulerError(f"reading an array's elements on {cluster} failed with status "
                             f"{result.exit_status}: {result.stderr.strip()[:300]}")
    exits: dict[int, bytes | None] = {}
    for line in result.stdout.splitlines():
        index, _, rest = line.partition(" ")
        if index.isdigit():
            exits[int(index)] = None if rest == "-" else rest.encode()
    return exits


async def remove_old_spools_with(shell: Shell, jobs_dir: str, keep_seconds: float,
                                  timeout: float, cluster: str) -> None:
    try:
        if isinstance(shell, SpoolReading):
            await shell.remove_old_spools(jobs_dir, sweep_minutes(keep_seconds),
                                          timeout=timeout)
            return
        result = await shell.run(sweeper_argv(jobs_dir, keep_seconds), timeout=timeout)
    except ShellError as exc:
        raise SchedulerError(f"could not remove old spools on {cluster}: {exc}") from exc
    if result.exit_status != 0:
        raise SchedulerError(f"removing old spools on {cluster} failed with status "
                             f"{result.exit_status}: {result.stderr.strip()[:300]}")


async def read_spools_with(shell: Shell, jobs_dir: str, reads: Sequence[SpoolRead],
                           timeout: float, cluster: str) -> Frames:
    """Run the spool reader over ``shell`` once for all ``reads``: how every scheduler
    reads spools, over SSH or on this machine; a SpoolReading shell (an agent) reads them
    itself, in the same frames."""
    if not reads:
        return Frames([])
    boundary = secrets.token_hex(16)
    try:
        if isinstance(shell, SpoolReading):
            output = await shell.read_spools(jobs_dir, [read.word() for read in reads],
                                             boundary, timeout=timeout)
            return parse_frames(output, boundary)
        result = await shell.run(reader_argv(jobs_dir, reads, boundary), timeout=timeout)
    except ShellError as exc:
        raise SchedulerError(f"could not read the spools on {cluster}: {exc}") from exc
    if result.exit_status != 0:
        raise SchedulerError(f"the spool reader on {cluster} exited with status "
                             f"{result.exit_status}: {result.stderr.strip()[:300]}")
    return parse_frames(result.raw_stdout, boundary)
