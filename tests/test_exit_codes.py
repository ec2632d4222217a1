"""Each scheduler's exit codes, row by row (metis_stream.schedulers.exit_codes), read from
outputs in the layout of each scheduler's documentation or captured on the test cluster;
the tables in docs/exit-codes.md are the code's; flavour detection from ``--version``."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from metis_stream.schedulers import exit_codes, pbs, slurm
from metis_stream.schedulers.base import SchedulerStatus
from metis_stream.schedulers.exit_codes import ExitCode
from metis_stream.schedulers.flavour import (
    SchedulerFlavour,
    parse_qstat_version,
    parse_sinfo_version,
)
from tests.support.samples import SAMPLES, ok, sample

DOCS = SAMPLES.parent.parent / "docs" / "exit-codes.md"


def qstat_f(exit_status: int, *, exit_key: str = "Exit_status", used: str = "00:00:12",
            limit: str = "00:30:00") -> str:
    """One finished job as PBS Pro's ``qstat -x -f`` prints it (tests/samples/pbs/
    qstat-fx-history.txt; Torque's ``qstat -f`` under keep_completed is alike, with a
    lower-case ``exit_status``)."""
    return (f"Job Id: 1201.pbs01\n    Job_Name = j_01HX1111111111111111111111\n"
            f"    resources_used.walltime = {used}\n    job_state = F\n    queue = short\n"
            f"    Resource_List.walltime = {limit}\n    {exit_key} = {exit_status}\n")


# (flavour, Exit_status, resources_used.walltime, the user's words)
PBS_CASES: list[tuple[str, int, str, str]] = [
    ("pbspro", 0, "00:00:12", "completed"),
    ("pbspro", 3, "00:00:12", "the script exited with status 3"),
    ("pbspro", 265, "00:00:12", "killed by signal 9 (SIGKILL)"),
    ("pbspro", 271, "00:00:12", "cancelled on the cluster by qdel"),
    ("pbspro", 271, "00:30:02", "killed: ran past its 00:30:00 walltime"),
    ("pbspro", -1, "00:00:00", "the cluster could not start the job"),
    ("pbspro", -2, "00:00:00", "the cluster could not start the job (after staging its files)"),
    ("pbspro", -3, "00:00:00", "the cluster could not start the job; it will be retried"),
    ("pbspro", -4, "00:00:00", "aborted: the node's batch daemon restarted"),
    ("pbspro", -5, "00:00:00", "aborted: the node's batch daemon restarted (checkpointed)"),
    ("pbspro", -6, "00:00:00",
     "aborted: the node's batch daemon restarted (checkpointed, may move)"),
    ("pbspro", -7, "00:00:00", "its restart from a checkpoint failed"),
    ("pbspro", -10, "00:00:00", "the job's user or group is not valid on the node"),
    ("pbspro", -11, "00:00:00", "rerun by the cluster"),
    ("pbspro", -12, "00:00:00", "checkpointed and stopped"),
    ("pbspro", -13, "00:00:00", "the cluster could not log in as the job's user (bad password)"),
    ("pbspro", -14, "00:00:00", "rerun by the cluster: one of its nodes failed"),
    ("pbspro", -15, "00:00:00", "requeued to restart from a checkpoint"),
    ("pbspro", -16, "00:00:00", "refused by a site hook; requeued"),
    ("pbspro", -17, "00:00:00", "refused by a site hook; deleted"),
    ("pbspro", -18, "00:00:00", "requeued by a site hook"),
    ("pbspro", -19, "00:00:00", "deleted by a site hook"),
    ("pbspro", -20, "00:03:00",
     "the node failed: the cluster lost contact with the job's first node"),
    ("pbspro", -21, "00:00:00",
     "refused: the cluster found a security problem in its own folders"),
    ("pbspro", -22, "00:00:00", "a site hook failed or timed out"),
    ("pbspro", -23, "00:00:00", "no Kerberos credentials"),
    ("pbspro", -24, "00:01:00", "killed: used more CPUs than it asked for (burst)"),
    ("pbspro", -25, "00:01:00", "killed: used more CPUs than it asked for"),
    ("pbspro", -26, "00:01:00", "killed: used more virtual memory than it asked for"),
    ("pbspro", -27, "00:01:00", "killed: used more memory than it asked for"),
    ("pbspro", -28, "00:01:00", "killed: used more CPU time than it asked for"),
    ("pbspro", -29, "00:30:01", "killed: ran past its 00:30:00 walltime"),
    ("pbspro", -30, "00:00:00", "the cluster could not join the job's nodes"),
    ("pbspro", -8, "00:00:00", "the cluster could not run the job (code -8)"),
    ("torque", 0, "00:00:12", "completed"),
    ("torque", 1, "00:00:12", "the script exited with status 1"),
    ("torque", 256 + 6, "00:00:12", "killed by signal 6 (SIGABRT)"),
    # 271 is what Torque records for a running job that qdel cancelled...
    ("torque", 271, "00:10:00", "cancelled on the cluster by qdel"),
    # ... and a walltime kill only when the job had used its whole walltime.
    ("torque", 271, "00:30:00", "killed: ran past its 00:30:00 walltime"),
    ("torque", -1, "00:00:00", "the cluster could not start the job"),
    ("torque", -2, "00:00:00", "the cluster could not start the job (after staging its files)"),
    ("torque", -3, "00:00:00", "the cluster could not start the job; it will be retried"),
    ("torque", -4, "00:00:00", "aborted: the node's batch daemon restarted"),
    ("torque", -5, "00:00:00", "aborted: the node's batch daemon restarted (checkpointed)"),
    ("torque", -6, "00:00:00",
     "aborted: the node's batch daemon restarted (checkpointed, may move)"),
    ("torque", -7, "00:00:00", "its restart from a checkpoint failed"),
    ("torque", -8, "00:00:00", "the script could not be started"),
    ("torque", -9, "00:00:00", "its output files could not be created"),
    ("torque", -10, "00:02:00", "killed: used more memory than it asked for"),
    ("torque", -11, "00:30:04", "killed: ran past its 00:30:00 walltime"),
    ("torque", -12, "00:02:00", "killed: used more CPU time than it asked for"),
    ("torque", -13, "00:00:00",
     "the cluster could not create the job's cgroups; it will be retried"),
    ("torque", -29, "00:00:00", "the cluster could not run the job (code -29)"),
]


@pytest.mark.parametrize(("flavour", "code", "used", "words"), PBS_CASES)
def test_every_pbs_row(flavour: str, code: int, used: str, words: str) -> None:
    exit_key = "exit_status" if flavour == "torque" else "Exit_status"
    result = ok(qstat_f(code, exit_key=exit_key, used=used))
    status = pbs.parse_qstat_text_result(result, ["1201.pbs01"], flavour).statuses["1201.pbs01"]  # type: ignore[arg-type]
    assert (status.state, status.exit_status, status.outcome) == ("ended", code, words)
    assert status.detail == f"job_state=F, Exit_status={code}"


def test_every_pbs_row_is_tested() -> None:
    hit = {(flavour, exit_codes.pbs_row(flavour, code, at_walltime=used >= "00:30:00"))  # type: ignore[arg-type]
           for flavour, code, used, _ in PBS_CASES}
    for flavour, table in (("pbspro", exit_codes.PBS_PRO), ("torque", exit_codes.TORQUE)):
        assert {row for f, row in hit if f == flavour} == set(table), flavour


def test_the_pbs_json_form_gives_the_same_words() -> None:
    """PBS Pro's ``qstat -f -F json`` nests ``Resource_List`` and ``resources_used``."""
    text = ('{"Jobs": {"7.pbs01": {"job_state": "F", "Exit_status": 271, '
            '"Resource_List": {"walltime": "01:00:00"}, '
            '"resources_used": {"walltime": "01:00:03"}}}}')
    status = pbs.parse_qstat_json_result(ok(text), ["7.pbs01"], "pbspro").statuses["7.pbs01"]
    assert status.outcome == "killed: ran past its 01:00:00 walltime"


