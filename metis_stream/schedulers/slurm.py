"""Slurm: ``sbatch``, ``squeue``, ``sacct``, ``scontrol`` and ``scancel``.

Pure code, no I/O. ``DIALECT`` is what ``BatchScheduler`` drives. Status takes
one ``squeue`` for every live job; jobs that squeue shows as ended (or no longer
shows) are then asked of ``sacct`` for their exit code, and of ``scontrol`` where
there is no accounting storage (sacct then says "accounting storage is disabled").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from metis_stream.errors import SchedulerError
from metis_stream.schedulers import exit_codes
from metis_stream.schedulers.base import SchedulerStatus, array_status
from metis_stream.schedulers.dialect import (
    ACCOUNT_NAME,
    ARRAY_RANGE,
    END_USER,
    GONE,
    JOB_NAME,
    QUEUE_NAME,
    SAFE_PATH,
    Dialect,
    JobRequest,
    LookupProbe,
    ProbeOutcome,
    StatusProbe,
    SubmitCommand,
    check,
    command_output,
    dependency_list,
    index_list,
    signal_name,
    split_env,
)
from metis_stream.schedulers.flavour import SLURM_PROBES, Flavour
from metis_stream.shells.base import CommandResult

JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?\Z")
"""A job (or one array element); sbatch --parsable prints ``12345`` or ``12345;cluster``."""
ELEMENT_ID = re.compile(r"([0-9]+)_(?:([0-9]+)|\[([0-9,:%-]+)\])\Z")
"""An array's element as squeue, sacct and scontrol print it: ``123_4``, or a pending
range ``123_[5-9]`` (``123_[5-9%2]``: at most 2 at once; ``123_[1,3,5-7]``)."""
_PARSABLE = re.compile(r"([0-9]+)(;[A-Za-z0-9_-]+)?\Z")

_PBS_TIME = re.compile(r"([0-9]{1,7})(?::([0-9]{1,2}))?(?::([0-9]{1,2}))?(\.[0-9]{1,3})?\Z")
_SLURM_TIME = re.compile(r"([0-9]{1,4}-)?[0-9]{1,7}(:[0-9]{1,2}){0,2}\Z")
_SIZE = re.compile(r"([0-9]{1,12})([kKmMgGtT])?([bB])?\Z")
_COUNT = re.compile(r"[0-9]{1,6}\Z")
_NODES = re.compile(r"[0-9]{1,6}(-[0-9]{1,6})?\Z")
_QOS = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_CHUNK = re.compile(r"(?:([0-9]{1,6}):?)?((?:[a-z]+=[A-Za-z0-9]+:?)*)\Z")

QUEUED_STATES = frozenset({
    "PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
    "SPECIAL_EXIT", "SUSPENDED", "RESIZING",
})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED"})
ENDED_STATES = frozenset({
    "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "REVOKED",
})
"""Each has its words in exit_codes.SLURM."""
NEVER_RUNS_REASONS = frozenset({"DependencyNeverSatisfied"})
"""A pending job with this reason can never start: Slurm keeps it pending unless
``kill_invalid_depend`` is set (slurm.conf DependencyParameters)."""
SHELL_SIGNAL_BASE = 128
"""A job killed by signal N is reported as 128 + N, as a shell's ``$?`` would say."""


# ---- submit ----------------------------------------------------------------------------


def submit_command(request: JobRequest) -> SubmitCommand:
    """``sbatch --parsable`` with every option on the command line."""
    argv = ["sbatch", "--parsable", "--job-name=" + check(JOB_NAME, request.name, "job name")]
    if request.queue:
        argv.append("--partition=" + check(QUEUE_NAME, request.queue, "partition"))
    if request.account:
        argv.append("--account=" + check(ACCOUNT_NAME, request.account, "account"))
    if request.user is not None:
        # Also in the name; the comment is a field of its own in squeue (%k), scontrol and,
        # with AccountingStoreFlags=job_comment, sacct.
        argv.append("--comment=" + check(END_USER, request.user, "end user id"))
    for key, value in request.resources.items():
        argv += resource_options(key, value)
    argv += ["--output=" + check(SAFE_PATH, request.stdout, "output path"),
             "--error=" + check(SAFE_PATH, request.stderr, "error path")]
    depend = dependency_list(request, JOB_ID)
    if depend:
        argv.append("--dependency=" + depend)
    if request.array is not None:
        argv.append("--array=" + check(ARRAY_RANGE, request.array, "array"))
    # --export splits on commas like qsub -v: only safe values go. Never ALL, which copies
    # sbatch's whole environment into the job (on a server without host, the server's:
    # its secret). A list, or NONE, makes Slurm start the job in the cluster user's login
    # environment (PATH, HOME), as PBS does; the job's srun steps then get the listed
    # variables only, unless the script sets SLURM_EXPORT_ENV=ALL (sbatch(1)).
    safe, left_out = split_env(request.env)
    exported = ",".join(f"{k}={v}" for k, v in safe.items())
    argv.append(f"--export={exported or 'NONE'}")
    argv.append(check(SAFE_PATH, request.script, "script path"))
    return SubmitCommand(argv, left_out)


