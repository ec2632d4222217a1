"""Slurm dialect: sbatch command lines and ids, squeue/sacct/scontrol parsing, state mapping."""

from __future__ import annotations

import pytest

from metis_stream.errors import SchedulerError, UnsafeValue
from metis_stream.schedulers import slurm
from metis_stream.schedulers.dialect import JobRequest, job_name
from tests.support.samples import ok, sample


def request(**changes: object) -> JobRequest:
    base: dict[str, object] = {
        "name": "j_1",
        "script": "/home/u/metis-stream/scripts/abc-run.sh",
        "stdout": "/home/u/metis-stream/jobs/j_1/stdout",
        "stderr": "/home/u/metis-stream/jobs/j_1/stderr",
    }
    base.update(changes)
    return JobRequest(**base)  # type: ignore[arg-type]


# ---- sbatch ------------------------------------------------------------------------------


def test_sbatch_argv() -> None:
    command = slurm.submit_command(request(
        queue="debug", account="proj",
        resources={"walltime": "01:30:00", "mem": "4gb", "ncpus": "2", "ntasks": "1"},
        env={"METIS_JOB_ID": "j_1", "TEXT": "hello world"},
    ))
    assert command.argv == [
        "sbatch", "--parsable", "--job-name=j_1", "--partition=debug", "--account=proj",
        "--time=0-01:30:00", "--mem=4G", "--cpus-per-task=2", "--ntasks=1",
        "--output=/home/u/metis-stream/jobs/j_1/stdout",
        "--error=/home/u/metis-stream/jobs/j_1/stderr",
        "--export=METIS_JOB_ID=j_1",
        "/home/u/metis-stream/scripts/abc-run.sh",
    ]
    assert command.left_out == ("TEXT",)


def test_the_end_user_is_the_jobs_comment_and_ends_its_name() -> None:
    """A cluster account shared by a web app's users tells them apart: in the name (always
    in sacct) and the comment (squeue %k; sacct with AccountingStoreFlags=job_comment)."""
    name = job_name("j_01HX0000000000ABCDEFGHJKMN", "user-42")
    assert name == "ms-ABCDEFGHJKMN-user-42"
    argv = slurm.submit_command(request(name=name, user="user-42")).argv
    assert argv[:4] == ["sbatch", "--parsable", "--job-name=ms-ABCDEFGHJKMN-user-42",
                        "--comment=user-42"]
    assert not any(arg.startswith("--comment") for arg in slurm.submit_command(request()).argv)


@pytest.mark.parametrize("user", ["", "a b", "a;id", "$(id)", "a,b", "é", "a.b", "a@b",
                                  "a\nb", "x" * 65])
def test_an_unsafe_end_user_never_reaches_sbatch(user: str) -> None:
    with pytest.raises(UnsafeValue, match="end user id"):
        slurm.submit_command(request(user=user))
    with pytest.raises(UnsafeValue, match="end user id"):
        job_name("j_01HX0000000000ABCDEFGHJKMN", user)


@pytest.mark.parametrize(
    "value", ["a,b", "x;echo hi", "$(id)", "`id`", "'q'", '"q"', "a b", "a\nb", "a\x00b", "a&b"])
def test_unsafe_values_never_reach_export(value: str) -> None:
    command = slurm.submit_command(request(env={"OK": "1", "BAD": value}))
    assert command.argv[-2] == "--export=OK=1"
    assert command.left_out == ("BAD",)


