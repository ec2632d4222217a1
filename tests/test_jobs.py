"""Unit tests of metis_stream.jobs: the state machine, apply_event, job ids, records."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.events import Event
from metis_stream.jobs import (
    ACTIVE_STATES,
    STATE_AFTER_EVENT,
    TERMINAL_STATES,
    Job,
    JobState,
    apply_event,
    fields_set_by,
    new_job_id,
    state_after,
    state_machine,
)

S = JobState
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BUILT_IN = ["starting", "submitted", "queued", "running", "step", "progress", "token", "chunk",
            "log", "result", "completed", "fatal", "cancelled"]
event_types = st.sampled_from([*BUILT_IN, "custom", "x.y-z"])


def make_job(**changes: Any) -> Job:
    return Job(id="j_01HX0000000000000000000000", template="tokens", cluster="local",
               **changes)


def ev(event_type: str, data: Any = None, seq: int = 1, at: float = 100.0) -> Event:
    return Event(job="j_01HX0000000000000000000000", seq=seq, type=event_type, data=data,
                 time=at)


# states


def test_terminal_and_active_states_partition_all_states():
    assert {S.COMPLETED, S.FAILED, S.CANCELLED} == TERMINAL_STATES
    assert {S.CREATED, S.SUBMITTING, S.QUEUED, S.RUNNING} == ACTIVE_STATES
    for state in S:
        assert state.terminal == (state in TERMINAL_STATES)


def test_ranks_go_forward_in_documented_order():
    order = [S.CREATED, S.SUBMITTING, S.QUEUED, S.RUNNING]
    assert [s.rank for s in order] == sorted({s.rank for s in order})
    assert all(t.rank > S.RUNNING.rank for t in TERMINAL_STATES)


# state_after, built-in type by built-in type

EXPECTED_FROM_CREATED = {
    "starting": S.SUBMITTING, "submitted": S.QUEUED, "queued": S.QUEUED,
    "running": S.RUNNING, "step": S.RUNNING, "progress": S.RUNNING, "token": S.RUNNING,
    "chunk": S.RUNNING, "log": S.RUNNING, "result": S.RUNNING,
    "completed": S.COMPLETED, "fatal": S.FAILED, "cancelled": S.CANCELLED,
    "some-unknown.type": S.RUNNING,
}


@pytest.mark.parametrize(("event_type", "target"), sorted(EXPECTED_FROM_CREATED.items()))
def test_state_after_each_type_from_created(event_type, target):
    assert state_after(S.CREATED, event_type) is target


@pytest.mark.parametrize(("state", "event_type", "expected"), [
    (S.SUBMITTING, "submitted", S.QUEUED),
    (S.SUBMITTING, "starting", S.SUBMITTING),
    (S.QUEUED, "queued", S.QUEUED),
    (S.QUEUED, "token", S.RUNNING),
    (S.QUEUED, "starting", S.QUEUED),       # backwards: ignored
    (S.RUNNING, "queued", S.RUNNING),       # backwards: ignored
    (S.RUNNING, "submitted", S.RUNNING),    # a late `submitted` does not go back
    (S.RUNNING, "starting", S.RUNNING),
    (S.RUNNING, "completed", S.COMPLETED),
    (S.RUNNING, "fatal", S.FAILED),
    (S.QUEUED, "cancelled", S.CANCELLED),
    (S.SUBMITTING, "fatal", S.FAILED),
])
def test_state_after_transitions(state, event_type, expected):
    assert state_after(state, event_type) is expected


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
@pytest.mark.parametrize("event_type", [*BUILT_IN, "unknown"])
def test_terminal_states_are_final(terminal, event_type):
    assert state_after(terminal, event_type) is terminal


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(S)), st.lists(event_types, max_size=12))
def test_state_only_moves_forward(start, types):
    state = start
    for event_type in types:
        after = state_after(state, event_type)
        assert after.rank >= state.rank
        if state.terminal:
            assert after is state
        state = after


def test_state_table_covers_the_named_types():
    assert set(STATE_AFTER_EVENT) == {"starting", "submitted", "queued", "completed", "fatal",
                                      "cancelled", "stale", "recovered", "elements"}


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING])
@pytest.mark.parametrize("event_type", ["stale", "recovered"])
def test_the_clusters_news_leaves_a_jobs_state_alone(state, event_type):
    assert state_after(state, event_type) is state


# apply_event


def test_apply_event_tracks_seq_time_and_state():
    job = make_job()
    apply_event(job, ev("starting", seq=1, at=10.0))
    assert (job.last_seq, job.updated, job.state, job.ended) == (1, 10.0, S.SUBMITTING, None)
    apply_event(job, ev("submitted", "123.pbs01", seq=2, at=11.0))
    assert (job.last_seq, job.state, job.scheduler_id) == (2, S.QUEUED, "123.pbs01")
    apply_event(job, ev("step", "Downloading", seq=3, at=12.0))
    assert job.state is S.RUNNING
    assert job.ended is None


def test_submitted_without_a_string_sets_no_scheduler_id():
    job = make_job()
    apply_event(job, ev("submitted", {"id": "123"}))
    assert job.scheduler_id is None
    assert job.state is S.QUEUED


def test_result_event_sets_result():
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("result", {"size": 5, "sha256": "ab"}))
    assert job.result == {"size": 5, "sha256": "ab"}
    assert job.state is S.RUNNING
    assert job.ended is None


def test_completed_with_data_sets_result_and_ended():
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("completed", {"words": 4}, seq=9, at=50.5))
    assert job.result == {"words": 4}
    assert job.state is S.COMPLETED
    assert job.ended == 50.5
    assert job.error is None


def test_completed_without_data_keeps_an_earlier_result():
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("result", [1, 2], seq=1))
    apply_event(job, ev("completed", None, seq=2))
    assert job.result == [1, 2]
    assert job.state is S.COMPLETED


@pytest.mark.parametrize("data", [0, "", False, []])
def test_completed_with_falsy_but_present_data_is_the_result(data):
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("result", "earlier", seq=1))
    apply_event(job, ev("completed", data, seq=2))
    assert job.result == data
    assert type(job.result) is type(data)


@pytest.mark.parametrize(("data", "error", "exit_status"), [
    ("out of memory", "out of memory", None),
    ({"error": "walltime exceeded", "exit_status": 271}, "walltime exceeded", 271),
    ({"message": "node failed", "exit_status": 1}, "node failed", 1),
    ({"error": "boom", "message": "ignored"}, "boom", None),
    ({"exit_status": 0}, "fatal", 0),
    ({"error": "x", "exit_status": "2"}, "x", None),
    ({"error": 42}, "42", None),
    (None, "fatal", None),
    ([1, 2], "fatal", None),
    (7, "fatal", None),
])
def test_fatal_sets_error_and_exit_status(data, error, exit_status):
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("fatal", data, seq=4, at=77.0))
    assert job.state is S.FAILED
    assert job.error == error
    assert job.exit_status == exit_status
    assert job.ended == 77.0


@pytest.mark.parametrize(("data", "error"), [
    (None, "cancelled"),
    ("by the user", "by the user"),
    ({"error": "cancelled by admin"}, "cancelled by admin"),
])
def test_cancelled_sets_error(data, error):
    job = make_job(state=S.QUEUED)
    apply_event(job, ev("cancelled", data, at=5.0))
    assert job.state is S.CANCELLED
    assert job.error == error
    assert job.exit_status is None
    assert job.ended == 5.0


def test_ended_is_the_time_of_the_first_terminal_event():
    job = make_job(state=S.RUNNING)
    apply_event(job, ev("completed", None, seq=1, at=10.0))
    apply_event(job, ev("log", "late", seq=2, at=20.0))
    assert job.ended == 10.0
    assert job.state is S.COMPLETED
    assert job.updated == 20.0


def test_non_terminal_events_leave_error_and_result_alone():
    job = make_job(state=S.RUNNING)
    for i, event_type in enumerate(["token", "progress", "step", "log", "chunk", "queued"], 1):
        apply_event(job, ev(event_type, {"error": "no", "exit_status": 3}, seq=i))
    assert (job.error, job.exit_status, job.result, job.ended) == (None, None, None, None)
    assert job.last_seq == 6


# job ids


def _millis_of(job_id: str) -> int:
    value = 0
    for char in job_id[2:12]:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_new_job_id_format():
    job_id = new_job_id()
    assert re.fullmatch(r"j_[0-9A-HJKMNP-TV-Z]{26}", job_id)
    assert len(job_id) == 28
    assert job_id.startswith("j_")
    assert set(job_id[2:]) <= set(CROCKFORD)


def test_new_job_id_encodes_its_time_in_milliseconds():
    now = time.time()
    assert abs(_millis_of(new_job_id()) - now * 1000) < 5_000
    assert _millis_of(new_job_id(1764012345.678)) == 1764012345678


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**47), st.integers(1, 2**40))
def test_new_job_ids_sort_by_time(millis, later):
    first = new_job_id(millis / 1000)
    second = new_job_id((millis + later) / 1000)
    assert first < second


def test_new_job_ids_are_unique_even_in_the_same_millisecond():
    ids = {new_job_id(1700000000.0) for _ in range(5000)}
    assert len(ids) == 5000
    # the random part really varies: 80 bits in the last 16 characters
    assert len({i[12:] for i in ids}) == 5000


# records


def test_job_record_round_trip_through_json():
    job = make_job(params={"text": "hi", "delay": 0.5, "flag": True},
                   inputs=["https://example.org/a"], state=S.FAILED, created=1.5,
                   updated=2.5, ended=3.5, scheduler_id="42.pbs", last_seq=9,
                   result={"a": [1, 2]}, error="boom", exit_status=3)
    record = job.as_dict()
    assert record["state"] == "failed"
    assert type(record["state"]) is str
    again = Job.from_dict(orjson.loads(orjson.dumps(record)))
    assert again == job
    assert again.state is S.FAILED


def test_as_dict_is_a_copy():
    job = make_job(params={"a": 1})
    record = job.as_dict()
    record["params"]["a"] = 2
    assert job.params == {"a": 1}


def test_from_dict_ignores_unknown_keys_and_defaults_the_state():
    job = Job.from_dict({"id": "j_x", "template": "t", "cluster": "c", "watch_url": "/ws"})
    assert job.state is S.CREATED
    assert job.id == "j_x"
    assert job.params == {}


def test_from_dict_refuses_an_unknown_state():
    with pytest.raises(ValueError):
        Job.from_dict({"id": "j_x", "template": "t", "cluster": "c", "state": "exploded"})


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(list(S)), st.integers(0, 10**6),
       st.one_of(st.none(), st.integers(-255, 255)), st.one_of(st.none(), st.text(max_size=5)))
def test_record_round_trip_property(state, last_seq, exit_status, error):
    job = make_job(state=state, last_seq=last_seq, exit_status=exit_status, error=error)
    assert Job.from_dict(job.as_dict()) == job


# What each event sets, and the state machine as clients receive it


@pytest.mark.parametrize(("event_type", "data", "fields"), [
    ("submitted", "123.pbs", {"scheduler_id": "123.pbs"}),
    ("submitted", {"not": "an id"}, {}),
    ("result", {"answer": 42}, {"result": {"answer": 42}}),
    ("completed", {"answer": 42}, {"result": {"answer": 42}}),
    ("completed", None, {}),
    ("fatal", "out of memory", {"error": "out of memory", "exit_status": None}),
    ("fatal", {"error": "killed", "exit_status": 271}, {"error": "killed", "exit_status": 271}),
    ("cancelled", None, {"error": "cancelled", "exit_status": None}),
    ("token", "text", {}),
    ("step", "Downloading", {}),
])
def test_fields_set_by_each_event(event_type, data, fields):
    assert fields_set_by(event_type, data) == fields


def test_apply_event_sets_exactly_the_fields_set_by_the_event():
    job = Job(id="j_1", template="t", cluster="c", state=S.RUNNING)
    apply_event(job, Event("j_1", 5, "fatal", {"error": "boom", "exit_status": 3}, 9.0))
    assert (job.error, job.exit_status, job.state, job.ended, job.last_seq) == (
        "boom", 3, S.FAILED, 9.0, 5)


def test_the_state_machine_as_data_is_the_one_state_after_uses():
    machine = state_machine()
    assert machine == {
        "states": ["created", "submitting", "queued", "running", "completed", "failed",
                   "cancelled"],
        "terminal_states": ["completed", "failed", "cancelled"],
        "terminal_types": ["cancelled", "completed", "fatal"],
        "state_after_event": {"starting": "submitting", "submitted": "queued",
                              "queued": "queued", "completed": "completed",
                              "fatal": "failed", "cancelled": "cancelled",
                              "stale": "queued", "recovered": "queued",
                              "elements": "queued"},
        "state_otherwise": "running",
        "rank": {"created": 0, "submitting": 1, "queued": 2, "running": 3, "completed": 4,
                 "failed": 4, "cancelled": 4},
    }
    assert orjson.loads(orjson.dumps(machine)) == machine  # what /api/meta sends

    def from_data(state: str, event_type: str) -> str:
        """state_after, computed from the data alone, as a client does."""
        if state in machine["terminal_states"]:
            return state
        target = machine["state_after_event"].get(event_type, machine["state_otherwise"])
        return target if machine["rank"][target] > machine["rank"][state] else state

    for state in S:
        for event_type in [*STATE_AFTER_EVENT, "token", "x.custom"]:
            assert from_data(state.value, event_type) == state_after(state, event_type).value
