"""Real outputs of Slurm's PBS wrappers and Slurm commands, captured from the test cluster
(tests/samples/wrappers/capture.py), parsed by the pbs and slurm dialects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from metis_stream.errors import SchedulerError
from metis_stream.schedulers import pbs, slurm
from metis_stream.shells.base import CommandResult

WRAPPERS = Path(__file__).parent / "samples" / "wrappers"
STDERR_MARK = "# --- stderr ---\n"


def captured(name: str) -> CommandResult:
    """A capture: ``# $ COMMAND   (exit N)``, stdout, then optionally the stderr mark and
    stderr. Skips the test when the capture has not been made."""
    path = WRAPPERS / f"{name}.txt"
    if not path.exists():
        pytest.skip(f"{path.name} not captured yet")
    header, _, rest = path.read_text().partition("\n")
    exit_status = int(header.rsplit("(exit ", 1)[1].rstrip(")"))
    stdout, _, stderr = rest.partition(STDERR_MARK)
    return CommandResult(exit_status, stdout, stderr)


def job_of(name: str) -> str:
    """The job id a capture's command line was about (its last argument)."""
    header = (WRAPPERS / f"{name}.txt").read_text().partition("\n")[0]
    return header.removeprefix("# $ ").rsplit("   (exit", 1)[0].split()[-1]


def test_qsub_success_prints_a_bare_number() -> None:
    assert pbs.parse_submit(captured("qsub-success")).isdigit()


@pytest.mark.parametrize(
    ("name", "words"),
    [("qsub-failure-too-big", "More processors requested than permitted"),
     ("qsub-failure-no-script", "Unable to open file missing.sh"),
     ("qsub-pbspro-unsupported-option", "Unknown option: d")],
)
def test_qsub_failures_carry_the_schedulers_words(name: str, words: str) -> None:
    with pytest.raises(SchedulerError, match=words):
        pbs.parse_submit(captured(name))


def test_sbatch_parsable() -> None:
    assert slurm.parse_submit(captured("sbatch-parsable")).isdigit()


WRAPPER_STATES = {"Q": "queued", "R": "running", "S": "queued", "C": "ended"}
"""The only states the wrappers print (C = ended for any reason)."""


@pytest.mark.parametrize(
    "name",
    ["qstat-f-running", "qstat-f-queued", "qstat-f-completed", "qstat-f-cancelled",
     "qstat-f-failed", "qstat-f-timeout"],
)
def test_qstat_text(name: str) -> None:
    result = captured(name)
    job = job_of(name)
    # What the capture really shows (a job meant to stay queued may have run already).
    letter = re.search(r"^\tjob_state = (\w)$", result.stdout, re.MULTILINE)
    assert letter is not None
    outcome = pbs.parse_qstat_text_result(result, [job])
    assert outcome.statuses[job].state == WRAPPER_STATES[letter.group(1)]
    # the wrappers have no exit status: an ended job is asked of scontrol
    ended = outcome.statuses[job].state == "ended"
    assert outcome.follow_up == ((job,) if ended else ())


def test_qstat_several_jobs_in_one_command() -> None:
    result = captured("qstat-f-several")
    jobs = pbs.parse_qstat_text(result.stdout)
    assert len(jobs) == 2
    outcome = pbs.parse_qstat_text_result(result, list(jobs))
    assert set(outcome.statuses) == set(jobs)


def test_qstat_unknown_job_is_left_out() -> None:
    assert pbs.parse_qstat_text_result(captured("qstat-unknown"), ["99999"]).statuses == {}


def test_qstat_json_is_unsupported_on_the_wrappers() -> None:
    result = captured("qstat-f-json-unsupported")
    assert not pbs.parse_qstat_json_result(result, [job_of("qstat-f-json-unsupported")]).supported


@pytest.mark.parametrize("name", ["qdel-running", "qdel-ended", "qdel-unknown"])
def test_qdel_of_a_gone_job_is_not_an_error(name: str) -> None:
    pbs.check_cancel(captured(name))


@pytest.mark.parametrize(
    ("name", "exit_status"),
    [("scontrol-show-job-pending", None), ("scontrol-show-job-running", None),
     ("scontrol-show-job-completed", 0), ("scontrol-show-job-failed", 3),
     ("scontrol-show-job-cancelled", 128 + 15), ("scontrol-show-job-timeout", 128 + 15)],
)
def test_scontrol_show_job(name: str, exit_status: int | None) -> None:
    result = captured(name)
    job = job_of(name)
    state = re.search(r"JobState=(\w+)", result.stdout)
    assert state is not None
    status = slurm.parse_scontrol_result(result, [job]).statuses[job]
    expected = {"PENDING": "queued", "RUNNING": "running"}.get(state.group(1), "ended")
    assert status.state == expected
    if expected == "ended":
        assert status.exit_status == exit_status
    if state.group(1) == "TIMEOUT":
        assert status.detail == "TIMEOUT, TimeLimit, ExitCode=0:15"
        assert status.outcome == "killed: ran past its 00:01:00 walltime"


def test_scontrol_unknown_job() -> None:
    result = captured("scontrol-show-job-unknown")
    assert slurm.parse_scontrol_result(result, ["99999"]).statuses == {}


def test_squeue_format() -> None:
    result = captured("squeue-format")
    ids = job_of("squeue-format").split(",")
    outcome = slurm.parse_squeue_result(result, ids)
    assert outcome.statuses
    assert all(i in outcome.statuses or i in outcome.follow_up for i in ids)


def test_squeue_unknown_job_is_followed_up() -> None:
    assert slurm.parse_squeue_result(captured("squeue-unknown"), ["99999"]).follow_up == ("99999",)


def test_squeue_ended_jobs_are_followed_up() -> None:
    result = captured("squeue-ended")
    ids = job_of("squeue-ended").split(",")
    outcome = slurm.parse_squeue_result(result, ids)
    assert set(outcome.follow_up) == set(ids)


def test_sacct() -> None:
    result = captured("sacct")
    header = (WRAPPERS / "sacct.txt").read_text().partition("\n")[0]
    ids = header.split(" -j ", 1)[1].split()[0].split(",")
    outcome = slurm.parse_sacct_result(result, ids)
    if "accounting storage is disabled" in result.stderr:  # the test cluster has none
        assert not outcome.supported
    else:
        assert all(status.state == "ended" for status in outcome.statuses.values())
