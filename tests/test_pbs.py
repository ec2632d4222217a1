"""PBS dialect: qsub command lines, job ids, qstat parsing (PBS Pro, Torque, Slurm's wrappers)."""

from __future__ import annotations

import json
import re

import pytest

from metis_stream.errors import SchedulerError, UnsafeValue
from metis_stream.schedulers import pbs
from metis_stream.schedulers.dialect import JobRequest, job_name, split_env
from tests.support.samples import ok, sample


def request(**changes: object) -> JobRequest:
    base: dict[str, object] = {
        "name": "j_01HX0000000000000000000000",
        "script": "/home/alice/metis-stream/scripts/0123456789abcdef-run.pbs",
        "stdout": "/home/alice/metis-stream/jobs/j_1/stdout",
        "stderr": "/home/alice/metis-stream/jobs/j_1/stderr",
    }
    base.update(changes)
    return JobRequest(**base)  # type: ignore[arg-type]


# ---- qsub ------------------------------------------------------------------------------


def test_qsub_argv_has_everything_on_the_command_line() -> None:
    command = pbs.submit_command(request(
        queue="short", account="proj-1",
        resources={"select": "1:ncpus=2:mem=4gb", "walltime": "00:05:00", "ngpus": "1"},
        env={"METIS_JOB_ID": "j_1", "METIS_EVENTS_URL": "http://10.0.0.5:8000/api/jobs/j_1/events"},
    ))
    assert command.argv == [
        "qsub", "-N", "j_01HX0000000000000000000000", "-q", "short", "-A", "proj-1",
        "-l", "select=1:ncpus=2:mem=4gb,walltime=00:05:00,ngpus=1",
        "-o", "/home/alice/metis-stream/jobs/j_1/stdout",
        "-e", "/home/alice/metis-stream/jobs/j_1/stderr",
        "-v", "METIS_JOB_ID=j_1,METIS_EVENTS_URL=http://10.0.0.5:8000/api/jobs/j_1/events",
        "/home/alice/metis-stream/scripts/0123456789abcdef-run.pbs",
    ]
    assert command.left_out == ()


def test_the_end_user_ends_the_jobs_name() -> None:
    """PBS has no comment a user may set (-A and -P are what the site bills, -W takes no
    free text): the name carries the end user, and is in qstat and accounting's jobname.
    PBS Pro takes letters, digits, _, - and + in a name, up to 236."""
    name = job_name("j_01HX0000000000ABCDEFGHJKMN", "0c6f1e2a-9b1d-4f0e-8a77-5d2c3b4a1f00")
    argv = pbs.submit_command(request(name=name, user="anything-here")).argv
    assert argv[:3] == ["qsub", "-N", "ms-ABCDEFGHJKMN-0c6f1e2a-9b1d-4f0e-8a77-5d2c3b4a1f00"]
    assert not any("anything-here" in arg for arg in argv)  # the name is the only carrier
    assert pbs.qselect_argv(name) == ["qselect", "-N", name]
    assert job_name("j_01HX0000000000ABCDEFGHJKMN") == "ms-ABCDEFGHJKMN"
    assert len(job_name("j_01HX0000000000ABCDEFGHJKMN", "x" * 64)) == 80


def test_qsub_torque_resources_and_no_empty_env() -> None:
    argv = pbs.submit_command(request(resources={"nodes": "1:ppn=4"})).argv
    assert argv[argv.index("-l") + 1] == "nodes=1:ppn=4"
    assert "-v" not in argv  # no env at all: no empty -v


@pytest.mark.parametrize(
    "value",
    [
        "x;echo INJECTED", "a&b", "a|b", "$(id)", "`id`", "'quoted'", '"quoted"', "a,b",
        "hello world", "line\nbreak", "nul\x00byte", "$HOME", "http://h/?x=1&y=2", "tab\t",
        "a>b", "a<b", "~root", "a*", "(x)", "{a,b}", "back\\slash", "é",
    ],
)
def test_unsafe_values_never_reach_v(value: str) -> None:
    command = pbs.submit_command(request(env={"SAFE": "ok", "BAD": value}))
    v = command.argv[command.argv.index("-v") + 1]
    assert v == "SAFE=ok"
    assert command.left_out == ("BAD",)
    assert all(value not in arg for arg in command.argv)


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "A;B", "", "A=B", "A,B"])
def test_unsafe_names_never_reach_v(name: str) -> None:
    command = pbs.submit_command(request(env={name: "ok"}))
    assert "-v" not in command.argv
    assert command.left_out == (name,)


