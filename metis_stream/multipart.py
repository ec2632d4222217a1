"""A streaming ``multipart/form-data`` parser (RFC 7578), for submissions that upload
input files. Pure code, no I/O: bytes go in (``feed``, ``feed_eof``), events come out
(``events_received``), as websockets' protocol does it.

A part's body comes out in pieces as it arrives, never whole: an upload of gigabytes goes
on to the cluster while it is being received. Only a part's headers are kept whole (at
most MAX_HEADER_BYTES).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from metis_stream.errors import BadInput

__all__ = [
    "MAX_HEADER_BYTES",
    "Data",
    "MultipartReader",
    "PartEnd",
    "PartStart",
    "boundary_of",
]

MAX_HEADER_BYTES = 16 * 1024
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{1,70}\Z")
_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


@dataclass(frozen=True, slots=True)
class PartStart:
    name: str
    """The form field's name (``Content-Disposition``'s ``name``)."""
    filename: str | None
    content_type: str


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


Event = PartStart | Data | PartEnd


def boundary_of(content_type: str) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type, or BadInput."""
    params = _params(content_type)
    boundary = params.get("boundary", "")
    if not _BOUNDARY.match(boundary) or boundary.endswith(" "):
        raise BadInput("multipart/form-data needs a valid boundary parameter")
    return boundary


class MultipartReader:
    """Feed it the body's bytes; take the events that they complete. A malformed body
    raises BadInput from ``feed`` or ``feed_eof``."""

    def __init__(self, boundary: str) -> None:
        self._delimiter = b"\r\n--" + boundary.encode()
        self._buffer = b"\r\n"  # the first boundary line has no CRLF before it
        self._state = "preamble"
        self._events: list[Event] = []
        self.finished = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self._parse()

    def feed_eof(self) -> None:
        if not self.finished:
            raise BadInput("the multipart body ended before its closing boundary")

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _parse(self) -> None:
        while not self.finished:
            if self._state == "preamble":
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    # Keep what may be the start of the delimiter.
                    self._buffer = self._buffer[-len(self._delimiter):]
                    return
                self._buffer = self._buffer[at + len(self._delimiter):]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(self._buffer) < 2:
                    return
                if self._buffer.startswith(b"--"):
                    self.finished = True
                    return
                line_end = self._buffer.find(b"\r\n")
                if line_end < 0:
                    if len(self._buffer) > 256:
                        raise BadInput("malformed multipart boundary line")
                    return
                if self._buffer[:line_end].strip(b" \t"):
                    raise BadInput("malformed multipart boundary line")
                self._buffer = self._buffer[line_end + 2:]
                self._state = "headers"
            elif self._state == "headers":
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEADER_BYTES:
                        raise BadInput(f"a part's headers may be at most {MAX_HEADER_BYTES} "
                                       "bytes")
                    return
                self._events.append(_part_start(self._buffer[:end]))
                self._buffer = self._buffer[end + 4:]
                self._state = "body"
            else:
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    keep = len(self._delimiter) - 1
                    if len(self._buffer) > keep:
                        self._events.append(Data(self._buffer[:-keep]))
                        self._buffer = self._buffer[-keep:]
                    return
                if at:
                    self._events.append(Data(self._buffer[:at]))
                self._events.append(PartEnd())
                self._buffer = self._buffer[at + len(self._delimiter):]
                self._state = "after-boundary"


def _part_start(raw: bytes) -> PartStart:
    headers: dict[str, str] = {}
    for line in raw.decode("utf-8", errors="replace").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon:
            raise BadInput("malformed header in a multipart part")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise BadInput("each part needs Content-Disposition: form-data; name=...")
    params = _params(disposition)
    if "name" not in params:
        raise BadInput("each part needs a name (Content-Disposition: form-data; name=...)")
    return PartStart(params["name"], params.get("filename"),
                     headers.get("content-type", "text/plain").split(";")[0].strip().lower())


def _params(header: str) -> dict[str, str]:
    params = {}
    for key, value in _PARAM.findall(header):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    return params
