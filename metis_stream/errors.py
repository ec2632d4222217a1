"""Every error metis-stream raises on purpose, and what each one means to a caller.

Pure code. One root, families a reader can name, and one table that says what
each family becomes at every edge: an HTTP status, a websocket close code, a
CLI exit code. The table is looked up along the exception's class hierarchy
(as Starlette looks up its exception handlers), so a new error only has to
pick the right parent to be translated everywhere.

::

    MetisError
    ├── BadInput                      400   the caller sent something unusable
    │   ├── InvalidEvent              422
    │   │   ├── MalformedEvent        400   not even JSON
    │   │   └── EventTooLarge         413
    │   ├── InvalidParams             422   (UnknownTemplate)
    │   ├── UnsupportedMediaType      415
    │   ├── RequestTimeout            408
    │   ├── UnsafeArgument                  a value that cannot travel to a shell or scheduler
    │   ├── UnsafePath                      a file path a job's folder cannot hold
    │   ├── RangeNotSatisfiable       416   a byte range past a file's end
    │   └── ConfigError                     the operator's configuration (TemplateError)
    ├── NotAuthenticated              401
    ├── NotAllowed                    403   (OutsideFolder, LoginRefused: a refused login code)
    ├── NotFound                      404   (JobNotFound, NoSuchRoute)
    ├── Gone                          410   (LogLost)
    ├── Conflict                      409   (JobEnded, JobNotSubmitted)
    ├── LimitExceeded
    │   ├── TooLarge                  413   (EventLimitReached)
    │   └── TooMany                   429   (TooManySubmissions, TooManyStreams)
    ├── BackendUnavailable            503   the store cannot be reached: retry
    ├── SchedulerError                502   the batch system failed (SubmitOutcomeUnknown)
    ├── ShellError                    502   commands could not run (CommandTimeout 504,
    │   │                                   HostKeyRefused, AgentAway, OperationRefused)
    │   └── LoginNeeded               503   the cluster waits for an operator's second factor
    ├── WebhookFailed                 502   a webhook's receiver did not take a delivery
    ├── EmbeddingError                500   the program that embeds metis-stream set it up
    │                                       wrong: a public_url outside the app's mount path,
    │                                       or its service not started (NotRunning)
    └── ClientError                         a client's view of a refused or unreachable server

Anything else that escapes is a bug: a 500, a 1011 close, exit 1, and a traceback in
the server log.

A second table names the cause of a failure in plain words for those who must not
read its message (a job's watchers): :func:`plain_cause`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "OUTCOMES",
    "AgentAway",
    "BackendUnavailable",
    "BadInput",
    "ClientError",
    "CommandTimeout",
    "ConfigError",
    "Conflict",
    "ConnectionLost",
    "EmbeddingError",
    "EventLimitReached",
    "EventTooLarge",
    "Gone",
    "HostKeyRefused",
    "InvalidEvent",
    "InvalidParams",
    "JobEnded",
    "JobNotFound",
    "JobNotSubmitted",
    "LimitExceeded",
    "LogLost",
    "LoginNeeded",
    "LoginRefused",
    "MalformedEvent",
    "MetisError",
    "NoSuchRoute",
    "NotAllowed",
    "NotAuthenticated",
    "NotFound",
    "NotRunning",
    "OperationRefused",
    "Outcome",
    "OutsideFolder",
    "RangeNotSatisfiable",
    "RequestTimeout",
    "SchedulerError",
    "ShellError",
    "SubmitOutcomeUnknown",
    "TemplateError",
    "TooLarge",
    "TooMany",
    "TooManyStreams",
    "TooManySubmissions",
    "UnknownTemplate",
    "UnsafeArgument",
    "UnsafePath",
    "UnsafeValue",
    "UnsupportedMediaType",
    "WebhookFailed",
    "outcome_of",
    "plain_cause",
]


class MetisError(Exception):
    """The root. ``details`` are extra JSON fields of the error response."""

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.details = details

    @property
    def message(self) -> str:
        return str(self) or type(self).__name__

    @property
    def headers(self) -> dict[str, str] | None:
        """HTTP headers that the response for this error carries."""
        return None


# Bad input


class BadInput(MetisError):
    """The request (or the configuration, or an argument) cannot be used as given."""


class InvalidEvent(BadInput):
    """A posted event is malformed; the message says why, for the client."""


class MalformedEvent(InvalidEvent):
    """A posted event is not even JSON (a well-formed but invalid event is 422)."""


class EventTooLarge(InvalidEvent):
    """An event or a request is over its size limit."""


class InvalidParams(BadInput):
    """Client input that a template refuses; ``problems`` maps each field to what is wrong."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in problems.items()),
                         problems=dict(problems))

    @property
    def problems(self) -> dict[str, str]:
        problems: dict[str, str] = self.details["problems"]
        return problems