def test_a_code_that_pbs_pro_and_torque_read_differently_claims_nothing_unknown() -> None:
    """With the flavour unknown, -11 (a rerun on PBS Pro, a walltime kill on Torque) is not
    given either meaning; codes they agree on keep theirs."""
    assert pbs.status_of("F", -11).outcome == "the cluster could not run the job (code -11)"
    assert pbs.status_of("F", -1).outcome == "the cluster could not start the job"
    assert pbs.status_of("F", 265).outcome == "killed by signal 9 (SIGKILL)"


# (an output line or record, the user's words, the exit status)
SLURM_CASES: list[tuple[str, str, str, int | None]] = [
    # sacct -n -P -X -o JobID,State,ExitCode,Timelimit (sacct(1): parsable2, code:signal)
    ("sacct", "5|COMPLETED|0:0|00:30:00", "completed", 0),
    ("sacct", "5|FAILED|3:0|00:30:00", "the script exited with status 3", 3),
    ("sacct", "5|FAILED|0:0|00:30:00", "the cluster could not start the job", None),
    ("sacct", "5|FAILED|0:9|00:30:00", "killed by signal 9 (SIGKILL)", 137),
    ("sacct", "5|TIMEOUT|0:0|00:30:00", "killed: ran past its 00:30:00 walltime", None),
    ("sacct", "5|CANCELLED|0:15|00:30:00", "cancelled on the cluster (scancel or qdel)", 143),
    ("sacct", "5|CANCELLED by 1001|0:15|UNLIMITED",
     "cancelled on the cluster by user id 1001 (scancel or qdel)", 143),
    ("sacct", "5|OUT_OF_MEMORY|0:125|00:30:00",
     "killed: used more memory than it asked for", 128 + 125),
    ("sacct", "5|NODE_FAIL|0:0|00:30:00", "the node failed", None),
    ("sacct", "5|BOOT_FAIL|0:0|00:30:00", "the node failed to boot", None),
    ("sacct", "5|PREEMPTED|0:15|00:30:00", "preempted: stopped for a more urgent job", 143),
    ("sacct", "5|DEADLINE|0:0|00:30:00", "killed: its deadline passed", None),
    ("sacct", "5|REVOKED|0:0|00:30:00", "revoked: another cluster of the federation runs it",
     None),
    # squeue -h -t all -o '%i|%T|%r' (squeue(1) JOB REASON CODES)
    ("squeue", "5|PENDING|DependencyNeverSatisfied",
     "will never run: a job it depends on did not end as required", None),
    # scontrol show job, captured on the test cluster (tests/samples/wrappers/)
    ("scontrol", "wrappers/scontrol-show-job-timeout.txt",
     "killed: ran past its 00:01:00 walltime", 143),
    ("scontrol", "wrappers/scontrol-show-job-cancelled.txt",
     "cancelled on the cluster (scancel or qdel)", 143),
    ("scontrol", "wrappers/scontrol-show-job-failed.txt", "the script exited with status 3", 3),
    ("scontrol", "wrappers/scontrol-show-job-completed.txt", "completed", 0),
]


