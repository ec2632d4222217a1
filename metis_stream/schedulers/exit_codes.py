"""Each batch system's exit codes and end states, one table per flavour. Pure code.

A job that ends without telling how (a walltime kill, a ``qdel`` on the cluster, a node
that died) is described to its user from these tables: "killed: ran past its 00:30:00
walltime", not ``Exit_status=-29``. The same number means different things on different
systems (``-11`` is a rerun on PBS Pro and a walltime kill on Torque), so a ``pbs``
cluster's table is chosen by the flavour found when it connected (``flavour``).

docs/exit-codes.md shows these tables; tests/test_exit_codes.py keeps it in step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from metis_stream.schedulers.flavour import Flavour


@dataclass(frozen=True, slots=True)
class ExitCode:
    """One row of a table: a code (or a family of codes) and what it means to a user."""

    code: str
    """As the scheduler shows it (``-29``, ``TIMEOUT``), or the rule of a family of codes
    (``256 + N``)."""
    words: str
    """What happened, for the job's user. ``{walltime}``, ``{status}``, ``{signal}`` and
    ``{uid}`` are filled in from the job's record (:func:`words`)."""
    source: str
    """Where the meaning comes from."""


# PBS Pro / OpenPBS: src/include/job.h, "Special Job Exit Values" (JOB_EXEC_*), openpbs
# master (cd7ab5e, 2026); 256 + N: src/resmom/linux/mom_start.c (WTERMSIG + 0x100).
_PBS_JOB_H = "OpenPBS src/include/job.h"
# Torque: src/include/pbs_job.h (JOB_EXEC_*), adaptivecomputing/torque master (34ff845);
# 256 + N: src/resmom/linux/mom_start.c (WTERMSIG + 0x100).
_TORQUE_JOB_H = "Torque src/include/pbs_job.h"
_MOM_START = "mom_start.c: WTERMSIG + 0x100"
_PBS_DOC = "PBS Pro Reference Guide, job exit status"

_SIGTERM_AT_WALLTIME = "271, resources_used.walltime >= Resource_List.walltime"
_COMMON_PBS: tuple[ExitCode, ...] = (
    ExitCode("0", "completed", _PBS_DOC),
    ExitCode("1 to 255", "the script exited with status {status}", _PBS_DOC),
    ExitCode("256 + N", "killed by {signal}", _MOM_START),
    ExitCode("271", "cancelled on the cluster by qdel", "256 + SIGTERM: qdel's signal"),
    ExitCode(_SIGTERM_AT_WALLTIME, "killed: ran past its {walltime} walltime",
             "256 + SIGTERM at the limit"),
    ExitCode("-1", "the cluster could not start the job", _PBS_DOC),
    ExitCode("-2", "the cluster could not start the job (after staging its files)", _PBS_DOC),
    ExitCode("-3", "the cluster could not start the job; it will be retried", _PBS_DOC),
    ExitCode("-4", "aborted: the node's batch daemon restarted", _PBS_DOC),
    ExitCode("-5", "aborted: the node's batch daemon restarted (checkpointed)", _PBS_DOC),
    ExitCode("-6", "aborted: the node's batch daemon restarted (checkpointed, may move)",
             _PBS_DOC),
    ExitCode("-7", "its restart from a checkpoint failed", _PBS_DOC),
)
_OTHER_NEGATIVE = "the cluster could not run the job (code {status})"