def resource_options(key: str, value: str) -> list[str]:
    """sbatch options for one template resource; PBS names are translated."""
    match key:
        case "walltime":
            return ["--time=" + slurm_time(value)]
        case "time":
            return ["--time=" + check(_SLURM_TIME, value, "resource time")]
        case "mem":
            return ["--mem=" + slurm_size(value)]
        case "ncpus" | "cpus_per_task":
            return ["--cpus-per-task=" + check(_COUNT, value, f"resource {key}")]
        case "ntasks":
            return ["--ntasks=" + check(_COUNT, value, "resource ntasks")]
        case "nodes":
            return ["--nodes=" + check(_NODES, value, "resource nodes")]
        case "ngpus" | "gpus":
            return ["--gpus=" + check(_COUNT, value, f"resource {key}")]
        case "qos":
            return ["--qos=" + check(_QOS, value, "resource qos")]
        case "select":
            return select_options(value)
    raise SchedulerError(f"resource {key!r} has no Slurm equivalent here")


def slurm_time(walltime: str) -> str:
    """PBS ``[[hours:]minutes:]seconds`` as Slurm ``days-hh:mm:ss`` (a bare number is
    seconds for PBS but minutes for Slurm, so it is never passed through)."""
    match = _PBS_TIME.match(walltime)
    if match is None:
        raise SchedulerError(f"walltime {walltime!r} is not [[hours:]minutes:]seconds")
    parts = [int(p) for p in match.group(1, 2, 3) if p is not None]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    seconds += math.ceil(float(match.group(4) or 0))
    minutes, secs = divmod(seconds, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    return f"{days}-{hrs:02d}:{mins:02d}:{secs:02d}"


def slurm_size(size: str) -> str:
    """``4gb`` (PBS) or ``4G`` (Slurm) as Slurm's ``4G``; a bare number is Slurm's MB."""
    match = _SIZE.match(size)
    if match is None:
        raise SchedulerError(f"size {size!r} is not a number with an optional unit")
    number, unit, byte = match.groups()
    if unit:
        return f"{number}{unit.upper()}"
    if byte:
        return f"{max(1, math.ceil(int(number) / 1024))}K"
    return number


def select_options(select: str) -> list[str]:
    """One PBS chunk kind, ``N:ncpus=C:mem=M:ngpus=G``: N tasks of C cpus each; the
    chunk's memory is shared by its cpus (Slurm has no per-task memory)."""
    match = _CHUNK.match(select)
    if match is None or "+" in select:
        raise SchedulerError(f"select {select!r}: only one kind of chunk maps to Slurm")
    count = match.group(1) or "1"
    settings = dict(item.split("=", 1) for item in match.group(2).split(":") if item)
    unknown = set(settings) - {"ncpus", "mem", "ngpus"}
    if unknown:
        raise SchedulerError(f"select {select!r}: {sorted(unknown)} have no Slurm equivalent")
    cpus = int(check(_COUNT, settings.get("ncpus", "1"), "select ncpus"))
    options = [f"--ntasks={count}", f"--cpus-per-task={cpus}"]
    if "ngpus" in settings:
        options.append("--gpus-per-task=" + check(_COUNT, settings["ngpus"], "select ngpus"))
    if "mem" in settings:
        options.append(f"--mem-per-cpu={math.ceil(_megabytes(settings['mem']) / max(cpus, 1))}M")
    return options


def _megabytes(size: str) -> int:
    text = slurm_size(size)
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    unit = text[-1]
    if unit in scale:
        return math.ceil(int(text[:-1]) * scale[unit])
    return int(text)


def parse_submit(result: CommandResult) -> str:
    if result.exit_status != 0:
        raise SchedulerError(command_output(result))
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    match = _PARSABLE.match(lines[-1]) if lines else None
    if match is None:
        raise SchedulerError(f"sbatch printed no job id: {command_output(result)}")
    return match.group(1)


# ---- cancel ----------------------------------------------------------------------------


def cancel_argv(scheduler_id: str) -> list[str]:
    return ["scancel", check(JOB_ID, scheduler_id, "job id")]


def check_cancel(result: CommandResult) -> None:
    if result.exit_status != 0 and not GONE.search(result.stdout + result.stderr):
        raise SchedulerError(command_output(result))


# ---- find a job by name ----------------------------------------------------------------


def squeue_by_name_argv(name: str) -> list[str]:
    return ["squeue", "-h", "-t", "all", "-n", check(JOB_NAME, name, "job name"), "-o", "%i"]


def parse_ids(result: CommandResult) -> list[str] | None:
    if result.exit_status != 0:
        raise SchedulerError(command_output(result))
    return [line.strip() for line in result.stdout.splitlines() if JOB_ID.match(line.strip())]


# ---- status ----------------------------------------------------------------------------


def squeue_argv(ids: Sequence[str]) -> list[str]:
    return ["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", _id_list(ids)]


def sacct_argv(ids: Sequence[str]) -> list[str]:
    return ["sacct", "-n", "-P", "-X", "-j", _id_list(ids), "-o",
            "JobID,State,ExitCode,Timelimit"]


def scontrol_argv(ids: Sequence[str]) -> list[str]:
    """One job by id; several at once as the whole list (one command either way)."""
    if len(ids) == 1:
        return ["scontrol", "-o", "show", "job", check(JOB_ID, ids[0], "job id")]
    return ["scontrol", "-o", "show", "job"]


def _id_list(ids: Sequence[str]) -> str:
    return ",".join(check(JOB_ID, i, "job id") for i in ids)


def parse_squeue_result(result: CommandResult, ids: Sequence[str],
                        flavour: Flavour | None = None) -> ProbeOutcome:
    """``%i|%T|%r`` lines. Ended jobs (and jobs squeue has forgotten) are followed up,
    for the exit code."""
    if result.exit_status != 0:
        if GONE.search(result.stderr):  # one id, and squeue does not know it
            return ProbeOutcome(follow_up=tuple(ids))
        raise SchedulerError(command_output(result))
    found: dict[str, SchedulerStatus] = {}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3:
            job, state, reason = fields
            found[job] = status_of(state, None, reason)
    statuses = _match_ids(ids, found)
    follow_up = [i for i in ids if i not in statuses
                 or (statuses[i].state == "ended" and not statuses[i].never_runs)]
    return ProbeOutcome(statuses, tuple(follow_up))


def parse_sacct_result(result: CommandResult, ids: Sequence[str],
                       flavour: Flavour | None = None) -> ProbeOutcome:
    """``JobID|State|ExitCode|Timelimit`` lines, such as ``12|CANCELLED by 1000|0:15|01:00:00``."""
    if result.exit_status != 0:
        if "accounting storage is disabled" in (result.stdout + result.stderr).lower():
            return ProbeOutcome(supported=False)
        raise SchedulerError(command_output(result))
    found: dict[str, SchedulerStatus] = {}
    for line in result.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) in (3, 4):
            time_limit = fields[3] if len(fields) == 4 else None
            found[fields[0]] = status_of(fields[1], fields[2], time_limit=time_limit)
    return ProbeOutcome(_match_ids(ids, found))