def slurm_status(command: str, text: str) -> tuple[str, SchedulerStatus]:
    if command == "scontrol":
        output = sample(text)
        job = re.search(r"JobId=(\d+)", output).group(1)  # type: ignore[union-attr]
        return output, slurm.parse_scontrol_result(ok(output), [job]).statuses[job]
    parse = slurm.parse_sacct_result if command == "sacct" else slurm.parse_squeue_result
    return text, parse(ok(text + "\n"), ["5"]).statuses["5"]


@pytest.mark.parametrize(("command", "text", "words", "exit_status"), SLURM_CASES)
def test_every_slurm_row(command: str, text: str, words: str, exit_status: int | None) -> None:
    _, status = slurm_status(command, text)
    assert (status.state, status.outcome, status.exit_status) == ("ended", words, exit_status)
    assert status.never_runs == (command == "squeue")


def test_every_slurm_row_is_tested() -> None:
    def pattern(row: ExitCode) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(row.words)))

    for row in exit_codes.SLURM:
        assert any(pattern(row).fullmatch(words) for _, _, words, _ in SLURM_CASES), row


def test_a_never_satisfied_dependency_is_not_asked_again() -> None:
    outcome = slurm.parse_squeue_result(ok("5|PENDING|DependencyNeverSatisfied\n"
                                           "6|PENDING|Dependency\n"), ["5", "6"])
    assert outcome.statuses["6"].state == "queued"
    assert outcome.follow_up == ()


# ---- the tables in the docs --------------------------------------------------------------


def markdown(rows: Sequence[ExitCode]) -> str:
    """A table as docs/exit-codes.md shows it: the words with an example's facts."""
    lines = ["| code | what the user is told | source |", "|---|---|---|"]
    for row in rows:
        words = exit_codes.words(row, status=3, signal="signal 9 (SIGKILL)",
                                 walltime="00:30:00", state="CANCELLED by 1001")
        lines.append(f"| `{row.code}` | {words} | {row.source} |")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("flavour", sorted(exit_codes.TABLES))
def test_the_docs_show_each_table_as_the_code_has_it(flavour: str) -> None:
    table = markdown(exit_codes.TABLES[flavour])  # type: ignore[index]
    assert table in DOCS.read_text(), f"docs/exit-codes.md must have this table:\n{table}"


# ---- flavour -----------------------------------------------------------------------------


def test_pbs_pro_torque_and_slurm_tell_their_versions() -> None:
    # PBS Pro: PRINT_VERSION_AND_EXIT (src/include/pbs_version.h.in), on stdout.
    assert parse_qstat_version(ok("pbs_version = 19.1.3\n")) == SchedulerFlavour(
        "pbspro", "19.1.3")
    # Torque: qstat.c prints "Version:" and "Commit:" on stderr and exits 0.
    assert parse_qstat_version(ok("", "Version: 6.1.3\nCommit: 7f0b0d4\n")) == (
        SchedulerFlavour("torque", "6.1.3"))
    # Slurm's qstat wrapper (perl Getopt) knows no --version; captured on the test cluster.
    assert parse_qstat_version(ok("", "Unknown option: version\nUsage: ...\n", 2)) is None
    assert parse_sinfo_version(ok("slurm 22.05.8\n")) == SchedulerFlavour("slurm", "22.05.8")
    assert parse_sinfo_version(ok("slurm-wlm 17.11.2\n")) == SchedulerFlavour(
        "slurm", "17.11.2")
    assert parse_sinfo_version(ok("", "sinfo: command not found\n", 127)) is None


def test_walltime_reached() -> None:
    assert exit_codes.walltime_reached("00:30:00", "00:30:00")
    assert exit_codes.walltime_reached("1-00:00:01", "24:00:00")
    assert not exit_codes.walltime_reached("00:29:59", "00:30:00")
    assert not exit_codes.walltime_reached(None, "00:30:00")
    assert not exit_codes.walltime_reached("00:31:00", None)
