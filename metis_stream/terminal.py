"""What of a job's text may reach a terminal.

A job's text is the job's to choose: printed raw, its control characters would act on
the terminal (OSC 0 sets the title, OSC 52 writes the clipboard, CSI 2J clears the
screen). Pure code over a text stream: the command line decides which stream.
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from metis_stream.errors import InvalidEvent
from metis_stream.events import OUTPUT_STREAMS, log_lines, parse_chunk
from metis_stream.jobs import TALLY_KEYS

# Human output shows every C0 and C1 control but newline and tab, and DEL, as \xNN.
_SHOWN_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f, *range(0x80, 0xa0))
                   if chr(code) not in "\n\t"}
# JSON escapes only U+0000..U+001F and leaves DEL and the C1 controls raw (U+009B is a CSI);
# escaping them as well keeps the value exact. They can only occur inside JSON strings.
_JSON_CONTROLS = {code: f"\\u{code:04x}" for code in (0x7f, *range(0x80, 0xa0))}

# The escape sequences that programs write to colour or redraw their output (ECMA-48):
# CSI (ESC [ or U+009B, parameters, intermediates, a final byte), OSC, DCS, SOS, PM and APC
# strings (ended by BEL or ST, or by the end of the line), and the two-byte ESC sequences.
_ESCAPE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c|$)"
    r"|\x1b[ -/]*[0-~]"
)
# Select Graphic Rendition with numeric parameters only: colours, bold, underline. It
# changes how text looks and nothing else, so a terminal may obey it.
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_RESET = "\x1b[0m"
_RESETS = ("\x1b[m", _RESET)
_STDERR_COLOUR = "\x1b[31m"


def shown(text: str) -> str:
    """``text`` for a terminal: each control character shown as ``\\xNN``, none obeyed."""
    return text.translate(_SHOWN_CONTROLS)


def json_line(value: Any) -> str:
    """``value`` as one line of JSON that a terminal cannot act on."""
    return orjson.dumps(value).decode().translate(_JSON_CONTROLS)


def output_line(line: str, *, colours: bool, stderr: bool = False) -> str:
    """A line of a job's output, as a terminal may show it.

    Escape sequences are removed whole (a progress bar's ``ESC [2K`` shown as ``\\x1b[2K``
    helps nobody); with ``colours`` (a terminal) the colour sequences stay, stderr lines
    are red, and the colours are reset at the line's end so that none bleeds into the
    next. Every other control character is shown as ``\\xNN``.
    """
    if not colours:
        return shown(_ESCAPE.sub("", line))
    parts = [_STDERR_COLOUR] if stderr else []
    coloured = stderr
    # The pattern has no group of its own, so split gives text and sequences in turn.
    for index, piece in enumerate(re.split(f"({_ESCAPE.pattern})", line)):
        if index % 2 == 0:
            parts.append(shown(piece))
        elif _SGR.fullmatch(piece):
            parts.append(piece)
            coloured = True
            if stderr and piece in _RESETS:
                parts.append(_STDERR_COLOUR)  # the line's own reset ends its colours, not red
    if coloured:
        parts.append(_RESET)
    return "".join(parts)


def describe_end(event: dict[str, Any]) -> str:
    """One line on how a job ended, from its terminal event."""
    detail = _describe(event["data"])
    return f"job {event['type']}: {detail}" if detail else f"job {event['type']}"


class EventPrinter:
    """Token text inline as it arrives; the job's output lines as they are, stderr in red
    on a terminal; other events as timestamped lines; a progress bar that redraws in
    place on a terminal.

    With a ``stream``, only the lines of that output stream (or, with ``as_json``, only
    the ``log`` events of it): a job's stdout to pipe to a file or to ``grep``.
    """

    def __init__(self, out: TextIO, *, as_json: bool, stream: str | None = None) -> None:
        self._out = out
        self._json = as_json
        self._stream = stream
        self._tty = out.isatty()
        self._mid_line = False
        self._bar = False

    def show(self, event: dict[str, Any]) -> None:
        if self._stream is not None:
            self._show_stream(event)
        elif self._json:
            self._out.write(json_line(event) + "\n")
        elif event["type"] == "token":
            self._clear_bar()
            self._out.write(shown(str(event["data"])))
            self._mid_line = True
        elif event["type"] == "progress":
            # Only a terminal can redraw a bar in place, and only on a line of its own:
            # progress lines must never cut streamed text (--json keeps every event).
            if self._tty and not self._mid_line:
                self._out.write("\r" + shown(_progress_bar(event["data"])))
                self._bar = True
        else:
            self._clear_bar()
            self._end_line()
            output = log_lines(event["data"]) if event["type"] == "log" else None
            # An array element's events say which element they come from (docs/arrays.md).
            element = event.get("element")
            tag = f"[{element}] " if isinstance(element, int) else ""
            if output is not None and output.stream in OUTPUT_STREAMS:
                stderr = output.stream == "stderr"
                for line in output.lines:
                    self._out.write(shown(tag) + output_line(line, colours=self._tty,
                                                             stderr=stderr) + "\n")
            else:
                stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
                kind = output.stream if output is not None else event["type"]
                data = "\n".join(output.lines) if output is not None else event["data"]
                described = _DESCRIBERS.get(event["type"], _describe)(data)
                self._out.write(shown(f"{stamp} {tag}{kind:<10} {described}") + "\n")
        self._out.flush()

    def finish(self) -> None:
        self._clear_bar()
        self._end_line()
        self._out.flush()

    def _show_stream(self, event: dict[str, Any]) -> None:
        output = log_lines(event["data"]) if event["type"] == "log" else None
        if output is None or output.stream != self._stream:
            return
        if self._json:
            self._out.write(json_line(event) + "\n")
        else:
            for line in output.lines:
                self._out.write(output_line(line, colours=self._tty) + "\n")
        self._out.flush()

    def _end_line(self) -> None:
        if self._mid_line:
            self._out.write("\n")
            self._mid_line = False

    def _clear_bar(self) -> None:
        if self._bar:
            self._out.write("\r\x1b[K")
            self._bar = False


def _progress_bar(data: Any, width: int = 30) -> str:
    if not isinstance(data, dict):
        return f"progress {_describe(data)}"
    current, total = data.get("current"), data.get("total")
    label = data.get("label") or ""
    if not isinstance(current, int | float) or not isinstance(total, int | float) or total <= 0:
        return f"progress {_describe(data)}"
    filled = int(width * min(max(current / total, 0), 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {current}/{total} {label}".rstrip()


def _describe(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return orjson.dumps(data).decode()


def _describe_chunk(data: Any) -> str:
    """A chunk as a line says it: its place and size, not its base64."""
    try:
        chunk = parse_chunk(data)
    except InvalidEvent:
        return _describe(data)
    return f"{chunk.stream} #{chunk.index} {chunk.media_type}, {chunk.size} bytes"


def _describe_tally(data: Any) -> str:
    """An array's tally in words: ``3 done, 1 failed, 1 running of 5``."""
    if not isinstance(data, dict) or not all(
            isinstance(data.get(key), int) for key in TALLY_KEYS):
        return _describe(data)
    counts = ", ".join(f"{data[key]} {key}" for key in TALLY_ORDER if data[key])
    return f"{counts or 'none'} of {sum(data[key] for key in TALLY_KEYS)}"


