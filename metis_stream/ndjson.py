"""The NDJSON body of ``POST /api/jobs/{id}/events``, sans I/O: bytes in, events out.

Pure code, in the manner of websockets' protocol core: :class:`NdjsonReader` is
fed the body's chunks as they arrive and hands out the events of every complete
line; it never reads a socket, so the route that streams a body and the one
that reads it whole share it, and it is tested without a server.

A bad line stops the reader: the events of the lines before it are still handed
out (a streamed request appends them, since watchers may have seen them), and
:attr:`NdjsonReader.error` says which line was bad and why.
"""

from __future__ import annotations

from metis_stream.errors import InvalidEvent, MetisError, TooLarge
from metis_stream.events import MAX_EVENT_BYTES, NewEvent, event_too_large, parse_event_json

DEFAULT_MAX_LINES = 10_000


class NdjsonReader:
    """Cut a body into lines as its chunks arrive and parse each line as an event."""

    def __init__(self, *, max_event_bytes: int = MAX_EVENT_BYTES,
                 max_lines: int = DEFAULT_MAX_LINES) -> None:
        self.max_event_bytes = max_event_bytes
        self.max_lines = max_lines
        self.error: MetisError | None = None
        """Why reading stopped: an invalid line, or one line too many."""
        self._buffer = bytearray()
        self._events: list[NewEvent] = []
        self._lines = 0
        self._count = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body; complete lines become events at once."""
        if self.error is not None:
            return
        self._buffer += chunk
        start = 0
        while self.error is None and (end := self._buffer.find(b"\n", start)) >= 0:
            self._line(bytes(self._buffer[start:end]))
            start = end + 1
        del self._buffer[:start]
        if self.error is None and len(self._buffer) > self.max_event_bytes:
            # Refused before the line ends: a line without end must not grow without bound.
            self._fail(event_too_large(self.max_event_bytes),
                       self._lines + 1)

    def feed_eof(self) -> None:
        """The body has ended: its last line needs no newline."""
        if self.error is None and self._buffer.strip():
            self._line(bytes(self._buffer))
        self._buffer.clear()

    def events_received(self) -> list[NewEvent]:
        """The events parsed since the last call, in order."""
        events, self._events = self._events, []
        return events

    def _line(self, line: bytes) -> None:
        self._lines += 1
        if not line.strip():
            return
        self._count += 1
        if self._count > self.max_lines:
            self.error = TooLarge(f"a request may carry at most {self.max_lines} events")
            return
        try:
            self._events.append(parse_event_json(line, max_bytes=self.max_event_bytes))
        except InvalidEvent as exc:
            self._fail(exc, self._lines)

    def _fail(self, error: InvalidEvent, line: int) -> None:
        self.error = type(error)(f"line {line}: {error}")


def parse_ndjson(body: bytes, *, max_event_bytes: int = MAX_EVENT_BYTES,
                 max_lines: int = DEFAULT_MAX_LINES) -> list[NewEvent]:
    """A whole NDJSON body: every line must be a valid event, or none is taken."""
    reader = NdjsonReader(max_event_bytes=max_event_bytes, max_lines=max_lines)
    reader.feed(body)
    reader.feed_eof()
    if reader.error is not None:
        raise reader.error
    return reader.events_received()
