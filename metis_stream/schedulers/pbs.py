"""PBS Pro, Torque and Slurm's PBS wrappers: command lines and output parsing.

Pure code, no I/O. ``DIALECT`` is what ``BatchScheduler`` drives. Status comes
from ``qstat -f -F json -x`` where it exists (PBS Pro) and from the text
``qstat -f`` elsewhere (Torque, Slurm's wrappers, which exit 2 on ``-F json``);
a job that the text form shows as ended without an exit status (the wrappers'
``C``) is then asked of ``scontrol``, which holds the true outcome there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from metis_stream.errors import SchedulerError
from metis_stream.schedulers import exit_codes, slurm
from metis_stream.schedulers.base import SchedulerStatus, array_status
from metis_stream.schedulers.dialect import (
    ACCOUNT_NAME,
    ARRAY_RANGE,
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
    signal_name,
    split_env,
)
from metis_stream.schedulers.flavour import PBS_PROBES, Flavour
from metis_stream.shells.base import CommandResult

# `15` (Slurm's wrappers), `15.server`, `15[].server` (PBS Pro arrays), `15[3].server`.
JOB_ID = re.compile(r"[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9_.-]+)?\Z")
_ELEMENT_ID = re.compile(r"([0-9]+)\[([0-9]+)\](\..*)?\Z")
"""A PBS Pro array's element (subjob), as ``qstat -t`` prints it: ``15[3].server``."""

_TIME = r"[0-9]{1,7}(:[0-9]{1,2}){0,2}(\.[0-9]{1,3})?"
_SIZE = r"[0-9]{1,12}([kKmMgGtTpP]?[bBwW])?"
_COUNT = r"[0-9]{1,6}"
_CHUNK_RES = r"[A-Za-z_][A-Za-z0-9_]{0,30}=[A-Za-z0-9_.]{1,64}"
_SELECT_CHUNK = rf"([0-9]{{1,6}}|{_CHUNK_RES})(:{_CHUNK_RES})*"
_NODE_PROPERTY = r"[A-Za-z_][A-Za-z0-9_]{0,30}(=[A-Za-z0-9_.]{1,64})?"
_NODES_CHUNK = rf"([0-9]{{1,6}}|[A-Za-z][A-Za-z0-9_.-]{{0,63}})(:{_NODE_PROPERTY})*"
_PLACE = r"(free|pack|scatter|vscatter)?(:?(excl|shared|exclhost|group=[A-Za-z0-9_]{1,30}))*"

RESOURCES: Mapping[str, re.Pattern[str]] = {
    "walltime": re.compile(_TIME + r"\Z"),
    "cput": re.compile(_TIME + r"\Z"),
    "mem": re.compile(_SIZE + r"\Z"),
    "vmem": re.compile(_SIZE + r"\Z"),
    "pmem": re.compile(_SIZE + r"\Z"),
    "ncpus": re.compile(_COUNT + r"\Z"),
    "ngpus": re.compile(_COUNT + r"\Z"),
    "mpiprocs": re.compile(_COUNT + r"\Z"),
    "ompthreads": re.compile(_COUNT + r"\Z"),
    "select": re.compile(rf"{_SELECT_CHUNK}(\+{_SELECT_CHUNK})*\Z"),
    "nodes": re.compile(rf"{_NODES_CHUNK}(\+{_NODES_CHUNK})*\Z"),
    "place": re.compile(_PLACE + r"\Z"),
}
"""The ``-l`` resources a template may ask for, each with the form of its value."""


QUEUED_STATES: Mapping[str, str] = {
    "Q": "queued", "H": "held", "W": "waiting for its start time", "T": "in transit",
    "S": "suspended", "U": "suspended (workstation busy)", "M": "moved to another server",
}
RUNNING_STATES: Mapping[str, str] = {"R": "running", "E": "exiting", "B": "array running"}
ENDED_STATES: Mapping[str, str] = {"C": "completed", "F": "finished", "X": "subjob expired"}

