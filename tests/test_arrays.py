"""Job arrays, the pure parts: the template's array, the submit options, the element ids
that squeue, sacct, scontrol and PBS Pro's qstat print, and what they make of an array."""

from __future__ import annotations

import pytest

from metis_stream import tokens
from metis_stream.arrays import reconcile_array
from metis_stream.errors import InvalidParams, TemplateError
from metis_stream.events import Event, NewEvent, decode_event, element_event
from metis_stream.jobs import Job, JobState, apply_event
from metis_stream.schedulers import pbs, slurm
from metis_stream.schedulers.base import SchedulerStatus, array_status
from metis_stream.schedulers.dialect import JobRequest, index_list
from metis_stream.templates import (
    ArrayRange,
    Template,
    array_from_config,
    param_from_config,
    parse_array,
)
from tests.support.samples import ok, sample


@pytest.mark.parametrize(("text", "indices"), [
    ("1-5", [1, 2, 3, 4, 5]),
    ("0-8:4", [0, 4, 8]),
    ("7-7", [7]),
])
def test_array_ranges(text: str, indices: list[int]) -> None:
    array = parse_array(text)
    assert list(array.indices) == indices
    assert str(array) == text.replace(":1", "")


@pytest.mark.parametrize(("text", "words"), [
    ("1,3,5", "FIRST-LAST"),
    ("5-1", "must not exceed"),
    ("1-9:0", "STEP must be at least 1"),
    ("1-1001", "at most 1000 elements"),
    ("0-200000:1000", "indices go up to"),
    (5, "FIRST-LAST"),
])
def test_bad_array_ranges(text: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_array(text)


def test_array_from_a_parameter() -> None:
    params = {"count": param_from_config("count", {"type": "int", "min": 1, "max": 50,
                                                   "default": 3})}
    array, name = array_from_config({"param": "count"}, params)
    assert (array, name) == (None, "count")
    template = Template(name="t", cluster="c", params=params, array_param="count")
    assert template.array_for({"count": 4}) == ArrayRange(1, 4)
    with pytest.raises(InvalidParams):
        template.array_for({})
    assert Template(name="t", cluster="c").array_for({}) is None


@pytest.mark.parametrize(("raw", "words"), [
    ({"param": "text"}, "must be an int parameter"),
    ({"param": "unbounded"}, "needs min >= 1 and max <= 1000"),
    ({"param": "count", "extra": 1}, "FIRST-LAST"),
    ("1-5,7", "FIRST-LAST"),
])
def test_bad_array_config(raw: object, words: str) -> None:
    params = {"text": param_from_config("text", {}),
              "unbounded": param_from_config("unbounded", {"type": "int"}),
              "count": param_from_config("count", {"type": "int", "min": 1, "max": 9})}
    with pytest.raises(TemplateError, match=words):
        array_from_config(raw, params)


def _request(array: str | None) -> JobRequest:
    return JobRequest(name="ms-x", script="/w/launch", stdout="/w/o", stderr="/w/e",
                      array=array)


def test_submit_options() -> None:
    assert pbs.submit_command(_request("1-5")).argv[-3:-1] == ["-J", "1-5"]
    assert "--array=0-8:4" in slurm.submit_command(_request("0-8:4")).argv
    assert not any("array" in a or a == "-J" for a in slurm.submit_command(_request(None)).argv)


def test_index_lists() -> None:
    assert index_list("4") == [4]
    assert index_list("5-9%2") == [5, 6, 7, 8, 9]
    assert index_list("1,3,5-7") == [1, 3, 5, 6, 7]
    assert index_list("1-9:4") == [1, 5, 9]
    with pytest.raises(ValueError):
        index_list("x")


def test_squeue_array_elements_and_pending_range() -> None:
    outcome = slurm.parse_squeue_result(ok(sample("slurm/squeue-array.txt")), ["230"])
    status = outcome.statuses["230"]
    assert status.state == "running"
    assert {i: s.state for i, s in status.elements.items()} == {
        1: "ended", 2: "running", 3: "queued", 4: "queued", 5: "queued"}
    assert outcome.follow_up == ()


def test_sacct_worst_element_decides() -> None:
    """sacct prints the failed element third: the array failed all the same."""
    outcome = slurm.parse_sacct_result(ok(sample("slurm/sacct-array.txt")), ["240"])
    status = outcome.statuses["240"]
    assert status.state == "ended"
    assert status.exit_status == 1
    assert "FAILED" in status.detail
    assert status.elements[5].outcome.startswith("killed")
    assert [i for i, s in status.elements.items() if s.exit_status == 0] == [1, 2, 4]


def test_scontrol_array_elements() -> None:
    outcome = slurm.parse_scontrol_result(
        ok(sample("slurm/scontrol-o-show-job-array.txt")), ["250"])
    status = outcome.statuses["250"]
    assert status.state == "queued"  # elements 3 and 4 still wait
    assert {i: s.state for i, s in status.elements.items()} == {
        1: "ended", 2: "ended", 3: "queued", 4: "queued"}
    assert status.elements[2].exit_status == 1


def test_pbs_pro_subjobs() -> None:
    outcome = pbs.parse_qstat_json_result(ok(sample("pbs/qstat-json-subjobs.json")),
                                          ["1601[].pbs01"])
    status = outcome.statuses["1601[].pbs01"]
    assert status.state == "ended"
    assert status.exit_status == 1
    assert sorted(status.elements) == [1, 2, 3]
    assert outcome.follow_up == ()
    assert pbs.qstat_json_argv(["1601[].pbs01"])[5] == "-t"
    assert "-t" not in pbs.qstat_json_argv(["16.pbs01"])


def test_pbs_parent_alive_while_unlisted_subjobs_wait() -> None:
    outcome = pbs.parse_qstat_json_result(ok(sample("pbs/qstat-json-array.json")),
                                          ["1501[].pbs01"])
    status = outcome.statuses["1501[].pbs01"]
    assert status.state == "running"
    assert list(status.elements) == [1]


def test_array_status() -> None:
    done = SchedulerStatus("ended", 0, "COMPLETED")
    failed = SchedulerStatus("ended", 1, "FAILED")
    assert array_status({1: done, 2: failed, 3: done}).exit_status == 1
    assert array_status({1: done, 2: done}).exit_status == 0
    assert array_status({1: failed, 2: SchedulerStatus("queued")}).state == "queued"
    with pytest.raises(ValueError):
        array_status({})


# ---- the tally and the verdict (metis_stream.arrays) ----------------------------------


def _array_job(elements: dict[str, int] | None = None) -> Job:
    return Job(id="j_1", template="t", cluster="c", array="1-5", elements=elements)


def test_tally_while_the_array_runs() -> None:
    status = array_status({2: SchedulerStatus("running"), 4: SchedulerStatus("running"),
                           5: SchedulerStatus("queued")})
    events = reconcile_array(_array_job(), status, False, {1: b"0\n", 2: None, 3: b"1\n"})
    assert [(e.type, e.data) for e in events] == [
        ("elements", {"queued": 1, "running": 2, "done": 1, "failed": 1})]
    same = _array_job({"queued": 1, "running": 2, "done": 1, "failed": 1})
    assert reconcile_array(same, status, False, {1: b"0\n", 2: None, 3: b"1\n"}) == []


def test_an_array_completes_when_every_element_succeeded() -> None:
    exits = {i: b"0\n" for i in range(1, 6)}
    events = reconcile_array(_array_job(), None, True, exits)
    assert [e.type for e in events] == ["elements", "completed"]
    assert events[-1].data["elements"]["done"] == 5


def test_an_array_fails_naming_its_failed_elements() -> None:
    killed = SchedulerStatus("ended", 128 + 15, "TIMEOUT", "killed: ran past its walltime")
    status = array_status({i: SchedulerStatus("ended", 0, "COMPLETED") for i in (1, 2, 4)}
                          | {3: SchedulerStatus("ended", 1, "FAILED"), 5: killed})
    exits: dict[int, bytes | None] = {1: b"0\n", 2: b"0\n", 3: b"1\n", 4: b"0\n", 5: None}
    events = reconcile_array(_array_job(), status, True, exits)
    fatal = events[-1]
    assert fatal.type == "fatal"
    assert fatal.data["error"] == ("2 of 5 elements failed: 3 (exit 1), "
                                   "5 (killed: ran past its walltime)")
    assert fatal.data["elements"] == {"queued": 0, "running": 0, "done": 3, "failed": 2}
    assert [f["element"] for f in fatal.data["failed"]] == [3, 5]


def test_an_element_that_never_started_fails_the_ended_array() -> None:
    events = reconcile_array(_array_job(), None, True, {i: b"0\n" for i in range(1, 5)})
    assert events[-1].data["error"] == "1 of 5 elements failed: 5 (never started)"


# ---- element tokens and events ----------------------------------------------------------


def test_element_tokens() -> None:
    token = tokens.element_token("s", "j_1", 3)
    assert token.startswith("3.")
    assert tokens.element_of("s", "j_1", token) == 3
    assert tokens.element_of("s", "j_2", token) is None
    assert tokens.element_of("s", "j_1", "4" + token[1:]) is None
    assert tokens.element_of("s", "j_1", tokens.job_token("s", "j_1")) is None


def test_element_events_are_tagged_and_their_ends_renamed() -> None:
    tagged = element_event(NewEvent("fatal", {"error": "x"}, id="a"), 3)
    assert (tagged.type, tagged.element, tagged.id, tagged.terminal) == (
        "element.fatal", 3, "a", False)
    event = Event(job="j_1", seq=4, type=tagged.type, data=tagged.data, time=1.0,
                  element=3)
    assert decode_event(event.wire).element == 3
    assert '"element":3' in event.wire
    assert "element" not in Event(job="j_1", seq=5, type="log", data=None, time=1.0).wire


def test_the_tally_is_kept_on_the_job() -> None:
    job = _array_job()
    apply_event(job, Event(job="j_1", seq=1, type="elements", time=1.0,
                           data={"queued": 5, "running": 0, "done": 0, "failed": 0}))
    assert job.elements == {"queued": 5, "running": 0, "done": 0, "failed": 0}
    assert job.state == JobState.QUEUED