_SCONTROL_RECORD = re.compile(r"^\s*JobId=", re.MULTILINE)
_SCONTROL_FIELD = re.compile(
    r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|ExitCode|TimeLimit)=(\S*)")


def parse_scontrol_result(result: CommandResult, ids: Sequence[str],
                          flavour: Flavour | None = None) -> ProbeOutcome:
    """``scontrol show job`` records (``-o``: one a line; without: several lines each)."""
    if result.exit_status != 0:
        if GONE.search(result.stdout + result.stderr):
            return ProbeOutcome()
        raise SchedulerError(command_output(result))
    found: dict[str, SchedulerStatus] = {}
    starts = [m.start() for m in _SCONTROL_RECORD.finditer(result.stdout)]
    for start, end in zip(starts, [*starts[1:], len(result.stdout)], strict=True):
        fields = dict(_SCONTROL_FIELD.findall(result.stdout[start:end]))
        if "JobId" in fields and "JobState" in fields:
            # An element's JobId is its own number: it is the array's by ArrayJobId.
            job = fields["JobId"]
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                job = f"{fields['ArrayJobId']}_[{fields['ArrayTaskId']}]"
            found[job] = status_of(
                fields["JobState"], fields.get("ExitCode"), fields.get("Reason", ""),
                time_limit=fields.get("TimeLimit"))
    return ProbeOutcome(_match_ids(ids, found))