SIGNAL_BASE = 256
"""PBS reports a job killed by signal N as 256 + N (exit_codes.PBS_PRO, TORQUE)."""

# ---- submit ----------------------------------------------------------------------------


def submit_command(request: JobRequest) -> SubmitCommand:
    """``qsub`` with everything on the command line (the wrappers ignore ``#PBS -o``)."""
    argv = ["qsub", "-N", check(JOB_NAME, request.name, "job name")]
    if request.queue:
        argv += ["-q", check(QUEUE_NAME, request.queue, "queue")]
    if request.account:
        argv += ["-A", check(ACCOUNT_NAME, request.account, "account")]
    if request.resources:
        # One -l with a comma list: Slurm's qsub wrapper keeps only the last -l it is given.
        argv += ["-l", ",".join(f"{key}={_check_resource(key, value)}"
                                for key, value in request.resources.items())]
    argv += ["-o", check(SAFE_PATH, request.stdout, "output path"),
             "-e", check(SAFE_PATH, request.stderr, "error path")]
    depend = dependency_list(request, JOB_ID)
    if depend:
        # Slurm's qsub wrapper passes -W depend= on as sbatch --dependency=.
        argv += ["-W", f"depend={depend}"]
    if request.array is not None:
        # PBS Pro's -J; Slurm's qsub wrapper takes it as sbatch --array (Torque's -t
        # takes no :STEP, and is not used).
        argv += ["-J", check(ARRAY_RANGE, request.array, "array")]
    # Never -V, which copies qsub's environment (the server's, for a cluster without host)
    # into the job; with -v alone PBS starts the job in the user's login environment, and
    # Slurm's qsub wrapper submits with --export=none plus the list.
    safe, left_out = split_env(request.env)
    if safe:
        argv += ["-v", ",".join(f"{name}={value}" for name, value in safe.items())]
    argv.append(check(SAFE_PATH, request.script, "script path"))
    return SubmitCommand(argv, left_out)


def _check_resource(key: str, value: str) -> str:
    pattern = RESOURCES.get(key)
    if pattern is None:
        raise SchedulerError(f"resource {key!r} is not allowed (allowed: {', '.join(RESOURCES)})")
    return check(pattern, value, f"resource {key}")


def parse_submit(result: CommandResult) -> str:
    """The job id: the last line qsub printed, only when it exited 0 and looks like an id."""
    if result.exit_status != 0:
        raise SchedulerError(command_output(result))
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not lines or not JOB_ID.match(lines[-1]):
        raise SchedulerError(f"qsub printed no job id: {command_output(result)}")
    return lines[-1]


# ---- cancel ----------------------------------------------------------------------------


def cancel_argv(scheduler_id: str) -> list[str]:
    return ["qdel", check(JOB_ID, scheduler_id, "job id")]


def check_cancel(result: CommandResult) -> None:
    """Nothing when the job is gone; an already ended or unknown job counts as gone.
    Slurm's qdel says nothing at all (exit 1) for those, so silence counts as gone."""
    words = result.stdout + result.stderr
    if result.exit_status != 0 and words.strip() and not GONE.search(words):
        raise SchedulerError(command_output(result))


# ---- find a job by name ----------------------------------------------------------------


def qselect_argv(name: str) -> list[str]:
    return ["qselect", "-N", check(JOB_NAME, name, "job name")]


def parse_ids(result: CommandResult) -> list[str] | None:
    """Job ids, one a line (``qselect``); None when the command does not exist here."""
    if result.exit_status != 0:
        if result.exit_status == 2 or "command not found" in result.stderr:
            return None
        raise SchedulerError(command_output(result))
    return [line.strip() for line in result.stdout.splitlines() if JOB_ID.match(line.strip())]


# ---- status ----------------------------------------------------------------------------


