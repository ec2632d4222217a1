"""The spool: a job's events in a file on the shared filesystem, read over the cluster's
kept connection (docs/spool.md).

Every event a job sends is also appended to ``<workdir>/jobs/<id>/events.ndjson``, one
JSON line with its idempotency id, each line in one ``write`` (``metis-emit`` does it).
The server reads the new bytes of every live job's spool with one command per cluster
per poll (:func:`reader_argv`), cuts them into frames (:func:`parse_frames`) and each
frame into events (:func:`take`), which go through the normal append path: a line that
HTTP already delivered is dropped there by its id.

Pure: the reader's shell program, the frame parser and the cursor that says how far a
job's spool was read. The scheduler adapters run the program; the monitor appends.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from metis_stream.errors import MetisError
from metis_stream.events import MAX_EVENT_BYTES, NewEvent, parse_event_json

SPOOL_FILE = "events.ndjson"
CHECK_BYTES = 16
"""The bytes before a cursor's offset that are read again and compared: a spool that was
rewritten in place (not only appended to) is told from one that grew."""
MAX_DAMAGE_NOTES = 5
"""What one read of one spool reports at most; the rest is counted."""

DELIVERIES = ("http", "spool", "both")
"""How a cluster's jobs send their events: over HTTP only (no spool), to the spool only
(no network from the job), or both (HTTP, with the spool as the safety net)."""

BOUNDARY = re.compile(r"[0-9a-f]{32}\Z")

# The reader, run by ``sh -c`` on the cluster (or locally): $1 the jobs' folder, $2 the
# boundary, then one word per job, ID:START:HAVE:MAX. One ``wc`` sizes every spool at
# once, and only a spool whose size differs from what the server has (HAVE) costs a
# ``tail | head``: quiet jobs cost nothing. Each frame is a header line
# (--BOUNDARY ID SIZE START COUNT), COUNT bytes from START, and a newline; a last line
# ``--BOUNDARY end`` says that the output is whole. metis-agent, which runs no sh, writes
# the same frames itself (metis_agent.spool_frames; a test holds the two byte for byte).
# ``head -c`` is not POSIX but is in GNU coreutils, busybox and every BSD.
READER = r"""
set -f
cd -- "$1" || exit 3
boundary=$2
shift 2
if [ $# -gt 0 ]; then
    files=
    for job; do files="$files ${job%%:*}/events.ndjson"; done
    # shellcheck disable=SC2086  # split on purpose: ids are [A-Za-z0-9_-]
    wc -c $files 2>/dev/null | awk -v jobs="$*" '
        BEGIN {
            n = split(jobs, list, " ")
            for (i = 1; i <= n; i++) {
                split(list[i], f, ":")
                start[f[1]] = f[2]; have[f[1]] = f[3]; most[f[1]] = f[4]
            }
        }
        NF == 2 && $2 ~ /^[A-Za-z0-9_-]+\/events\.ndjson$/ {
            id = substr($2, 1, length($2) - 14)
            if (!(id in start) || $1 + 0 == have[id] + 0) next
            count = $1 - start[id]
            if (count > most[id] + 0) count = most[id] + 0
            if (count < 0) count = 0
            print id, $1 + 0, start[id], count
        }' |
    while read -r id size start count; do
        printf -- '--%s %s %s %s %s\n' "$boundary" "$id" "$size" "$start" "$count"
        if [ "$count" -gt 0 ]; then
            tail -c +"$((start + 1))" "$id/events.ndjson" | head -c "$count"
        fi
        printf '\n'
    done
fi
printf -- '--%s end\n' "$boundary"
"""


# Removes the spools of ended jobs (no token file left) older than $2 minutes, in the
# jobs' folder $1. ``find -mmin`` is not POSIX but GNU, busybox and the BSDs have it.
SWEEPER = r"""
cd -- "$1" 2>/dev/null || exit 0
find . -name events.ndjson -mmin +"$2" | while read -r spool; do
    [ -e "${spool%/*}/token" ] || rm -f -- "$spool"
done
"""


def sweep_minutes(keep_seconds: float) -> int:
    """``keep_seconds`` in the whole minutes that ``find -mmin`` counts."""
    return max(1, math.ceil(keep_seconds / 60))


def sweeper_argv(jobs_dir: str, keep_seconds: float) -> list[str]:
    """One command that removes the spools kept longer than ``keep_seconds``."""
    return ["sh", "-c", SWEEPER, "metis-spool-sweeper", jobs_dir,
            str(sweep_minutes(keep_seconds))]


@dataclass(frozen=True, slots=True)
class SpoolCursor:
    """How far the server has taken a job's spool: kept in the backend, so that a
    restarted server, or the process that takes over the cluster's lease, goes on
    from there."""

    offset: int = 0
    """The bytes taken: the spool up to the end of its last whole line read."""
    check: bytes = b""
    """The last bytes before ``offset`` (at most CHECK_BYTES), as they were read."""
    skipping: bool = False
    """Inside a line too long to be an event: what follows, to its end, is skipped."""

    def as_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "check": base64.b64encode(self.check).decode(),
                "skipping": self.skipping}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SpoolCursor:
        return cls(offset=int(raw["offset"]), check=base64.b64decode(raw["check"]),
                   skipping=bool(raw["skipping"]))


@dataclass(frozen=True, slots=True)
class SpoolRead:
    """What to read of one job's spool: from ``start`` (the cursor's offset less its
    check bytes), at most ``max_bytes``, and only if its size is not ``have``."""

    job_id: str
    start: int
    have: int
    max_bytes: int

    def word(self) -> str:
        return f"{self.job_id}:{self.start}:{self.have}:{self.max_bytes}"


def read_request(job_id: str, cursor: SpoolCursor, max_bytes: int) -> SpoolRead:
    start = cursor.offset - len(cursor.check)
    return SpoolRead(job_id, start, cursor.offset, max_bytes + len(cursor.check))


def reader_argv(jobs_dir: str, reads: Sequence[SpoolRead], boundary: str) -> list[str]:
    """One command that reads every job's new bytes; ``jobs_dir`` holds the jobs' folders."""
    return ["sh", "-c", READER, "metis-spool-reader", jobs_dir, boundary,
            *(read.word() for read in reads)]


@dataclass(frozen=True, slots=True)
class SpoolChunk:
    """The bytes of one job's spool that the reader sent."""

    job_id: str
    size: int
    """The spool's size when it was read."""
    start: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Frames:
    chunks: list[SpoolChunk]
    problems: list[str] = field(default_factory=list)
    """Frames that were dropped: their jobs' cursors stay, and the next poll reads them
    again."""
    whole: bool = True
    """False when the output ended before the reader's last line (a timeout, a broken
    connection): what came is used, the rest is read next time."""