def test_the_submitting_environment_never_reaches_the_job() -> None:
    """Not ALL: sbatch would copy its whole environment into the job (the server's, for a
    cluster without host). Listed variables only; the job gets the cluster user's login
    environment from Slurm (SLURM_GET_USER_ENV), and with nothing to list, NONE."""
    listed = slurm.submit_command(request(env={"METIS_JOB_ID": "j_1", "A": "x=y"}))
    exports = [arg for arg in listed.argv if arg.startswith("--export")]
    assert exports == ["--export=METIS_JOB_ID=j_1,A=x=y"]
    bare = slurm.submit_command(request(env={"BAD": "a b"}))
    assert [arg for arg in bare.argv if arg.startswith("--export")] == ["--export=NONE"]


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [("00:05:00", "0-00:05:00"), ("90", "0-00:01:30"), ("1:30", "0-00:01:30"),
     ("25:00:00", "1-01:00:00"), ("00:00:01.5", "0-00:00:02")],
)
def test_walltime(walltime: str, expected: str) -> None:
    # a bare number is seconds for PBS but minutes for Slurm: always converted
    assert slurm.slurm_time(walltime) == expected


@pytest.mark.parametrize(
    ("size", "expected"), [("4gb", "4G"), ("512mb", "512M"), ("4G", "4G"), ("100", "100"),
                           ("2048b", "2K"), ("1tb", "1T")])
def test_sizes(size: str, expected: str) -> None:
    assert slurm.slurm_size(size) == expected


def test_select_maps_to_tasks_and_cpus() -> None:
    assert slurm.select_options("2:ncpus=4:mem=8gb:ngpus=1") == [
        "--ntasks=2", "--cpus-per-task=4", "--gpus-per-task=1", "--mem-per-cpu=2048M"]
    assert slurm.select_options("1:ncpus=1") == ["--ntasks=1", "--cpus-per-task=1"]
    with pytest.raises(SchedulerError):
        slurm.select_options("1:ncpus=1+2:ncpus=2")
    with pytest.raises(SchedulerError):
        slurm.select_options("1:host=node1")


@pytest.mark.parametrize(
    ("key", "value"),
    [("walltime", "1h"), ("mem", "4 G"), ("ncpus", "x"), ("nodes", "1;id"), ("time", "$(id)"),
     ("qos", "a b"), ("software", "x")],
)
def test_bad_resources_are_refused(key: str, value: str) -> None:
    with pytest.raises(SchedulerError):
        slurm.submit_command(request(resources={key: value}))



@pytest.mark.parametrize(("stdout", "job"), [("12345\n", "12345"), ("12345;cluster1\n", "12345")])
def test_parse_sbatch(stdout: str, job: str) -> None:
    assert slurm.parse_submit(ok(stdout)) == job


def test_sbatch_errors() -> None:
    with pytest.raises(SchedulerError, match="invalid partition"):
        slurm.parse_submit(ok("", "sbatch: error: invalid partition specified: x\n", 1))
    with pytest.raises(SchedulerError, match="no job id"):
        slurm.parse_submit(ok("Submitted batch job 12\n"))


def test_scancel() -> None:
    assert slurm.cancel_argv("12") == ["scancel", "12"]
    with pytest.raises(UnsafeValue):
        slurm.cancel_argv("12 13")
    slurm.check_cancel(ok("", "scancel: error: Kill job error on job id 12: Job/step already "
                              "completing or completed\n", 1))
    with pytest.raises(SchedulerError):
        slurm.check_cancel(ok("", "scancel: error: Unable to contact slurm controller\n", 1))


def test_lookup_by_name() -> None:
    argv = slurm.squeue_by_name_argv("j_1")
    assert argv == ["squeue", "-h", "-t", "all", "-n", "j_1", "-o", "%i"]
    assert slurm.parse_ids(ok("15\n")) == ["15"]
    assert slurm.parse_ids(ok("")) == []


# ---- status ------------------------------------------------------------------------------


def test_status_commands_batch_all_ids() -> None:
    assert slurm.squeue_argv(["1", "2"]) == [
        "squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j", "1,2"]
    assert slurm.sacct_argv(["1", "2"]) == [
        "sacct", "-n", "-P", "-X", "-j", "1,2", "-o",
        "JobID,State,ExitCode,Timelimit"]
    assert slurm.scontrol_argv(["1"]) == ["scontrol", "-o", "show", "job", "1"]
    assert slurm.scontrol_argv(["1", "2"]) == ["scontrol", "-o", "show", "job"]