TALLY_ORDER = ("done", "failed", "running", "queued")
_DESCRIBERS: dict[str, Callable[[Any], str]] = {
    "chunk": _describe_chunk,
    "elements": _describe_tally,
}
"""How a line describes the data of the event types that need more than their JSON."""


class LiveLine:
    """One line that shows how a long task is going, redrawn in place on a terminal
    (carriage return, erase to the end of the line). Off a terminal (a pipe, a log) it
    draws nothing, since the redraws would pile up; :meth:`print` lines still go out."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.on_terminal = out.isatty()

    def draw(self, text: str) -> None:
        """Show ``text`` instead of what the line showed (an empty text clears it)."""
        if self.on_terminal:
            self._out.write("\r\x1b[K" + shown(text))
            self._out.flush()

    def keep(self) -> None:
        """Leave what the line shows on the screen, and go on below it."""
        if self.on_terminal:
            self._out.write("\n")
            self._out.flush()

    def print(self, message: str) -> None:
        """A line of its own, written over the live line (the next draw shows it again)."""
        self._out.write(("\r\x1b[K" if self.on_terminal else "") + shown(message) + "\n")
        self._out.flush()


class StatusLine:
    """What a long wait is doing: redrawn in place on a terminal (with the seconds
    waited), one line per change of text elsewhere (a log keeps no redraws). An empty
    text clears it."""

    def __init__(self, out: TextIO) -> None:
        self._line = LiveLine(out)
        self._shown = ""

    def show(self, text: str, seconds: float) -> None:
        if self._line.on_terminal:
            self._line.draw(f"{text} ({seconds:.0f} s)" if text else "")
        elif text and text != self._shown:
            self._line.print(text)
        self._shown = text


class ProgressBar:
    """A transfer's progress on a terminal, redrawn at most ten times a second: bytes so
    far, the share of the whole when it is known, and the rate. Nothing elsewhere."""

    def __init__(self, out: TextIO, name: str) -> None:
        self._line = LiveLine(out)
        self._name = name
        self._started = time.monotonic()
        self._drawn = 0.0

    def show(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._drawn < 0.1 and done != total:
            return
        self._drawn = now
        rate = done / max(now - self._started, 1e-3)
        if total:
            filled = round(30 * done / total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}%"
        else:
            bar = ""
        self._line.draw(f"{self._name[:30]}  {bar} {byte_size(done)}  {byte_size(rate)}/s")

    def finish(self) -> None:
        self._line.keep()


def byte_size(count: float) -> str:
    """``count`` bytes in words a person reads at a glance: 512 B, 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def writes_utf8(out: TextIO) -> bool:
    """Whether ``out`` takes characters beyond ASCII (✓, ✗): not on a C locale."""
    encoding = getattr(out, "encoding", None) or "ascii"
    return codecs.lookup(encoding).name == "utf-8"
