"""Events: the one shape that travels from a batch job to every watcher.

Pure code: parsing and validating what a job posts, and encoding what watchers
receive. The server assigns ``seq`` and ``time``; a job only says ``type``,
``data`` and, optionally, an idempotency ``id``.
"""

from __future__ import annotations

import base64
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
SERVER_ONLY_TYPES = frozenset({"starting", "submitted", "cancelled", "stale", "recovered",
                               "elements"})
"""Types that only the server appends: a job cannot claim it was submitted or cancelled, or
speak for its cluster's health."""

MAX_EVENT_BYTES = 64 * 1024
MAX_REQUEST_BYTES = 1024 * 1024

CHUNK_OVERHEAD = 640
"""The most that a ``chunk`` event's JSON holds besides its base64 (type, id, stream, index,
media type at their longest): the room to leave in an event for it."""

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
    element: int | None = None
    """The index of the array element that sent it (:func:`element_event`)."""

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
    element: int | None = None
    """The index of the array element that sent it (docs/arrays.md); absent on the wire
    for an event of the array itself, or of a job that is not an array."""
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
        return {**fields, **tags(self.via, self.element)}


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


STREAM_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
_MEDIA_NAME = r"[A-Za-z0-9!#$&^_.+-]+"
MEDIA_TYPE_PATTERN = re.compile(
    rf"{_MEDIA_NAME}/{_MEDIA_NAME}(?: *; *{_MEDIA_NAME}={_MEDIA_NAME})*\Z")
MAX_MEDIA_TYPE_LENGTH = 255
BASE64_PATTERN = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
CHUNK_FIELDS = frozenset({"stream", "index", "media_type", "base64"})


@dataclass(frozen=True, slots=True)
class Chunk:
    """The data of a ``chunk`` event: one piece of a job's binary output (docs/media.md).

    The server checks its shape and never decodes it; clients reassemble a ``stream``'s
    chunks by ``index`` (0, 1, 2, ... in the order the job sent them)."""

    stream: str
    index: int
    media_type: str
    """What the stream holds, with its parameters: ``audio/pcm;rate=16000;channels=1``."""
    base64: str

    @property
    def size(self) -> int:
        """The media's length in bytes, from the base64's length alone."""
        return len(self.base64) // 4 * 3 - self.base64[-2:].count("=")

    @property
    def essence(self) -> str:
        """The media type without its parameters, in lower case: ``audio/pcm``."""
        return self.media_type.split(";", 1)[0].strip().lower()

    @property
    def params(self) -> dict[str, str]:
        """The media type's parameters, names in lower case: ``{"rate": "16000"}``."""
        pairs = (part.split("=", 1) for part in self.media_type.split(";")[1:])
        return {name.strip().lower(): value.strip() for name, value in pairs}

    def payload(self) -> bytes:
        """The media's bytes (for clients: the server keeps the base64 as it came)."""
        return base64.b64decode(self.base64)


def parse_chunk(data: JsonValue) -> Chunk:
    """Check the data of a ``chunk`` event; InvalidEvent (422) says what is wrong."""
    if not isinstance(data, dict):
        raise InvalidEvent("a chunk's data must be an object with stream, index, media_type "
                           "and base64 (docs/media.md)")
    missing, unknown = CHUNK_FIELDS - set(data), set(data) - CHUNK_FIELDS
    if missing or unknown:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unknown {', '.join(sorted(unknown))}"] if unknown else [])
        raise InvalidEvent(f"chunk data: {'; '.join(parts)} (the fields are stream, index, "
                           "media_type and base64)")
    stream, index, media_type, encoded = (data["stream"], data["index"], data["media_type"],
                                          data["base64"])
    if not isinstance(stream, str) or not STREAM_NAME_PATTERN.match(stream):
        raise InvalidEvent("a chunk's 'stream' must be a string matching "
                           f"[a-z0-9][a-z0-9_.-]{{0,63}}, got {stream!r:.80}")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**53:
        raise InvalidEvent(f"a chunk's 'index' must be a whole number from 0, got {index!r:.80}")
    if (not isinstance(media_type, str) or len(media_type) > MAX_MEDIA_TYPE_LENGTH
            or not MEDIA_TYPE_PATTERN.match(media_type)):
        raise InvalidEvent("a chunk's 'media_type' must be a media type such as audio/wav or "
                           f"audio/pcm;rate=16000;channels=1, got {media_type!r:.80}")
    if not isinstance(encoded, str) or not BASE64_PATTERN.match(encoded):
        raise InvalidEvent("a chunk's 'base64' must be standard base64 (A-Z a-z 0-9 + /, "
                           "padded with =, no line breaks)")
    return Chunk(stream, index, media_type, encoded)


def chunk_capacity(max_event_bytes: int) -> int:
    """The most media bytes that one chunk event of ``max_event_bytes`` can carry."""
    return max(0, (max_event_bytes - CHUNK_OVERHEAD) // 4 * 3)


def event_too_large(max_bytes: int, size: int | None = None) -> EventTooLarge:
    got = f", got {size}" if size is not None else ""
    return EventTooLarge(f"an event may be at most {max_bytes} bytes{got} (a chunk may carry "
                         f"{chunk_capacity(max_bytes)} bytes of media: send smaller chunks)")


ELEMENT_END_PREFIX = "element."
"""An element's ``completed`` or ``fatal`` is kept as ``element.completed`` or
``element.fatal``: one element's end is not the array's (docs/arrays.md)."""


def tags(via: str | None, element: int | None) -> dict[str, JsonValue]:
    """The optional fields of an event's wire JSON, after ``time``."""
    found: dict[str, JsonValue] = {}
    if via is not None:
        found["via"] = via
    if element is not None:
        found["element"] = element
    return found


def element_event(event: NewEvent, index: int) -> NewEvent:
    """An event that array element ``index`` sent, tagged with its index; its end renamed
    (ELEMENT_END_PREFIX), so that no watcher takes it for the array's."""
    kind = ELEMENT_END_PREFIX + event.type if event.type in TERMINAL_TYPES else event.type
    return NewEvent(type=kind, data=event.data, id=event.id, via=event.via, element=index)


def encode_event(event: Event) -> str:
    return orjson.dumps(event.as_dict()).decode()


def decode_event(text: str | bytes) -> Event:
    """Decode an event that the server itself encoded (from the log or pub/sub)."""
    raw = orjson.loads(text)
    wire = text if isinstance(text, str) else text.decode()
    return Event(job=raw["job"], seq=raw["seq"], type=raw["type"], data=raw["data"],
                 time=raw["time"], via=raw.get("via"), element=raw.get("element"),
                 wire=wire)


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
    if event_type == "chunk":
        parse_chunk(raw.get("data"))
    return NewEvent(type=event_type, data=raw.get("data"), id=key)


def parse_event_json(body: bytes, *, max_bytes: int = MAX_EVENT_BYTES) -> NewEvent:
    """Parse one event from the JSON text of a request body or an NDJSON line."""
    if len(body) > max_bytes:
        raise event_too_large(max_bytes, len(body))
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"not valid JSON: {exc}") from None
    return parse_new_event(raw)