class UnknownTemplate(InvalidParams):
    def __init__(self, name: str) -> None:
        super().__init__({"template": f"no template named {name[:64]!r}"})


class UnsupportedMediaType(BadInput):
    pass


class RequestTimeout(BadInput):
    """The client sent too little in time; over HTTP, the connection is closed after the
    answer (the rest of a stalled request cannot be told from the next one)."""

    @property
    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class UnsafeArgument(BadInput):
    """A value that cannot travel safely to a remote shell or a scheduler's command line
    (a NUL byte, a character the scheduler would misread)."""


class UnsafePath(BadInput):
    """A file path that must stay inside a job's folder and might not: ``..``, an absolute
    path, a control character."""


class RangeNotSatisfiable(BadInput):
    """A ``Range`` that asks for no byte of the file; ``size`` is the file's."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class ConfigError(BadInput):
    """The configuration cannot be used; the message says where and why."""


class TemplateError(ConfigError):
    """A template in the configuration is malformed (an operator's mistake)."""


# Who may do what


class NotAuthenticated(MetisError):
    """No credentials, or wrong ones."""


class NotAllowed(MetisError):
    """The credentials are fine, the action is not allowed (or the Origin, or the Host)."""


class OutsideFolder(NotAllowed):
    """A path that leads out of the folder it must stay in (a symbolic link)."""


class LoginRefused(NotAllowed):
    """The cluster's login node refused the second factor that an operator gave
    (``metis-stream login``): a wrong code, or one already used. Nothing changed."""


# Things that are not there, or no longer


class NotFound(MetisError):
    pass


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__("unknown job")
        self.job_id = job_id


class NoSuchRoute(NotFound):
    def __init__(self) -> None:
        super().__init__("no such route")


class Gone(MetisError):
    pass


class LogLost(Gone):
    """The events a watcher asked for are no longer in the log (the store was wiped)."""


# Conflicts with the job's state


class Conflict(MetisError):
    pass


class JobEnded(Conflict):
    """The job has a terminal event: it takes no more."""

    def __init__(self, job_id: str) -> None:
        super().__init__("the job has already ended")
        self.job_id = job_id


class JobNotSubmitted(Conflict):
    """A job posted an event before the server recorded its submission."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} is still being submitted")
        self.job_id = job_id


# Limits


class LimitExceeded(MetisError):
    pass


class TooLarge(LimitExceeded):
    pass


class EventLimitReached(TooLarge):
    """The job's log is full; only a terminal event is still taken."""


class TooMany(LimitExceeded):
    """Too many at once or too fast; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float, **details: Any) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class TooManySubmissions(TooMany):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many submissions: retry in {retry_after:.0f}s", retry_after)


class TooManyStreams(TooMany):
    """Too many held open at once: websockets and Server-Sent Events streams (per job or per
    process), or history reads (per client)."""


# Services the server depends on


class BackendUnavailable(MetisError):
    """The store cannot be reached; the caller may retry."""

    @property
    def message(self) -> str:
        return f"backend unavailable, retry: {self}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class SchedulerError(MetisError):
    """A scheduler command failed; the message is the scheduler's own words."""


class SubmitOutcomeUnknown(SchedulerError):
    """The connection broke while submitting: the job may or may not exist."""


class UnsafeValue(SchedulerError):
    """A value that a scheduler's command line cannot carry safely."""


class ShellError(MetisError):
    """The shell could not run a command (connection lost, timeout, refused host key)."""


class HostKeyRefused(ShellError):
    """The SSH server's host key is not in known_hosts, or differs from it: the connection
    was refused before logging in."""


class CommandTimeout(ShellError):
    """A command ran past its timeout; its outcome is unknown."""


class ConnectionLost(ShellError):
    """The connection broke after a command was sent and before it reported its exit
    status: the command may or may not have run (a ``qsub`` may have queued a job)."""


class AgentAway(ShellError):
    """The cluster's agent (``link = "agent"``) is not connected: the operation waited for
    it as long as it may, and was taken back; nothing ran."""


class OperationRefused(ShellError):
    """The cluster's agent refused an operation: a command outside its allowlist, a path
    outside its work folder (docs/agent.md). Nothing ran."""


class LoginNeeded(ShellError):
    """The cluster's login node asks for a second factor after the key, and the server has
    no live connection: an operator must log in (``metis-stream login CLUSTER``,
    docs/login.md). Nothing was sent to the cluster."""


class WebhookFailed(MetisError):
    """A webhook's receiver could not be reached, did not answer in time, or answered
    other than 2xx; the message says which."""


# The client side


# The embedder's mistakes


class EmbeddingError(MetisError):
    """The program that embeds metis-stream (docs/embedding.md) has set it up wrong.
    Retrying does not help (so not 503); the message says what to change."""


class NotRunning(EmbeddingError):
    """The job service is not running: it was never started, or has stopped."""


class ClientError(MetisError):
    """The server refused a request (``status`` is its HTTP status), or could not be
    reached (``status`` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# The one table


@dataclass(frozen=True, slots=True)
class Outcome:
    """What an error becomes at each edge of the system."""

    status: int
    """The HTTP status."""
    close_code: int
    """The websocket close code: 4000 + the HTTP status for a client's error; the
    standard codes where one fits (1013 try again later, 1011 server error)."""
    exit_code: int
    """The CLI's exit code: 2 for a usage or configuration error, else 1."""


EXIT_FAILED = 1
EXIT_USAGE = 2
WS_TRY_AGAIN = 1013
WS_SERVER_ERROR = 1011


def _client_fault(status: int, exit_code: int = EXIT_FAILED) -> Outcome:
    return Outcome(status, 4000 + status, exit_code)


OUTCOMES: Mapping[type[MetisError], Outcome] = {
    MetisError: Outcome(500, WS_SERVER_ERROR, EXIT_FAILED),
    BadInput: _client_fault(400, EXIT_USAGE),
    InvalidEvent: _client_fault(422, EXIT_USAGE),
    MalformedEvent: _client_fault(400, EXIT_USAGE),
    EventTooLarge: _client_fault(413, EXIT_USAGE),
    InvalidParams: _client_fault(422, EXIT_USAGE),
    UnsupportedMediaType: _client_fault(415, EXIT_USAGE),
    RequestTimeout: _client_fault(408, EXIT_USAGE),
    RangeNotSatisfiable: _client_fault(416, EXIT_USAGE),
    NotAuthenticated: _client_fault(401),
    NotAllowed: _client_fault(403),
    NotFound: _client_fault(404),
    Gone: _client_fault(410),
    Conflict: _client_fault(409),
    TooLarge: _client_fault(413),
    TooMany: _client_fault(429),
    BackendUnavailable: Outcome(503, WS_TRY_AGAIN, EXIT_FAILED),
    SchedulerError: Outcome(502, WS_SERVER_ERROR, EXIT_FAILED),
    ShellError: Outcome(502, WS_SERVER_ERROR, EXIT_FAILED),
    WebhookFailed: Outcome(502, WS_SERVER_ERROR, EXIT_FAILED),
    CommandTimeout: Outcome(504, WS_SERVER_ERROR, EXIT_FAILED),
    LoginNeeded: Outcome(503, WS_TRY_AGAIN, EXIT_FAILED),
}
"""Each family's outcome; a class without an entry takes its nearest ancestor's."""


def outcome_of(error: MetisError) -> Outcome:
    """The outcome of the nearest class in ``error``'s hierarchy that the table names."""
    return _nearest(OUTCOMES, error) or OUTCOMES[MetisError]


# The plain causes

_PLAIN_CAUSES: Mapping[type[BaseException], str] = {
    ShellError: "the server could not connect to the cluster",
    HostKeyRefused: "the cluster's host key is not trusted",
    ConnectionLost: "the connection to the cluster broke",
    AgentAway: "the cluster's agent is not connected",
    OperationRefused: "the cluster's agent refused an operation",
    CommandTimeout: "the cluster did not answer in time",
    LoginNeeded: "the cluster waits for an operator to log in",
    TimeoutError: "the cluster did not answer in time",
    SchedulerError: "the scheduler did not take the job",
    UnsafeValue: "a value of the job cannot be passed to the scheduler safely",
    UnsafeArgument: "a value of the job cannot be passed to the cluster safely",
}
"""What each family is called where its message must not go: messages name SSH users,
hosts, ports, key and known_hosts paths and host key fingerprints, and a job's events are
read by anyone with its watch token."""


def plain_cause(error: BaseException) -> str:
    """``error``'s cause in plain words: the entry of the innermost exception in its
    ``__cause__`` chain that the table names (a SchedulerError raised from a refused host
    key is the host key's fault), looked up along that exception's class hierarchy."""
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__
    for link in reversed(chain):
        cause = _nearest(_PLAIN_CAUSES, link)
        if cause is not None:
            return cause
    return "an unexpected error"


def _nearest(table: Mapping[Any, T], error: BaseException) -> T | None:
    """The entry of the nearest class in ``error``'s hierarchy that ``table`` names."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return None
