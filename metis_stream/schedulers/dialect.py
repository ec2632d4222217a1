"""The contract of a batch system's dialect: pure command building and output parsing.

``pbs`` and ``slurm`` fill in a :class:`Dialect`; ``batch.BatchScheduler`` runs its
commands through a shell. Everything here is pure: patterns that every value must
match before it reaches a cluster's command line, and the shapes passed around.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from metis_stream.errors import UnsafeValue
from metis_stream.schedulers.base import SchedulerStatus
from metis_stream.schedulers.flavour import Flavour, FlavourProbe
from metis_stream.shells.base import CommandResult

# What survives `qsub -v` (Slurm's wrapper pastes it into a `sh -c` string, real PBS
# splits on commas and eats quotes) and `sbatch --export` (splits on commas).
SAFE_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
SAFE_ENV_VALUE = re.compile(r"[A-Za-z0-9_./:@%+=-]*\Z")
# Paths that we put on a command line and in -v: absolute, no spaces, no shell syntax.
SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+@-]*\Z")
JOB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,99}\Z")
"""PBS Pro takes a first letter, then letters, digits, ``_``, ``-`` and ``+``, 236 in all
(``check_job_name``); Torque 256 printable characters; Slurm any."""
END_USER = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
"""An end user's id (``Job.user``), as the web app gives it: it ends the job's name on the
cluster (:func:`job_name`) and is Slurm's ``--comment``, so it must be a valid part of a
job name everywhere and safe in the shell string that Slurm's qsub wrapper builds."""
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}\Z")
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
STAGED_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
WORKDIR = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|\Z))[A-Za-z0-9_./-]{1,200}\Z")
FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

COMMAND_NOT_FOUND = 127

# Messages that mean "this id is not (or no longer) known" rather than "the command failed":
# PBS Pro, Torque, and Slurm (directly or behind the PBS wrappers).
GONE = re.compile(
    r"unknown job id|job has finished|invalid job id|already completing or completed"
    r"|job is in (a )?complet|request invalid for state of job",
    re.IGNORECASE,
)


ARRAY_RANGE = re.compile(r"[0-9]{1,6}-[0-9]{1,6}(:[0-9]{1,6})?\Z")


def index_list(text: str) -> list[int]:
    """The indices of an array's element list as schedulers print it: ``4``, ``5-9``,
    ``1,3,5-7``, ``5-9%2`` (at most 2 at once) or ``1-9:2``. ValueError for anything else."""
    indices: list[int] = []
    for part in text.split("%", 1)[0].split(","):
        match = re.fullmatch(r"([0-9]{1,7})(?:-([0-9]{1,7})(?::([0-9]{1,7}))?)?", part)
        if match is None:
            raise ValueError(f"not an array's index list: {text!r:.60}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        indices += range(first, last + 1, int(match.group(3) or 1) or 1)
    return indices


def check(pattern: re.Pattern[str], value: str, what: str) -> str:
    """``value`` if it matches ``pattern`` in full; otherwise UnsafeValue naming ``what``."""
    if not pattern.match(value):
        raise UnsafeValue(f"{what} {value!r} is not allowed (must match {pattern.pattern})")
    return value


def job_name(job_id: str, user: str | None = None) -> str:
    """The job's name on the cluster: unique (the end of its id, 80 random bits and the
    time), and ending with the end user's id when it has one, so that a cluster account
    shared by a web app's users tells them apart in ``qstat``, ``squeue`` and accounting
    (PBS's ``jobname``, Slurm's ``JobName``)."""
    name = f"ms-{job_id[-12:]}"
    if user is not None:
        name += "-" + check(END_USER, user, "end user id")
    return check(JOB_NAME, name, "job name")


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """The variables that can travel on a scheduler's command line, and the names of the
    ones that cannot (the job reads those from its spec)."""
    safe: dict[str, str] = {}
    left_out: list[str] = []
    for name, value in env.items():
        if SAFE_ENV_NAME.match(name) and SAFE_ENV_VALUE.match(value):
            safe[name] = value
        else:
            left_out.append(name)
    return safe, tuple(left_out)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One submission, as a dialect turns it into a command line."""

    name: str
    script: str
    """Absolute path of the batch script on the cluster."""
    stdout: str
    stderr: str
    queue: str | None = None
    account: str | None = None
    resources: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Every variable the job should get; unsafe ones are left out of the command."""
    user: str | None = None
    """The end user the job is for (``Job.user``), already in ``name``; a dialect with a
    free-text field for it (Slurm's ``--comment``) puts it there too."""
    after: Sequence[str] = ()
    """Scheduler ids of the jobs that must complete successfully first (``afterok``)."""
    after_any: Sequence[str] = ()
    """Scheduler ids of the jobs that must end first, however they end (``afterany``)."""
    array: str | None = None
    """An array's indices, ``FIRST-LAST[:STEP]`` (templates.ArrayRange); None: one job."""


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    argv: list[str]
    left_out: tuple[str, ...] = ()
    """Names of ``env`` variables whose values could not travel on the command line."""


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """What one status command told us."""

    statuses: Mapping[str, SchedulerStatus] = field(default_factory=dict)
    follow_up: tuple[str, ...] = ()
    """Ids to ask the next probe about (ended without an exit status, or missing where
    they should not be); the statuses found here stand if no later probe knows better."""
    supported: bool = True
    """False: this cluster does not have the command (or the option); never ask again."""


@dataclass(frozen=True, slots=True)
class StatusProbe:
    """One way to ask for the status of many jobs in one command."""

    name: str
    argv: Callable[[Sequence[str]], list[str]]
    parse: Callable[[CommandResult, Sequence[str], Flavour | None], ProbeOutcome]
    """Reads exit codes with the table of the flavour (None: not known)."""


@dataclass(frozen=True, slots=True)
class LookupProbe:
    """One way to find a job by its unique name (after an interrupted submission)."""

    name: str
    argv: Callable[[str], list[str]]
    parse: Callable[[CommandResult], list[str] | None]
    """The ids found; None when the command is not available on this cluster."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """A batch system's commands and output formats: pure functions only."""

    name: str
    submit: Callable[[JobRequest], SubmitCommand]
    parse_submit: Callable[[CommandResult], str]
    cancel: Callable[[str], list[str]]
    check_cancel: Callable[[CommandResult], None]
    """Raise SchedulerError unless the job is gone (cancelled now or ended before)."""
    status_probes: Sequence[StatusProbe]
    """Tried in order: the first for all ids, each later one for the previous one's
    ``follow_up`` (or for all ids when the previous one is not supported here)."""
    lookup_probes: Sequence[LookupProbe]
    scheduler_id: re.Pattern[str]
    """What a job id of this scheduler looks like; nothing else reaches the shell."""
    flavour_probes: Sequence[FlavourProbe] = ()
    """Tried in order once per connection: which batch system answers (flavour)."""


def dependency_list(request: JobRequest, job_id: re.Pattern[str]) -> str:
    """``afterok:A:B,afterany:C`` (PBS ``-W depend=``, Slurm ``--dependency=``, which
    join ids alike), or "" without dependencies; every id must match ``job_id``."""
    parts = []
    for kind, ids in (("afterok", request.after), ("afterany", request.after_any)):
        if ids:
            parts.append(kind + "".join(
                ":" + check(job_id, i, "dependency job id") for i in ids))
    return ",".join(parts)


def command_output(result: CommandResult) -> str:
    """The scheduler's own words: the PBS wrappers print errors on stdout, others on stderr."""
    text = "\n".join(part.strip() for part in (result.stderr, result.stdout) if part.strip())
    return text or f"exit status {result.exit_status}"


def signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"