PBS_PRO: tuple[ExitCode, ...] = (
    *_COMMON_PBS,
    ExitCode("-10", "the job's user or group is not valid on the node", _PBS_JOB_H),
    ExitCode("-11", "rerun by the cluster", _PBS_JOB_H),
    ExitCode("-12", "checkpointed and stopped", _PBS_JOB_H),
    ExitCode("-13", "the cluster could not log in as the job's user (bad password)",
             _PBS_JOB_H),
    ExitCode("-14", "rerun by the cluster: one of its nodes failed", _PBS_JOB_H),
    ExitCode("-15", "requeued to restart from a checkpoint", _PBS_JOB_H),
    ExitCode("-16", "refused by a site hook; requeued", _PBS_JOB_H),
    ExitCode("-17", "refused by a site hook; deleted", _PBS_JOB_H),
    ExitCode("-18", "requeued by a site hook", _PBS_JOB_H),
    ExitCode("-19", "deleted by a site hook", _PBS_JOB_H),
    ExitCode("-20", "the node failed: the cluster lost contact with the job's first node",
             _PBS_JOB_H),
    ExitCode("-21", "refused: the cluster found a security problem in its own folders",
             _PBS_JOB_H),
    ExitCode("-22", "a site hook failed or timed out", _PBS_JOB_H),
    ExitCode("-23", "no Kerberos credentials", _PBS_JOB_H),
    ExitCode("-24", "killed: used more CPUs than it asked for (burst)", _PBS_JOB_H),
    ExitCode("-25", "killed: used more CPUs than it asked for", _PBS_JOB_H),
    ExitCode("-26", "killed: used more virtual memory than it asked for", _PBS_JOB_H),
    ExitCode("-27", "killed: used more memory than it asked for", _PBS_JOB_H),
    ExitCode("-28", "killed: used more CPU time than it asked for", _PBS_JOB_H),
    ExitCode("-29", "killed: ran past its {walltime} walltime", _PBS_JOB_H),
    ExitCode("-30", "the cluster could not join the job's nodes", _PBS_JOB_H),
    ExitCode("other < 0", _OTHER_NEGATIVE, _PBS_JOB_H),
)
"""PBS Pro and OpenPBS (``qstat -x``'s ``Exit_status``)."""

TORQUE: tuple[ExitCode, ...] = (
    *_COMMON_PBS,
    ExitCode("-8", "the script could not be started", _TORQUE_JOB_H),
    ExitCode("-9", "its output files could not be created", _TORQUE_JOB_H),
    ExitCode("-10", "killed: used more memory than it asked for", _TORQUE_JOB_H),
    ExitCode("-11", "killed: ran past its {walltime} walltime", _TORQUE_JOB_H),
    ExitCode("-12", "killed: used more CPU time than it asked for", _TORQUE_JOB_H),
    ExitCode("-13", "the cluster could not create the job's cgroups; it will be retried",
             _TORQUE_JOB_H),
    ExitCode("other < 0", _OTHER_NEGATIVE, _TORQUE_JOB_H),
)
"""Torque (``qstat -f``'s ``exit_status`` while ``keep_completed`` keeps the job)."""

_SLURM_DOC = "Slurm squeue(1)/sacct(1), JOB STATE CODES"
SLURM: tuple[ExitCode, ...] = (
    ExitCode("COMPLETED", "completed", _SLURM_DOC),
    ExitCode("FAILED, ExitCode=N:0", "the script exited with status {status}", _SLURM_DOC),
    ExitCode("FAILED, ExitCode=0:0", "the cluster could not start the job", _SLURM_DOC),
    ExitCode("ExitCode=*:N", "killed by {signal}", "sacct(1): ExitCode is code:signal"),
    ExitCode("TIMEOUT", "killed: ran past its {walltime} walltime", _SLURM_DOC),
    ExitCode("CANCELLED", "cancelled on the cluster (scancel or qdel)", _SLURM_DOC),
    ExitCode("CANCELLED by UID", "cancelled on the cluster by user id {uid} (scancel or qdel)",
             "sacct(1): the state names the canceller's uid"),
    ExitCode("OUT_OF_MEMORY", "killed: used more memory than it asked for", _SLURM_DOC),
    ExitCode("NODE_FAIL", "the node failed", _SLURM_DOC),
    ExitCode("BOOT_FAIL", "the node failed to boot", _SLURM_DOC),
    ExitCode("PREEMPTED", "preempted: stopped for a more urgent job", _SLURM_DOC),
    ExitCode("DEADLINE", "killed: its deadline passed", _SLURM_DOC),
    ExitCode("REVOKED", "revoked: another cluster of the federation runs it", _SLURM_DOC),
    ExitCode("PENDING, DependencyNeverSatisfied",
             "will never run: a job it depends on did not end as required",
             "squeue(1) JOB REASON CODES"),
)
"""Slurm, and Slurm behind its PBS wrappers (``scontrol``, ``sacct``, ``squeue``)."""