def test_squeue() -> None:
    outcome = slurm.parse_squeue_result(ok(sample("slurm/squeue.txt")),
                                        ["101", "102", "103", "104", "9"])
    s = outcome.statuses
    assert s["101"].state == "running"
    assert (s["102"].state, s["102"].detail) == ("queued", "queued (PENDING, Priority)")
    assert s["103"].state == "ended"
    assert s["104"].state == "running"  # an array is as alive as its most alive element
    assert set(outcome.follow_up) == {"103", "9"}


def test_squeue_unknown_single_id() -> None:
    result = ok("", "slurm_load_jobs error: Invalid job id specified\n", 1)
    assert slurm.parse_squeue_result(result, ["9"]).follow_up == ("9",)
    with pytest.raises(SchedulerError):
        slurm.parse_squeue_result(ok("", "slurm_load_jobs error: Unable to contact slurm "
                                         "controller (connect failure)\n", 1), ["9"])


def test_sacct() -> None:
    ids = ["103", "105", "106", "107", "108", "109", "110"]
    s = slurm.parse_sacct_result(ok(sample("slurm/sacct.txt")), ids).statuses
    assert (s["103"].detail, s["103"].outcome) == (
        "TIMEOUT, ExitCode=0:0", "killed: ran past its walltime")  # no Timelimit column
    assert s["103"].exit_status is None
    assert (s["105"].exit_status, s["105"].detail, s["105"].outcome) == (
        143, "CANCELLED by 1000, ExitCode=0:15",
        "cancelled on the cluster by user id 1000 (scancel or qdel)")
    assert (s["106"].exit_status, s["106"].outcome) == (2, "the script exited with status 2")
    assert s["107"].outcome == "killed: used more memory than it asked for"
    assert (s["108"].exit_status, s["108"].outcome) == (0, "completed")
    assert s["109"].exit_status is None  # 0:0 on a node failure is not a success
    assert s["109"].outcome == "the node failed"
    assert s["110"].outcome == "killed by signal 9 (SIGKILL)"
    assert all(status.state == "ended" for status in s.values())


def test_sacct_without_accounting_storage() -> None:
    result = ok("", sample("slurm/sacct-disabled.txt"), 1)
    assert not slurm.parse_sacct_result(result, ["1"]).supported


def test_scontrol_show_job() -> None:
    status = slurm.parse_scontrol_result(ok(sample("slurm/scontrol-show-job.txt")),
                                         ["15"]).statuses["15"]
    assert (status.state, status.exit_status) == ("ended", 137)
    assert status.detail == "TIMEOUT, TimeLimit, ExitCode=0:9"
    assert status.outcome == "killed: ran past its 00:01:00 walltime"


def test_scontrol_one_line_records() -> None:
    s = slurm.parse_scontrol_result(ok(sample("slurm/scontrol-o-show-job.txt")), ["16", "17", "99"])
    assert s.statuses["16"].exit_status == 0
    assert s.statuses["17"].exit_status == 3
    assert set(s.statuses) == {"16", "17"}


def test_scontrol_unknown_job() -> None:
    result = ok("", "slurm_load_jobs error: Invalid job id specified\n", 1)
    assert slurm.parse_scontrol_result(result, ["99"]).statuses == {}


@pytest.mark.parametrize(
    ("state", "expected"),
    [("PENDING", "queued"), ("CONFIGURING", "queued"), ("SUSPENDED", "queued"),
     ("RUNNING", "running"), ("COMPLETING", "running"),
     ("COMPLETED", "ended"), ("FAILED", "ended"), ("TIMEOUT", "ended"), ("CANCELLED", "ended"),
     ("CANCELLED by 0", "ended"), ("NODE_FAIL", "ended"), ("OUT_OF_MEMORY", "ended"),
     ("PREEMPTED", "ended"), ("BOOT_FAIL", "ended"), ("DEADLINE", "ended"),
     ("SOMETHING_NEW", "queued")],
)
def test_states(state: str, expected: str) -> None:
    assert slurm.status_of(state, "0:0").state == expected