def test_safe_values_travel_intact() -> None:
    safe, left_out = split_env({
        "URL": "https://example.org/a/b.txt", "EXPR": "x=y", "EMPTY": "", "MAIL": "a@b.c",
        "PCT": "50%", "PLUS": "+1.5e-3", "PATHS": "/a/b:/c/d",
    })
    assert left_out == ()
    assert safe["EXPR"] == "x=y"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "j 1"), ("name", "j;1"), ("name", "1job"), ("queue", "q;rm"),
        ("account", "a b"), ("script", "relative.pbs"), ("script", "/a b/run.pbs"),
        ("stdout", "/x/$(id)"), ("stderr", "/x,y"),
    ],
)
def test_bad_fields_are_refused(field: str, value: str) -> None:
    with pytest.raises(UnsafeValue):
        pbs.submit_command(request(**{field: value}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("walltime", "5;id"), ("walltime", "1 h"), ("mem", "4 gb"), ("mem", "lots"),
        ("ncpus", "-1"), ("select", "1:ncpus=1,x=y"), ("select", "1:ncpus=$(id)"),
        ("nodes", "1:ppn=1 2"), ("ngpus", "one"), ("place", "anywhere"),
    ],
)
def test_bad_resource_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(UnsafeValue):
        pbs.submit_command(request(resources={key: value}))


def test_unknown_resource_is_refused() -> None:
    with pytest.raises(SchedulerError, match="not allowed"):
        pbs.submit_command(request(resources={"software": "x"}))


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("15\n", "15"),
        ("15.pbs01\n", "15.pbs01"),
        ("15[].pbs01.example.org\n", "15[].pbs01.example.org"),
        ("some banner\n\n1234.server\n\n", "1234.server"),
    ],
)
def test_parse_qsub_job_id(stdout: str, expected: str) -> None:
    assert pbs.parse_submit(ok(stdout)) == expected


def test_qsub_failure_raises_with_the_message_from_stdout() -> None:
    # The wrappers print errors on stdout and exit 1.
    result = ok("qsub: Job violates accounting/QOS policy\n", exit_status=1)
    with pytest.raises(SchedulerError, match="violates accounting"):
        pbs.parse_submit(result)


@pytest.mark.parametrize("stdout", ["", "INJECTED\n", "15 16\n", "job 15 submitted\n"])
def test_qsub_without_a_proper_id_is_an_error(stdout: str) -> None:
    with pytest.raises(SchedulerError, match="no job id"):
        pbs.parse_submit(ok(stdout))


# ---- qdel, lookup ------------------------------------------------------------------------


def test_qdel() -> None:
    assert pbs.cancel_argv("15.pbs01") == ["qdel", "15.pbs01"]
    with pytest.raises(UnsafeValue):
        pbs.cancel_argv("15; rm -rf ~")
    pbs.check_cancel(ok())
    pbs.check_cancel(ok(stderr="qdel: Job has finished 15.pbs01\n", exit_status=35))
    pbs.check_cancel(ok(stderr="qdel: Unknown Job Id 15.pbs01\n", exit_status=153))
    with pytest.raises(SchedulerError, match="Unauthorized"):
        pbs.check_cancel(ok(stderr="qdel: Unauthorized Request  15.pbs01\n", exit_status=159))


def test_qselect_lookup() -> None:
    assert pbs.qselect_argv("j_1") == ["qselect", "-N", "j_1"]
    assert pbs.parse_ids(ok("15.pbs01\n")) == ["15.pbs01"]
    assert pbs.parse_ids(ok("")) == []
    assert pbs.parse_ids(ok(stderr="usage: qselect ...", exit_status=2)) is None


# ---- qstat commands ----------------------------------------------------------------------


def test_one_batched_status_command() -> None:
    assert pbs.qstat_json_argv(["1.a", "2.a"]) == ["qstat", "-f", "-F", "json", "-x", "1.a", "2.a"]
    assert pbs.qstat_text_argv(["1", "2"]) == ["qstat", "-f", "1", "2"]
    with pytest.raises(UnsafeValue):
        pbs.qstat_text_argv(["1", "-x"])


# ---- qstat -f (text) -----------------------------------------------------------------------