TABLES: Mapping[Flavour, Sequence[ExitCode]] = {
    "pbspro": PBS_PRO, "torque": TORQUE, "slurm": SLURM}

_SIGNAL_BASE = 256
_SIGTERM_CODE = 271


def _row(table: Sequence[ExitCode], code: str) -> ExitCode:
    return next(row for row in table if row.code == code)


def pbs_row(flavour: Flavour | None, exit_status: int, *, at_walltime: bool) -> ExitCode:
    """The row of PBS Pro's or Torque's table for an ``Exit_status``. ``at_walltime``: the
    job had used its whole walltime. With the flavour unknown, a negative code that the
    two systems read differently gets the row that claims nothing."""
    if flavour is None:
        rows = {pbs_row(known, exit_status, at_walltime=at_walltime)
                for known in ("pbspro", "torque")}
        return rows.pop() if len(rows) == 1 else ExitCode(
            str(exit_status), _OTHER_NEGATIVE, "PBS Pro and Torque differ")
    table = TORQUE if flavour == "torque" else PBS_PRO
    if exit_status == _SIGTERM_CODE:
        return _row(table, _SIGTERM_AT_WALLTIME if at_walltime else "271")
    if exit_status > _SIGNAL_BASE:
        return _row(table, "256 + N")
    if exit_status > 0:
        return _row(table, "1 to 255")
    found = [row for row in table if row.code == str(exit_status)]
    return found[0] if found else _row(table, "other < 0")


def slurm_row(state: str, signal: int, *, status: int | None = None,
              reason: str = "") -> ExitCode:
    """The row of Slurm's table for an end state (``CANCELLED by 1000`` is ``CANCELLED
    by UID``), its ``ExitCode`` (``status:signal``), and a pending job's reason."""
    if state == "PENDING" and reason == "DependencyNeverSatisfied":
        return _row(SLURM, "PENDING, DependencyNeverSatisfied")
    if state in ("COMPLETED", "FAILED") and signal:
        return _row(SLURM, "ExitCode=*:N")
    if state == "FAILED":
        return _row(SLURM, "FAILED, ExitCode=N:0" if status else "FAILED, ExitCode=0:0")
    if _CANCELLED_BY.match(state):
        return _row(SLURM, "CANCELLED by UID")
    return _row(SLURM, state)


_CANCELLED_BY = re.compile(r"CANCELLED by ([0-9]+)\Z")


def words(row: ExitCode, *, status: int | None = None, signal: str = "",
          walltime: str | None = None, state: str = "") -> str:
    """The row's words with the job's facts in them: ``walltime`` as the scheduler or
    the job's request gives it (left out when unknown), ``signal`` already named
    (dialect.signal_name), ``state`` for the canceller's uid."""
    uid = _CANCELLED_BY.match(state)
    text = row.words.format(walltime=walltime or "", status=status, signal=signal,
                            uid=uid.group(1) if uid else "")
    return " ".join(text.split())


def walltime_reached(used: str | None, limit: str | None) -> bool:
    """Whether ``used`` (``resources_used.walltime``) reached ``limit``
    (``Resource_List.walltime``), both ``[[hours:]minutes:]seconds``."""
    used_seconds, limit_seconds = _seconds(used), _seconds(limit)
    return used_seconds is not None and limit_seconds is not None and (
        used_seconds >= limit_seconds)


def _seconds(duration: str | None) -> int | None:
    match = re.fullmatch(r"\s*(?:([0-9]+)-)?([0-9]+(?::[0-9]+){0,2})\s*", duration or "")
    if match is None:
        return None
    seconds = 0
    for part in match.group(2).split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + int(match.group(1) or 0) * 86400