def qstat_json_argv(ids: Sequence[str]) -> list[str]:
    """With an array (``15[].server``) among them, ``-t``: its subjobs too, each with
    its own state and Exit_status."""
    subjobs = ["-t"] if any("[" in i for i in ids) else []
    return ["qstat", "-f", "-F", "json", "-x", *subjobs,
            *(check(JOB_ID, i, "job id") for i in ids)]


def qstat_text_argv(ids: Sequence[str]) -> list[str]:
    return ["qstat", "-f", *(check(JOB_ID, i, "job id") for i in ids)]


def parse_qstat_json_result(result: CommandResult, ids: Sequence[str],
                            flavour: Flavour | None = None) -> ProbeOutcome:
    if result.exit_status == 2 and not result.stdout.lstrip().startswith("{"):
        return ProbeOutcome(supported=False)
    _raise_unless_only_gone(result)
    try:
        jobs = parse_qstat_json(result.stdout)
    except ValueError:
        # Broken beyond repair: the text form of qstat has the same facts.
        return ProbeOutcome(follow_up=tuple(ids))
    statuses = _match_ids(ids, {job: status_from_attributes(a, flavour)
                                for job, a in jobs.items()})
    missing = [i for i in ids if i not in statuses]
    # qstat exits 0 only if it knew every id: a job missing then is a qstat bug (some
    # versions print only the first job of several in JSON), so ask the text form.
    follow_up = missing if result.exit_status == 0 else []
    follow_up += [i for i, s in statuses.items() if s.state == "ended" and s.exit_status is None]
    return ProbeOutcome(statuses, tuple(follow_up))


def parse_qstat_text_result(result: CommandResult, ids: Sequence[str],
                            flavour: Flavour | None = None) -> ProbeOutcome:
    _raise_unless_only_gone(result)
    jobs = parse_qstat_text(result.stdout)
    statuses = _match_ids(ids, {job: status_from_attributes(a, flavour)
                                for job, a in jobs.items()})
    follow_up = [i for i, s in statuses.items() if s.state == "ended" and s.exit_status is None]
    if flavour == "slurm":
        # The wrappers show a pending job as Q, without Slurm's reason: scontrol tells one
        # that can never start (DependencyNeverSatisfied), which PBS Pro would delete.
        follow_up += [i for i, s in statuses.items() if s.state == "queued"]
    return ProbeOutcome(statuses, tuple(follow_up))


def _raise_unless_only_gone(result: CommandResult) -> None:
    """A non-zero qstat is fine when every complaint is about an unknown or finished job
    (the wrappers say nothing at all and exit 153)."""
    if result.exit_status == 0:
        return
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    if not all(GONE.search(line) for line in complaints):
        raise SchedulerError(command_output(result))


def _match_ids(
    asked: Sequence[str], found: Mapping[str, SchedulerStatus]
) -> dict[str, SchedulerStatus]:
    """Key the statuses by the ids we asked about: qstat may print ``15.server.domain``
    for ``15.server`` (or ``15`` for ``15.server``), so match on the sequence number.
    An array's subjobs (``15[3].server``) count for ``15[].server``, whose status is
    theirs together (base.array_status)."""
    by_number: dict[str, list[str]] = {}
    for job in asked:
        by_number.setdefault(job.split(".", 1)[0], []).append(job)
    matched: dict[str, SchedulerStatus] = {}
    elements: dict[str, dict[int, SchedulerStatus]] = {}
    for job, status in found.items():
        element = _ELEMENT_ID.match(job)
        if element is not None:
            candidates = by_number.get(f"{element.group(1)}[]", [])
            if len(candidates) == 1:
                elements.setdefault(candidates[0], {})[int(element.group(2))] = status
            if job not in asked:
                continue
        if job in asked:
            matched[job] = status
            continue
        candidates = by_number.get(job.split(".", 1)[0], [])
        if len(candidates) == 1 and candidates[0] not in found:
            matched[candidates[0]] = status
    for job, of_array in elements.items():
        together = array_status(of_array)
        own = matched.get(job)
        # The parent (state B) stays alive while subjobs that qstat did not list wait.
        if own is not None and own.state != "ended" and together.state == "ended":
            together = replace(own, elements=of_array)
        matched[job] = together
    return matched