_HEADER = re.compile(rb"([A-Za-z0-9_-]{1,64}) ([0-9]{1,18}) ([0-9]{1,18}) ([0-9]{1,18})\Z")


def parse_frames(output: bytes, boundary: str) -> Frames:
    """The reader's output cut into chunks. A frame whose bytes do not end where its
    header says (the spool changed while it was read) is dropped, never misread: the
    boundary, random per command, is what no job's bytes can forge by chance."""
    mark = b"--" + boundary.encode() + b" "
    chunks: list[SpoolChunk] = []
    problems: list[str] = []
    position = 0
    while True:
        if not output.startswith(mark, position):
            return Frames(chunks, problems, whole=False)
        line_end = output.find(b"\n", position)
        if line_end < 0:
            return Frames(chunks, problems, whole=False)
        header = output[position + len(mark):line_end]
        if header == b"end":
            return Frames(chunks, problems)
        match = _HEADER.match(header)
        data_end = line_end + 1 + int(match.group(4)) if match else -1
        # Every frame is followed by another or by the end line.
        if match and output.startswith(b"\n" + mark, data_end):
            job_id = match.group(1).decode()
            chunks.append(SpoolChunk(job_id, int(match.group(2)), int(match.group(3)),
                                     output[line_end + 1:data_end]))
            position = data_end + 1
            continue
        problems.append(f"a frame of the spool reader did not end where it said "
                        f"({header[:80]!r}); it is read again next time")
        following = output.find(b"\n" + mark, line_end)
        if following < 0:
            return Frames(chunks, problems, whole=False)
        position = following + 1


@dataclass(frozen=True, slots=True)
class Taken:
    """What one chunk gives: the events to append, in order, what was skipped, and the
    cursor to keep once the events are appended."""

    events: list[NewEvent]
    damage: list[str]
    cursor: SpoolCursor


def take(chunk: SpoolChunk, cursor: SpoolCursor, max_event_bytes: int = MAX_EVENT_BYTES
         ) -> Taken:
    """The whole lines of ``chunk`` after ``cursor``, as events. An unfinished last line
    is left for the next read. Never an invented event: a line that is not an event is
    reported and skipped; a spool that shrank or was rewritten is reported and read again
    from its start (what was appended before is dropped by its ids)."""
    if chunk.start != cursor.offset - len(cursor.check):
        return Taken([], [], cursor)  # read for another cursor: stale, read again
    if chunk.size < cursor.offset:
        return _restart(f"the spool shrank from {cursor.offset} to {chunk.size} bytes "
                        "(truncated or replaced)")
    check = chunk.data[:len(cursor.check)]
    if check != cursor.check:
        return _restart(f"the spool's bytes before offset {cursor.offset} changed "
                        "(rewritten in place)")
    data = chunk.data[len(check):]
    notes = _Notes()
    offset, skipping = cursor.offset, cursor.skipping
    used = 0
    if skipping:
        end = data.find(b"\n")
        used = len(data) if end < 0 else end + 1
        skipping = end < 0
    events: list[NewEvent] = []
    while not skipping:
        end = data.find(b"\n", used)
        if end < 0:
            if len(data) - used > max_event_bytes:
                notes.add(f"a line at byte {offset + used} is longer than an event may be "
                          f"({max_event_bytes} bytes): skipped")
                used, skipping = len(data), True
            break
        line = data[used:end]
        if line.strip():
            event = _event(line, offset + used, notes, max_event_bytes)
            if event is not None:
                events.append(event)
        used = end + 1
    taken = check + data[:used]
    return Taken(events, notes.lines(), SpoolCursor(
        offset=offset + used,
        check=(cursor.check + taken)[-CHECK_BYTES:] if used else cursor.check,
        skipping=skipping))


def _event(line: bytes, at: int, notes: _Notes, max_event_bytes: int) -> NewEvent | None:
    try:
        event = parse_event_json(line, max_bytes=max_event_bytes)
    except MetisError as exc:
        notes.add(f"the line at byte {at} is not an event ({exc}): skipped")
        return None
    if event.id is None:
        notes.add(f"the line at byte {at} has no idempotency id, so it could be taken "
                  "twice: skipped")
        return None
    return event


def _restart(reason: str) -> Taken:
    return Taken([], [f"{reason}; reading it again from its start, where events already "
                      "appended are dropped by their ids"], SpoolCursor())


class _Notes:
    def __init__(self) -> None:
        self._notes: list[str] = []
        self._more = 0

    def add(self, note: str) -> None:
        if len(self._notes) < MAX_DAMAGE_NOTES:
            self._notes.append(note)
        else:
            self._more += 1

    def lines(self) -> list[str]:
        more = [f"and {self._more} more lines skipped"] if self._more else []
        return self._notes + more