def test_text_running_job_with_wrapped_values() -> None:
    jobs = pbs.parse_qstat_text(sample("pbs/qstat-f-running.txt"))
    attrs = jobs["4.scheduler"]
    assert attrs["job_state"] == "R"
    assert attrs["Variable_List"].startswith("PBS_O_HOME=/home/alice,PBS_O_LANG=en_US.UTF-8,PBS_O")
    assert "PBS_O_PATH=/usr/local/bin:/usr/bin:/usr/local/sbin:/usr/sbin," in attrs["Variable_List"]
    assert attrs["Variable_List"].endswith("METIS_JOB_ID=j_01HX0000000000000000000000")
    assert re.fullmatch(r"login-1\.example\.org:/home/alice/metis-stream/jobs/j_01HX0+/stdout",
                        attrs["Output_Path"])
    assert attrs["Submit_arguments"].endswith("walltime=00:05:00 -v METIS_JOB_ID=j_01HX" + "0" * 22
                                              + " run.pbs")
    assert attrs["comment"].startswith("Job run at")  # the attribute after a wrapped one
    assert pbs.status_from_attributes(attrs).state == "running"


def test_text_history_with_walltime_kill() -> None:
    result = ok(sample("pbs/qstat-fx-history.txt"))
    outcome = pbs.parse_qstat_text_result(result, ["1201.pbs01", "1202.pbs01", "1203.pbs01"],
                                          "pbspro")
    killed = outcome.statuses["1201.pbs01"]
    assert (killed.state, killed.exit_status) == ("ended", -29)
    assert killed.detail == "job_state=F, Exit_status=-29"
    assert killed.outcome == "killed: ran past its walltime"  # no Resource_List.walltime
    assert outcome.statuses["1202.pbs01"].exit_status == 0
    assert outcome.statuses["1202.pbs01"].outcome == "completed"
    assert outcome.statuses["1203.pbs01"].state == "queued"
    assert outcome.statuses["1203.pbs01"].detail == "held (job_state=H)"
    assert outcome.follow_up == ()


def test_text_torque_lowercase_exit_status() -> None:
    jobs = pbs.parse_qstat_text(sample("pbs/qstat-f-torque-completed.txt"))
    status = pbs.status_from_attributes(jobs["881.torque-srv.example.org"], "torque")
    assert (status.state, status.exit_status) == ("ended", 3)
    assert status.detail == "job_state=C, Exit_status=3"
    assert status.outcome == "the script exited with status 3"


def test_text_tab_indented_attributes_like_the_wrappers() -> None:
    text = "Job Id:\t15\n\tJob_Name = run.sh\n\tjob_state = C\n\tqueue = debug\n"
    outcome = pbs.parse_qstat_text_result(ok(text), ["15"])
    assert outcome.statuses["15"].state == "ended"
    assert outcome.statuses["15"].exit_status is None
    assert outcome.follow_up == ("15",)  # scontrol knows how it ended


def test_text_ids_are_matched_by_sequence_number() -> None:
    text = "Job Id: 15.pbs01.example.org\n    job_state = R\n"
    outcome = pbs.parse_qstat_text_result(ok(text), ["15.pbs01"])
    assert outcome.statuses["15.pbs01"].state == "running"


def test_unknown_ids_are_left_out_not_errors() -> None:
    wrapper = ok("", "", 153)  # the wrappers say nothing
    assert pbs.parse_qstat_text_result(wrapper, ["99"]).statuses == {}
    pro = ok("", "qstat: Unknown Job Id 99.pbs01\n", 153)
    assert pbs.parse_qstat_text_result(pro, ["99.pbs01"]).statuses == {}
    finished = ok("", "qstat: 98.pbs01 Job has finished, use -x or -H to obtain historical job "
                      "information\n", 35)
    assert pbs.parse_qstat_text_result(finished, ["98.pbs01"]).statuses == {}


def test_a_broken_qstat_is_an_error() -> None:
    result = ok("", "Connection refused\nqstat: cannot connect to server pbs01 (errno=111)\n", 2)
    with pytest.raises(SchedulerError, match="cannot connect"):
        pbs.parse_qstat_text_result(result, ["1.pbs01"])


# ---- qstat -f -F json ------------------------------------------------------------------------


def test_json_finished_jobs_and_exit_codes() -> None:
    ids = ["1301.pbs01", "1302.pbs01", "1303.pbs01", "1304.pbs01", "1305.pbs01"]
    outcome = pbs.parse_qstat_json_result(ok(sample("pbs/qstat-json-finished.json")), ids,
                                          "pbspro")
    s = outcome.statuses
    # SIGTERM with no resources_used.walltime to show that the limit was reached.
    assert (s["1301.pbs01"].exit_status, s["1301.pbs01"].outcome) == (
        271, "cancelled on the cluster by qdel")
    assert s["1302.pbs01"].outcome == "killed by signal 9 (SIGKILL)"
    assert s["1302.pbs01"].detail == "job_state=F, Exit_status=265"
    assert s["1303.pbs01"].exit_status == 2  # a string in some versions
    assert s["1304.pbs01"].outcome == "killed: used more memory than it asked for"
    assert s["1305.pbs01"].state == "queued"
    assert outcome.follow_up == ()


