"""Events: the one shape that travels from a batch job to every watcher.

Pure code: parsing and validating what a job posts, and encoding what watchers
receive. The server assigns ``seq`` and ``time``; a job only says ``type``,
``data`` and, optionally, an idempotency ``id``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from metis_stream.errors import EventTooLarge, InvalidEvent, MalformedEvent

JsonValue = Any
"""Any value that JSON can carry (``orjson`` decides what encodes)."""

TYPE_PATTERN = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

TERMINAL_TYPES = frozenset({"completed", "fatal", "cancelled"})
SERVER_ONLY_TYPES = frozenset({"starting", "submitted", "cancelled", "stale", "recovered"})
"""Types that only the server appends: a job cannot claim it was submitted or cancelled, or
speak for its cluster's health."""

MAX_EVENT_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024

OUTPUT_STREAMS = ("stdout", "stderr")
"""The streams of a job's output in the launcher's ``log`` events; its one ``notice`` (the
output budget is spent) comes in a stream of its own (docs/launcher.md)."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a job (or the server) asks to append it, before it has a seq."""

    type: str
    data: JsonValue = None
    id: str | None = None
    via: str | None = None
    """How a job's event reached the server when not over HTTP: ``spool``."""

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES


@dataclass(frozen=True, slots=True)
class Event:
    """An event in a job's log: what watchers receive."""

    job: str
    seq: int
    type: str
    data: JsonValue
    time: float
    via: str | None = None
    """``spool`` for an event read from the job's spool (docs/spool.md); absent on the
    wire otherwise."""
    wire: str = field(default="", compare=False, repr=False)
    """The JSON text of the event, encoded once and shared by every watcher."""

    def __post_init__(self) -> None:
        if not self.wire:
            object.__setattr__(self, "wire", encode_event(self))

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    @property
    def size(self) -> int:
        """The wire JSON's length in UTF-8 bytes: what the event costs to keep and to send."""
        return len(self.wire) if self.wire.isascii() else len(self.wire.encode())

    def as_dict(self) -> dict[str, JsonValue]:
        fields = {"job": self.job, "seq": self.seq, "type": self.type,
                  "data": self.data, "time": self.time}
        return fields if self.via is None else {**fields, "via": self.via}


@dataclass(frozen=True, slots=True)
class LogLines:
    """The data of a ``log`` event that the launcher sent: lines of one stream."""

    stream: str
    lines: tuple[str, ...]


def log_lines(data: JsonValue) -> LogLines | None:
    """The launcher's lines in a ``log`` event's data, or None for data of another shape
    (a script's own ``metis-emit log TEXT`` sends a string)."""
    if not isinstance(data, dict):
        return None
    stream, lines = data.get("stream"), data.get("lines")
    if not isinstance(stream, str) or not isinstance(lines, list):
        return None
    if not all(isinstance(line, str) for line in lines):
        return None
    return LogLines(stream, tuple(lines))


def encode_event(event: Event) -> str:
    return orjson.dumps(event.as_dict()).decode()


def decode_event(text: str | bytes) -> Event:
    """Decode an event that the server itself encoded (from the log or pub/sub)."""
    raw = orjson.loads(text)
    wire = text if isinstance(text, str) else text.decode()
    return Event(job=raw["job"], seq=raw["seq"], type=raw["type"], data=raw["data"],
                 time=raw["time"], via=raw.get("via"), wire=wire)


def validate_type(event_type: object) -> str:
    if not isinstance(event_type, str) or not TYPE_PATTERN.match(event_type):
        raise InvalidEvent(
            "'type' must be a string matching [a-z][a-z0-9_.-]{0,63}, "
            f"got {event_type!r:.80}"
        )
    return event_type


def parse_new_event(raw: object, *, from_job: bool = True) -> NewEvent:
    """Validate one decoded JSON object as an event to append."""
    if not isinstance(raw, dict):
        raise InvalidEvent("an event must be a JSON object")
    unknown = set(raw) - {"type", "data", "id"}
    if unknown:
        raise InvalidEvent(f"unknown field(s) in event: {', '.join(sorted(unknown))}")
    if "type" not in raw:
        raise InvalidEvent("an event needs a 'type'")
    event_type = validate_type(raw["type"])
    if from_job and event_type in SERVER_ONLY_TYPES:
        raise InvalidEvent(f"only the server may append '{event_type}' events")
    key = raw.get("id")
    if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY_PATTERN.match(key)):
        raise InvalidEvent("'id' must be a string matching [A-Za-z0-9_.:-]{1,128}")
    return NewEvent(type=event_type, data=raw.get("data"), id=key)


def parse_event_json(body: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> NewEvent:
    """Parse one event from the JSON text of a request body or an NDJSON line."""
    if len(body) > max_bytes:
        raise EventTooLarge(f"an event may be at most {max_bytes} bytes, got {len(body)}")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"not valid JSON: {exc}") from None
    return parse_new_event(raw)
