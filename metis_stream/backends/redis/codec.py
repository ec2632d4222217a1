"""The Redis backend's codec: a job to and from its hash, an event's wire JSON in two
halves around the seq (which only the Lua script knows), and the job fields an event
sets as HSET pairs.

Pure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from metis_stream.events import NewEvent, tags
from metis_stream.jobs import Job, fields_set_by

_TEXT_FIELDS = frozenset({"id", "template", "cluster", "state", "owner"})
"""Job fields stored as plain text; every other field is stored as JSON."""


def to_json(value: Any) -> str:
    return orjson.dumps(value).decode()


def job_to_hash(job: Job) -> dict[str, str]:
    return {name: value if name in _TEXT_FIELDS else to_json(value)
            for name, value in job.as_dict().items()}


def job_from_hash(raw: dict[bytes, bytes]) -> Job:
    names = {field.name for field in dataclasses.fields(Job)}
    record: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode()
        if name in _TEXT_FIELDS:
            record[name] = value.decode()
        elif name in names:
            record[name] = orjson.loads(value)
    return Job.from_dict(record)


def wire_head(job_id: str) -> str:
    """The wire JSON up to the seq, which only the Lua script knows: ``{"job":"..","seq":``."""
    return to_json({"job": job_id})[:-1] + ',"seq":'


def wire_tail(new: NewEvent, now: float) -> str:
    """The wire JSON after the seq; head + seq + tail is exactly what ``encode_event`` gives."""
    fields = {"type": new.type, "data": new.data, "time": now}
    return "," + to_json({**fields, **tags(new.via, new.element)})[1:]


def job_patch(new: NewEvent) -> list[str]:
    """The job fields this event sets (jobs.py says which), as HSET pairs."""
    return [item for name, value in fields_set_by(new.type, new.data).items()
            for item in (name, to_json(value))]
