"""Jobs: the record kept for each job and the state machine that events drive.

Pure code. A job moves forward only: created -> submitting -> queued ->
running -> one of completed, failed, cancelled. A terminal state is final.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from metis_stream.events import TERMINAL_TYPES, Event, JsonValue


class JobState(StrEnum):
    CREATED = "created"
    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def rank(self) -> int:
        return _RANK[self]


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
ACTIVE_STATES = frozenset(JobState) - TERMINAL_STATES

_RANK = {
    JobState.CREATED: 0,
    JobState.SUBMITTING: 1,
    JobState.QUEUED: 2,
    JobState.RUNNING: 3,
    JobState.COMPLETED: 4,
    JobState.FAILED: 4,
    JobState.CANCELLED: 4,
}

STATE_AFTER_EVENT: Mapping[str, JobState] = {
    "starting": JobState.SUBMITTING,
    "submitted": JobState.QUEUED,
    "queued": JobState.QUEUED,
    "completed": JobState.COMPLETED,
    "fatal": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
    # The cluster's news about the job went stale, or fresh again: nothing about the
    # job's own progress. Forward-only rules never take a running job back to queued.
    "stale": JobState.QUEUED,
    "recovered": JobState.QUEUED,
    # An array's tally (docs/arrays.md): its elements run, or not, by their own events.
    "elements": JobState.QUEUED,
}
"""The state each event type leads to; any other type leads to ``STATE_OTHERWISE``."""
STATE_OTHERWISE = JobState.RUNNING


def state_after(state: JobState, event_type: str) -> JobState:
    """The state a job is in after an event of ``event_type``: forward only, terminal final."""
    if state.terminal:
        return state
    target = STATE_AFTER_EVENT.get(event_type, STATE_OTHERWISE)
    return target if target.rank > state.rank else state


TALLY_KEYS = ("queued", "running", "done", "failed")
"""The counts of an array's ``elements`` event, kept as ``Job.elements``."""

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_job_id(now: float | None = None) -> str:
    """A ULID-like id: sortable by creation time, with 80 random bits (unguessable)."""
    # round, not int: a time given as seconds (a float) must keep its millisecond.
    millis = round((time.time() if now is None else now) * 1000)
    value = (millis << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "j_" + "".join(reversed(chars))


@dataclass(slots=True)
class Job:
    """One job in the job database."""

    id: str
    template: str
    cluster: str
    params: dict[str, JsonValue] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    owner: str = ""
    """The name of the API key that created the job (metis_stream.keys); empty for a job
    created without a key, or before keys had names: only admin keys see those."""
    user: str | None = None
    """The end user the web app created the job for: its own opaque id, which the server
    keeps, filters on and gives the scheduler, and never interprets."""
    state: JobState = JobState.CREATED
    created: float = 0.0
    updated: float = 0.0
    ended: float | None = None
    scheduler_id: str | None = None
    last_seq: int = 0
    result: JsonValue = None
    error: str | None = None
    error_detail: str | None = None
    """The full story of a failed submission (the SSH user, host, paths, the scheduler's
    own words), for API key holders only: never in an event, which watchers read."""
    exit_status: int | None = None
    array: str | None = None
    """An array's indices, ``FIRST-LAST[:STEP]`` (docs/arrays.md); None: not an array."""
    elements: dict[str, int] | None = None
    """An array's tally, from its last ``elements`` event: how many elements are
    queued, running, done and failed."""

    def as_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["state"] = self.state.value
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Job:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in names}
        values["state"] = JobState(values.get("state", JobState.CREATED))
        return cls(**values)


def fields_set_by(event_type: str, data: JsonValue) -> dict[str, JsonValue]:
    """The job fields that an event sets, besides the ones every event moves (``state``,
    ``last_seq``, ``updated``, ``ended``): the one definition both backends use, the
    memory one on a Job and the Redis one as HSET pairs inside its append script."""
    if event_type == "submitted" and isinstance(data, str):
        return {"scheduler_id": data}
    if event_type == "elements" and isinstance(data, Mapping):
        return {"elements": {key: data[key] for key in TALLY_KEYS if key in data}}
    if event_type == "result" or (event_type == "completed" and data is not None):
        return {"result": data}
    if event_type in ("fatal", "cancelled"):
        error, exit_status = _error_of(event_type, data)
        return {"error": error, "exit_status": exit_status}
    return {}


def apply_event(job: Job, event: Event) -> None:
    """Update ``job`` in place for an event just appended to its log."""
    job.last_seq = event.seq
    job.updated = event.time
    job.state = state_after(job.state, event.type)
    for name, value in fields_set_by(event.type, event.data).items():
        setattr(job, name, value)
    if job.state.terminal and job.ended is None:
        job.ended = event.time


def state_machine() -> dict[str, JsonValue]:
    """The state machine as data, for clients that must not keep a copy of it (the viewer,
    the Python client): ``GET /api/meta`` serves it."""
    return {
        "states": [state.value for state in JobState],
        "terminal_states": [state.value for state in JobState if state.terminal],
        "terminal_types": sorted(TERMINAL_TYPES),
        "state_after_event": {name: state.value for name, state in STATE_AFTER_EVENT.items()},
        "state_otherwise": STATE_OTHERWISE.value,
        "rank": {state.value: state.rank for state in JobState},
    }


def _error_of(event_type: str, data: JsonValue) -> tuple[str, int | None]:
    if isinstance(data, str):
        return data, None
    if isinstance(data, Mapping):
        status = data.get("exit_status")
        message = data.get("error") or data.get("message") or event_type
        return str(message), status if isinstance(status, int) else None
    return event_type, None