def status_from_attributes(attributes: Mapping[str, object],
                           flavour: Flavour | None = None) -> SchedulerStatus:
    """Map ``job_state`` and ``Exit_status`` (Torque: ``exit_status``) to a status, read
    with ``flavour``'s table; the walltime asked and used tell a walltime kill."""
    state = str(attributes.get("job_state", "")).strip()
    code = attributes.get("Exit_status", attributes.get("exit_status"))
    return status_of(state, _as_int(code), flavour,
                     walltime=_resource(attributes, "Resource_List", "walltime"),
                     walltime_used=_resource(attributes, "resources_used", "walltime"))


def _resource(attributes: Mapping[str, object], group: str, name: str) -> str | None:
    """``Resource_List.walltime`` in the text form, ``{"Resource_List": {"walltime"}}`` in
    JSON."""
    value = attributes.get(f"{group}.{name}")
    nested = attributes.get(group)
    if value is None and isinstance(nested, Mapping):
        value = nested.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def status_of(state: str, exit_status: int | None, flavour: Flavour | None = None, *,
              walltime: str | None = None, walltime_used: str | None = None
              ) -> SchedulerStatus:
    if state in ENDED_STATES:
        detail = f"job_state={state}"
        if exit_status is None:
            return SchedulerStatus("ended", None, f"{detail}, no Exit_status")
        return SchedulerStatus("ended", exit_status, f"{detail}, Exit_status={exit_status}",
                               describe_exit(exit_status, flavour, walltime, walltime_used))
    if state in RUNNING_STATES:
        return SchedulerStatus("running", None, f"{RUNNING_STATES[state]} (job_state={state})")
    words = QUEUED_STATES.get(state, "in an unknown state")
    # An unknown letter is never taken for an end: a false "ended" fails a live job.
    return SchedulerStatus("queued", None, f"{words} (job_state={state})")


def describe_exit(exit_status: int, flavour: Flavour | None, walltime: str | None = None,
                  walltime_used: str | None = None) -> str:
    """A person's words for an ``Exit_status``, from ``flavour``'s table."""
    row = exit_codes.pbs_row(flavour, exit_status,
                             at_walltime=exit_codes.walltime_reached(walltime_used, walltime))
    signal = signal_name(exit_status - SIGNAL_BASE) if exit_status > SIGNAL_BASE else ""
    return exit_codes.words(row, status=exit_status, signal=signal, walltime=walltime)