def _match_ids(
    asked: Sequence[str], found: Mapping[str, SchedulerStatus]
) -> dict[str, SchedulerStatus]:
    """Statuses for the ids asked; an array's elements (``12_3``, ``12_[4-9]``) count for
    ``12``, whose status is theirs together (base.array_status)."""
    matched: dict[str, SchedulerStatus] = {}
    elements: dict[str, dict[int, SchedulerStatus]] = {}
    for job, status in found.items():
        element = ELEMENT_ID.match(job)
        if element is None or job in asked:
            if job in asked:
                matched[job] = status
            continue
        if element.group(1) not in asked:
            continue
        try:
            indices = index_list(element.group(2) or element.group(3))
        except ValueError:
            continue
        of_array = elements.setdefault(element.group(1), {})
        of_array.update(dict.fromkeys(indices, status))
    for job, of_array in elements.items():
        matched[job] = array_status(of_array)
    return matched


def status_of(state: str, exit_code: str | None, reason: str = "", *,
              time_limit: str | None = None) -> SchedulerStatus:
    """Map a Slurm state (``CANCELLED by 1000`` counts as ``CANCELLED``) and an
    ``ExitCode`` of ``code:signal`` to a status, with exit_codes.SLURM's words."""
    base = state.split(" ", 1)[0].rstrip("+")
    words = f"{state}, {reason}" if reason and reason != "None" else state
    if base in RUNNING_STATES:
        return SchedulerStatus("running", None, f"running ({words})")
    if base == "PENDING" and reason in NEVER_RUNS_REASONS:
        row = exit_codes.slurm_row(base, 0, reason=reason)
        return SchedulerStatus("ended", None, words, exit_codes.words(row), never_runs=True)
    if base not in ENDED_STATES:
        # PENDING and friends, and any state this code does not know: never an end.
        what = "queued" if base in QUEUED_STATES else "in an unknown state"
        return SchedulerStatus("queued", None, f"{what} ({words})")
    detail = f"{words}, ExitCode={exit_code}" if exit_code else words
    return SchedulerStatus("ended", exit_status_of(base, exit_code), detail,
                           describe_end(state, exit_code, time_limit))


def exit_status_of(state: str, exit_code: str | None) -> int | None:
    """The script's exit code, or 128 + the signal that killed it. ``0:0`` counts only
    for COMPLETED: a cancelled or failed node job did not succeed."""
    parts = _exit_code_parts(exit_code)
    if parts is None:
        return None
    code, sig = parts
    if sig:
        return SHELL_SIGNAL_BASE + sig
    if code == 0 and state != "COMPLETED":
        return None
    return code


def describe_end(state: str, exit_code: str | None, time_limit: str | None = None) -> str:
    """A person's words for an end ``state`` (as sacct or scontrol print it) and its
    ``ExitCode``, from exit_codes.SLURM."""
    base = state.split(" ", 1)[0].rstrip("+")
    code, sig = _exit_code_parts(exit_code) or (None, 0)
    row = exit_codes.slurm_row(state.rstrip("+") if base == "CANCELLED" else base, sig,
                               status=code)
    limit = time_limit if time_limit and _TIME_LIMIT.match(time_limit) else None
    return exit_codes.words(row, status=code, signal=signal_name(sig) if sig else "",
                            walltime=limit, state=state.rstrip("+"))


_TIME_LIMIT = re.compile(r"([0-9]+-)?[0-9]+(:[0-9]{2}){1,2}\Z")
"""``TimeLimit`` as a duration; not ``UNLIMITED`` or ``Partition_Limit``."""


def _exit_code_parts(exit_code: str | None) -> tuple[int, int] | None:
    match = re.fullmatch(r"([0-9]+):([0-9]+)", exit_code or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


# ---- the dialect -----------------------------------------------------------------------

SQUEUE = StatusProbe("squeue", squeue_argv, parse_squeue_result)
SACCT = StatusProbe("sacct", sacct_argv, parse_sacct_result)
SCONTROL = StatusProbe("scontrol show job", scontrol_argv, parse_scontrol_result)
SQUEUE_BY_NAME = LookupProbe("squeue -n", squeue_by_name_argv, parse_ids)

DIALECT = Dialect(
    name="slurm",
    submit=submit_command,
    parse_submit=parse_submit,
    cancel=cancel_argv,
    check_cancel=check_cancel,
    status_probes=(SQUEUE, SACCT, SCONTROL),
    lookup_probes=(SQUEUE_BY_NAME,),
    scheduler_id=JOB_ID,
    flavour_probes=SLURM_PROBES,
)
