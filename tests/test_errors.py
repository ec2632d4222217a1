"""The error tree and its one table: what every family becomes at every edge."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import metis_stream
from metis_stream import errors
from metis_stream.errors import (
    BackendUnavailable,
    BadInput,
    ClientError,
    CommandTimeout,
    ConfigError,
    EventLimitReached,
    EventTooLarge,
    HostKeyRefused,
    InvalidParams,
    JobEnded,
    JobNotFound,
    LogLost,
    MalformedEvent,
    MetisError,
    NotAllowed,
    NotAuthenticated,
    Outcome,
    SchedulerError,
    ShellError,
    TooManyStreams,
    TooManySubmissions,
    UnknownTemplate,
    UnsafeValue,
    outcome_of,
    plain_cause,
)

# The table as DESIGN.md and the docs promise it; a change to errors.py must change this too.
EXPECTED = [
    (BadInput("x"), 400, 4400, 2),
    (MalformedEvent("x"), 400, 4400, 2),
    (errors.InvalidEvent("x"), 422, 4422, 2),
    (EventTooLarge("x"), 413, 4413, 2),
    (InvalidParams({"a": "b"}), 422, 4422, 2),
    (UnknownTemplate("t"), 422, 4422, 2),
    (errors.UnsupportedMediaType("x"), 415, 4415, 2),
    (errors.RequestTimeout("x"), 408, 4408, 2),
    (errors.UnsafeArgument("x"), 400, 4400, 2),
    (errors.UnsafePath("x"), 400, 4400, 2),
    (errors.RangeNotSatisfiable("x", 10), 416, 4416, 2),
    (ConfigError("x"), 400, 4400, 2),
    (errors.TemplateError("x"), 400, 4400, 2),
    (NotAuthenticated("x"), 401, 4401, 1),
    (NotAllowed("x"), 403, 4403, 1),
    (errors.OutsideFolder("x"), 403, 4403, 1),
    (JobNotFound("j"), 404, 4404, 1),
    (errors.NoSuchRoute(), 404, 4404, 1),
    (errors.NotFound("x"), 404, 4404, 1),
    (errors.Gone("x"), 410, 4410, 1),
    (LogLost("x"), 410, 4410, 1),
    (errors.Conflict("x"), 409, 4409, 1),
    (JobEnded("j"), 409, 4409, 1),
    (errors.JobNotSubmitted("j"), 409, 4409, 1),
    (errors.LimitExceeded("x"), 500, 1011, 1),
    (errors.TooLarge("x"), 413, 4413, 1),
    (EventLimitReached("x"), 413, 4413, 1),
    (errors.TooMany("x", 1), 429, 4429, 1),
    (TooManySubmissions(3.2), 429, 4429, 1),
    (TooManyStreams("x", 5), 429, 4429, 1),
    (BackendUnavailable("x"), 503, 1013, 1),
    (SchedulerError("x"), 502, 1011, 1),
    (errors.SubmitOutcomeUnknown("x"), 502, 1011, 1),
    (UnsafeValue("x"), 502, 1011, 1),
    (ShellError("x"), 502, 1011, 1),
    (errors.WebhookFailed("x"), 502, 1011, 1),
    (errors.ConnectionLost("x"), 502, 1011, 1),
    (CommandTimeout("x"), 504, 1011, 1),
    (HostKeyRefused("x"), 502, 1011, 1),
    (errors.AgentAway("x"), 502, 1011, 1),
    (errors.OperationRefused("x"), 502, 1011, 1),
    (errors.LoginNeeded("x"), 503, 1013, 1),
    (errors.LoginRefused("x"), 403, 4403, 1),
    (errors.EmbeddingError("x"), 500, 1011, 1),
    (errors.NotRunning("x"), 500, 1011, 1),
    (ClientError(404, "x"), 500, 1011, 1),
    (MetisError("x"), 500, 1011, 1),
]


@pytest.mark.parametrize(("error", "status", "close_code", "exit_code"), EXPECTED,
                         ids=[type(case[0]).__name__ for case in EXPECTED])
def test_each_error_has_its_outcome(error, status, close_code, exit_code):
    assert outcome_of(error) == Outcome(status, close_code, exit_code)


def test_every_error_class_of_the_module_is_pinned_above():
    classes = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, MetisError)}
    assert classes == {type(case[0]) for case in EXPECTED}


def test_an_unlisted_subclass_takes_its_nearest_ancestors_outcome():
    class SpecialNotFound(JobNotFound):
        pass

    class Both(JobEnded, BadInput):  # the first base wins, as in Python's own lookup
        pass

    assert outcome_of(SpecialNotFound("j")).status == 404
    assert outcome_of(Both("j")).status == 409


def test_every_exception_metis_stream_defines_lives_in_errors_under_one_root():
    """One module, one root: only the SSH shell keeps private control-flow exceptions
    that never leave it, and paramiko's policy hook and auth strategy need their own base
    class; metis-agent runs alone on a cluster, without metis_stream, and its refusals
    travel as replies."""
    private_allowed = {("metis_stream.shells.ssh", "_NotSent"),
                       ("metis_stream.shells.ssh", "_SessionRefused"),
                       ("metis_stream.shells.ssh", "_UnknownHostKey"),
                       ("metis_stream.shells.ssh", "_CodeNeeded"),
                       ("metis_stream.shells.ssh", "_CodeRefused"),
                       ("metis_stream.metis_agent", "Refused"),
                       ("metis_stream.metis_agent", "Failed")}
    found = set()
    for info in pkgutil.walk_packages(metis_stream.__path__, "metis_stream."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == info.name:
                found.add((info.name, name))
    outside = {entry for entry in found if entry[0] != "metis_stream.errors"}
    assert outside == private_allowed
    assert all(issubclass(getattr(errors, name), MetisError)
               for module, name in found if module == "metis_stream.errors")


def test_too_many_says_when_to_retry():
    assert TooManySubmissions(3.2).headers == {"Retry-After": "4"}
    assert TooManyStreams("busy", 0.1).headers == {"Retry-After": "1"}
    assert BackendUnavailable("down").headers == {"Retry-After": "1"}
    assert MetisError("x").headers is None


def test_messages_and_details():
    params = InvalidParams({"text": "too long", "delay": "not a number"})
    assert params.message == "text: too long; delay: not a number"
    assert params.details == {"problems": {"text": "too long", "delay": "not a number"}}
    assert JobNotFound("j_1").message == "unknown job"
    assert BackendUnavailable("Redis is down").message == (
        "backend unavailable, retry: Redis is down")
    assert MetisError().message == "MetisError"


# The plain causes: what a job's watchers are told


def raised_from(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(("error", "cause"), [
    (ShellError("cannot connect to bob@10.0.0.1:22"), "the server could not connect to the "
                                                      "cluster"),
    (HostKeyRefused("host key of login (SHA256:abc) is not in /etc/kh"),
     "the cluster's host key is not trusted"),
    (CommandTimeout("qsub on bob@login:22"), "the cluster did not answer in time"),
    (TimeoutError(), "the cluster did not answer in time"),
    (SchedulerError("qsub: Unknown queue"), "the scheduler did not take the job"),
    (UnsafeValue("queue 'a b' is not allowed"),
     "a value of the job cannot be passed to the scheduler safely"),
    (errors.UnsafeArgument("NUL"), "a value of the job cannot be passed to the cluster safely"),
    # A scheduler's error raised from the shell's is the shell's fault: the innermost wins.
    (raised_from(SchedulerError("could not stage the job on hpc: ..."),
                 raised_from(HostKeyRefused("host key ..."), OSError("not named"))),
     "the cluster's host key is not trusted"),
    (raised_from(errors.SubmitOutcomeUnknown("connection lost while submitting"),
                 errors.ConnectionLost("bob@login:22")), "the connection to the cluster broke"),
    (raised_from(SchedulerError("cannot read /srv/job.sh"), OSError("ENOENT")),
     "the scheduler did not take the job"),
    (KeyError("a bug"), "an unexpected error"),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_plain_cause_by_family_of_the_innermost_cause(error, cause):
    assert plain_cause(error) == cause


def test_plain_cause_survives_a_cycle_of_causes():
    first, second = ShellError("a"), SchedulerError("b")
    raised_from(first, second)
    raised_from(second, first)
    assert plain_cause(first) == "the scheduler did not take the job"