def test_json_with_known_defects_is_repaired() -> None:
    text = sample("pbs/qstat-json-defects.json")
    with pytest.raises(ValueError):
        json.loads(text)
    jobs = pbs.parse_qstat_json(text)
    assert jobs["1401.pbs01"]["job_state"] == "R"
    variables = jobs["1401.pbs01"]["Variable_List"]
    assert isinstance(variables, dict)
    assert variables["foo"] == "005"
    assert variables["VERSION"] == "1.2.3"
    assert variables["PBS_O_WORKDIR"] == "/home/alice"
    assert "scratch is shared" in str(jobs["1401.pbs01"]["comment"])
    outcome = pbs.parse_qstat_json_result(ok(text), ["1401.pbs01", "1402.pbs01"])
    assert outcome.statuses["1402.pbs01"].exit_status == -29


def test_json_beyond_repair_falls_back_to_the_text_form() -> None:
    outcome = pbs.parse_qstat_json_result(ok('{"Jobs": {"1.a": {'), ["1.a", "2.a"])
    assert outcome.statuses == {}
    assert outcome.follow_up == ("1.a", "2.a")
    assert outcome.supported


def test_json_array_parent_and_subjob() -> None:
    outcome = pbs.parse_qstat_json_result(
        ok(sample("pbs/qstat-json-array.json")), ["1501[].pbs01", "1501[1].pbs01"])
    assert outcome.statuses["1501[].pbs01"].state == "running"
    assert outcome.statuses["1501[].pbs01"].detail == "array running (job_state=B)"
    assert outcome.statuses["1501[1].pbs01"].state == "ended"


def test_json_unsupported_on_the_wrappers() -> None:
    result = ok("", "Unknown option: f\nUsage: qstat [-f] ...\n", 2)
    assert not pbs.parse_qstat_json_result(result, ["15"]).supported


def test_json_job_missing_although_qstat_exited_0_is_asked_again() -> None:
    # Some PBS versions print only the first of several jobs in JSON.
    text = '{"Jobs": {"10.a": {"job_state": "R"}}}'
    outcome = pbs.parse_qstat_json_result(ok(text), ["10.a", "11.a"])
    assert outcome.follow_up == ("11.a",)
    unknown = ok(text, "qstat: Unknown Job Id 11.a\n", 153)
    assert pbs.parse_qstat_json_result(unknown, ["10.a", "11.a"]).follow_up == ()


def test_empty_json_output() -> None:
    assert pbs.parse_qstat_json("") == {}
    assert pbs.parse_qstat_json('{"timestamp": 1, "pbs_server": "a"}') == {}


# ---- state and exit status mapping -----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [("Q", "queued"), ("H", "queued"), ("W", "queued"), ("T", "queued"), ("S", "queued"),
     ("R", "running"), ("E", "running"), ("B", "running"),
     ("C", "ended"), ("F", "ended"), ("X", "ended"), ("Z", "queued"), ("", "queued")],
)
def test_job_states(state: str, expected: str) -> None:
    assert pbs.status_of(state, None).state == expected


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0, "completed"),
        (-29, "killed: ran past its walltime"),
        (271, "cancelled on the cluster by qdel"),
        (-1, "the cluster could not start the job"),
        (-99, "the cluster could not run the job (code -99)"),
        (265, "killed by signal 9 (SIGKILL)"),
        (256 + 99, "killed by signal 99"),
        (1, "the script exited with status 1"),
        (137, "the script exited with status 137"),
        (None, ""),
    ],
)
def test_exit_status_outcomes(code: int | None, outcome: str) -> None:
    status = pbs.status_of("F", code, "pbspro")
    assert (status.state, status.exit_status, status.outcome) == ("ended", code, outcome)
    assert status.detail == ("job_state=F, no Exit_status" if code is None
                             else f"job_state=F, Exit_status={code}")


def test_exit_status_as_text_is_tolerated() -> None:
    assert pbs.status_from_attributes({"job_state": "F", "Exit_status": " -29 "}).exit_status == -29
    assert pbs.status_from_attributes({"job_state": "F", "Exit_status": "n/a"}).exit_status is None
    assert pbs.status_from_attributes({"job_state": "F", "Exit_status": True}).exit_status is None


def test_job_id_pattern() -> None:
    for good in ("15", "15.pbs01", "15[].pbs01", "15[3].pbs01.example.org"):
        assert pbs.JOB_ID.match(good)
    for bad in ("", "x15", "15 16", "15;id", "15.pbs01\n", "-15"):
        assert not pbs.JOB_ID.match(bad)