def _as_int(value: object) -> int | None:
    """Exit_status arrives as 0, "0" or " 0" depending on the version and the format."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    return None


# ---- qstat -f (text) -------------------------------------------------------------------

_JOB_HEADER = re.compile(r"Job Id:\s*(\S+)")
_ATTRIBUTE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*) = ?(.*)\Z")


def parse_qstat_text(text: str) -> dict[str, dict[str, str]]:
    """``Job Id: ID`` blocks of indented ``key = value`` lines.

    PBS Pro and Torque indent attributes by four spaces and wrap long values onto
    lines that start with a TAB; Slurm's wrappers indent attributes by a TAB and
    never wrap. So the first attribute's indentation says which lines are attributes;
    any other indented line continues the value before it, joined as is (qstat cuts
    long values at a fixed width, not at a separator).
    """
    jobs: dict[str, dict[str, str]] = {}
    for job, lines in _job_blocks(text):
        attributes: dict[str, str] = {}
        indent: str | None = None
        key: str | None = None
        for line in lines:
            body = line.lstrip(" \t")
            lead = line[: len(line) - len(body)]
            match = _ATTRIBUTE.match(body)
            if match and (indent is None or lead == indent):
                indent = lead
                key = match.group(1)
                attributes[key] = match.group(2).rstrip("\r")
            elif key is not None and lead:
                attributes[key] += line.removeprefix("\t").rstrip("\r")
        jobs[job] = attributes
    return jobs


def _job_blocks(text: str) -> Iterator[tuple[str, list[str]]]:
    job: str | None = None
    lines: list[str] = []
    for line in text.splitlines():
        header = _JOB_HEADER.match(line)
        if header:
            if job is not None:
                yield job, lines
            job, lines = header.group(1), []
        elif job is not None and line.strip():
            lines.append(line)
    if job is not None:
        yield job, lines


# ---- qstat -f -F json ------------------------------------------------------------------

_ESCAPE = re.compile(r'\\(["\\/bfnrt]|u[0-9a-fA-F]{4})|\\')
_MEMBER = re.compile(r'(?P<key>\s*"(?:[^"\\]|\\.)*"\s*:\s*)(?P<value>.*?)(?P<comma>,?)\s*\Z')


def parse_qstat_json(text: str) -> dict[str, Mapping[str, object]]:
    """The ``Jobs`` of ``qstat -f -F json``, tolerating PBS Pro's known defects.

    PBS Pro has printed invalid JSON in several versions: backslashes that escape
    nothing (``\\,`` and ``\\'`` from Variable_List), raw control characters,
    unescaped double quotes in values, and environment values such as ``005`` printed
    as bare numbers. Valid output is parsed as is; otherwise those defects are repaired
    one line at a time (qstat prints one attribute a line). Raises ValueError when the
    text is still not JSON.
    """
    if not text.strip():
        return {}
    try:
        document = json.loads(text, strict=False)
    except ValueError:
        document = json.loads(repair_json(text), strict=False)
    if not isinstance(document, dict):
        raise ValueError("qstat JSON is not an object")
    jobs = document.get("Jobs", {})
    if not isinstance(jobs, dict):
        raise ValueError("qstat JSON 'Jobs' is not an object")
    return {str(job): attrs for job, attrs in jobs.items() if isinstance(attrs, dict)}


def repair_json(text: str) -> str:
    return "\n".join(_repair_line(line) for line in text.splitlines())


def _repair_line(line: str) -> str:
    member = _MEMBER.match(line)
    if member is None:
        return line
    value = member.group("value")
    if not value or value in ("{", "["):
        return line
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        fixed = _fix_string_body(value[1:-1])
    elif _is_json_scalar(value):
        return line
    else:
        fixed = _fix_string_body(value)
    return f'{member.group("key")}"{fixed}"{member.group("comma")}'


def _fix_string_body(body: str) -> str:
    """Keep valid escapes, double stray backslashes, escape bare quotes."""
    escaped = _ESCAPE.sub(lambda m: m.group(0) if m.group(1) else "\\\\", body)
    return re.sub(r'(?<!\\)"', '\\"', escaped)


def _is_json_scalar(value: str) -> bool:
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


# ---- the dialect -----------------------------------------------------------------------

QSTAT_JSON = StatusProbe("qstat -f -F json -x", qstat_json_argv, parse_qstat_json_result)
QSTAT_TEXT = StatusProbe("qstat -f", qstat_text_argv, parse_qstat_text_result)

DIALECT = Dialect(
    name="pbs",
    submit=submit_command,
    parse_submit=parse_submit,
    cancel=cancel_argv,
    check_cancel=check_cancel,
    status_probes=(QSTAT_JSON, QSTAT_TEXT, slurm.SCONTROL),
    lookup_probes=(LookupProbe("qselect -N", qselect_argv, parse_ids), slurm.SQUEUE_BY_NAME),
    scheduler_id=JOB_ID,
    flavour_probes=PBS_PROBES,
)
