"""metis_stream.clusters: a cluster's health from each poll's outcome (pure)."""

from __future__ import annotations

import pytest

from metis_stream.clusters import (
    ClusterHealth,
    after_poll,
    recovered,
    state_of_failure,
    went_stale,
)
from metis_stream.errors import ConnectionLost, LoginNeeded, SchedulerError, ShellError

OK = ClusterHealth("metis", "ok", 100.0)


def scheduler_error_from(cause: BaseException) -> SchedulerError:
    try:
        raise SchedulerError("squeue on metis: it failed") from cause
    except SchedulerError as exc:
        return exc


@pytest.mark.parametrize(("error", "state"), [
    (ConnectionLost("connection lost: EOF"), "unreachable"),
    (scheduler_error_from(ShellError("cannot connect to metis:22")), "unreachable"),
    (SchedulerError("squeue: slurm_load_jobs error: Unable to contact slurm controller"),
     "degraded"),
    (scheduler_error_from(ValueError("bad output")), "degraded"),
    (LoginNeeded("metis asks for a second factor"), "login_needed"),
    (scheduler_error_from(LoginNeeded("metis asks for a second factor")), "login_needed"),
])
def test_a_failure_is_unreachable_when_the_connection_failed_else_degraded(error, state):
    assert state_of_failure(error) == state


def test_a_lost_login_makes_news_stale_and_a_new_one_fresh_again():
    waiting = after_poll(OK, scheduler_error_from(LoginNeeded("run metis-stream login")),
                         now=200.0)
    assert (waiting.state, waiting.since) == ("login_needed", 200.0)
    assert "run metis-stream login" in waiting.last_error
    assert went_stale(OK, waiting)
    back = after_poll(waiting, None, now=260.0)
    assert recovered(waiting, back) and back.state == "ok" and back.last_error == ""


def test_a_failed_poll_changes_the_state_and_says_since_when_and_why():
    after = after_poll(OK, SchedulerError("slurmctld is down"), now=200.0)
    assert after == ClusterHealth("metis", "degraded", 200.0,
                                  "SchedulerError: slurmctld is down", checked=200.0)
    assert went_stale(OK, after) and not recovered(OK, after)


def test_the_same_state_again_keeps_its_since_and_takes_the_newer_error():
    first = after_poll(OK, ConnectionLost("a"), now=200.0)
    again = after_poll(first, ConnectionLost("b"), now=260.0)
    assert (again.state, again.since, again.last_error, again.checked) == (
        "unreachable", 200.0, "ConnectionLost: b", 260.0)
    assert not went_stale(first, again)


def test_degraded_then_unreachable_is_one_outage():
    degraded = after_poll(OK, SchedulerError("x"), now=200.0)
    unreachable = after_poll(degraded, ConnectionLost("y"), now=210.0)
    assert unreachable.state == "unreachable" and unreachable.since == 210.0
    assert not went_stale(degraded, unreachable) and not recovered(degraded, unreachable)


def test_a_poll_that_works_again_recovers():
    down = after_poll(OK, ConnectionLost("y"), now=200.0)
    up = after_poll(down, None, now=300.0)
    assert up == ClusterHealth("metis", "ok", 300.0, checked=300.0)
    assert recovered(down, up)
    assert after_poll(up, None, now=400.0) == ClusterHealth("metis", "ok", 300.0,
                                                            checked=400.0)


def test_health_survives_json_and_refuses_an_unknown_state():
    health = ClusterHealth("metis", "degraded", 1.5, "SchedulerError: x", checked=2.5,
                           flavour="torque", version="6.1.3")
    assert ClusterHealth.from_json(health.as_json()) == health
    kept_before_flavours = {k: v for k, v in health.as_json().items()
                            if k not in ("flavour", "version")}
    assert ClusterHealth.from_json(kept_before_flavours) == ClusterHealth(
        "metis", "degraded", 1.5, "SchedulerError: x", checked=2.5)
    with pytest.raises(ValueError, match="unknown cluster state"):
        ClusterHealth.from_json({**health.as_json(), "state": "on fire"})


def test_the_flavour_outlives_changes_of_state():
    known = ClusterHealth("metis", "ok", 1.0, checked=1.0, flavour="slurm", version="22.05.8")
    down = after_poll(known, ConnectionLost("y"), now=2.0)
    assert (down.state, down.flavour, down.version) == ("unreachable", "slurm", "22.05.8")
    assert after_poll(down, None, now=3.0).flavour == "slurm"


def test_the_last_error_names_each_cause_once():
    error = scheduler_error_from(SchedulerError("Problem loading jobs."))
    assert after_poll(OK, error, now=1.0).last_error == (
        "SchedulerError: squeue on metis: it failed; caused by SchedulerError: Problem "
        "loading jobs.")
    quoted = scheduler_error_from(ShellError("connection refused"))
    quoted.args = ("squeue on metis: connection refused",)
    assert after_poll(OK, quoted, now=1.0).last_error == (
        "SchedulerError: squeue on metis: connection refused")
