"""metis_stream.spool: the reader program (run by a real ``sh``), its frames and the
cursor that turns a job's spool into events, never inventing or reordering one."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from metis_stream.events import NewEvent
from metis_stream.spool import (
    CHECK_BYTES,
    MAX_DAMAGE_NOTES,
    Frames,
    SpoolChunk,
    SpoolCursor,
    Taken,
    parse_frames,
    read_request,
    reader_argv,
    sweeper_argv,
    take,
)
from tests.support import service_unavailable

BOUNDARY = "0123456789abcdef" * 2


def line(n: int, data: object = None) -> bytes:
    return orjson.dumps({"type": "step", "data": data if data is not None else f"s{n}",
                         "id": f"e{n}"}) + b"\n"


def event(n: int) -> NewEvent:
    return NewEvent("step", f"s{n}", f"e{n}")


def read(folder: Path, cursors: dict[str, SpoolCursor], max_bytes: int = 65_536,
         shell: tuple[str, ...] = ("sh",), path: str | None = None) -> Frames:
    reads = [read_request(job, cursor, max_bytes) for job, cursor in cursors.items()]
    argv = reader_argv(str(folder), reads, BOUNDARY)
    env = {"PATH": path or os.environ["PATH"]}
    done = subprocess.run([*shell, *argv[1:]], capture_output=True, timeout=30, check=True,
                          env=env)
    return parse_frames(done.stdout, BOUNDARY)


def spool(folder: Path, job: str, data: bytes) -> Path:
    (folder / job).mkdir(exist_ok=True)
    path = folder / job / "events.ndjson"
    with path.open("ab") as file:
        file.write(data)
    return path


# The reader, run by a real shell


def busybox_path(folder: Path) -> str:
    """A PATH whose wc, awk, tail, head and printf are busybox's (./dev test installs it):
    the reader must work with the tools of any cluster, not only GNU's."""
    busybox = shutil.which("busybox")
    if busybox is None:
        service_unavailable("busybox is not installed (./dev test installs it)")
    folder.mkdir()
    for tool in ("sh", "wc", "awk", "tail", "head", "printf", "find", "rm"):
        (folder / tool).symlink_to(busybox)
    return f"{folder}:{os.environ['PATH']}"


@pytest.mark.parametrize("tools", ["dash", "bash", "busybox"])
def test_the_reader_sends_only_the_spools_that_changed(tmp_path: Path, tools: str) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    spool(jobs, "j_1", line(1) + line(2))
    spool(jobs, "j-2", line(3))
    cursors = {"j_1": SpoolCursor(), "j-2": SpoolCursor(), "j_missing": SpoolCursor()}
    path = busybox_path(tmp_path / "bin") if tools == "busybox" else None
    shell = ("sh",) if tools == "busybox" else (tools,)
    frames = read(jobs, cursors, shell=shell, path=path)
    assert frames.whole and not frames.problems
    assert frames.chunks == [SpoolChunk("j_1", len(line(1) + line(2)), 0, line(1) + line(2)),
                             SpoolChunk("j-2", len(line(3)), 0, line(3))]
    # Read to the end: nothing more to send, not even a header.
    after = {"j_1": take(frames.chunks[0], SpoolCursor()).cursor,
             "j-2": take(frames.chunks[1], SpoolCursor()).cursor}
    assert read(jobs, after, shell=shell, path=path).chunks == []


def test_the_reader_sends_every_byte_as_it_is(tmp_path: Path) -> None:
    data = bytes(range(256)) + b"\n" + "héllo\n".encode()
    spool(tmp_path, "j_1", data)
    [chunk] = read(tmp_path, {"j_1": SpoolCursor()}).chunks
    assert chunk.data == data


def test_the_reader_sends_at_most_max_bytes_a_spool(tmp_path: Path) -> None:
    spool(tmp_path, "j_1", b"".join(line(n) for n in range(100)))
    [chunk] = read(tmp_path, {"j_1": SpoolCursor()}, max_bytes=100).chunks
    assert len(chunk.data) == 100
    assert chunk.size == sum(len(line(n)) for n in range(100))


def test_reading_on_from_a_cursor_gives_the_rest_in_order(tmp_path: Path) -> None:
    path = spool(tmp_path, "j_1", line(1) + line(2)[:10])
    cursor = SpoolCursor()
    seen: list[NewEvent] = []
    for more in (line(2)[10:] + line(3), line(4) + line(5)):
        [chunk] = read(tmp_path, {"j_1": cursor}).chunks
        taken = take(chunk, cursor)
        assert taken.damage == []
        seen += taken.events
        cursor = taken.cursor
        with path.open("ab") as file:
            file.write(more)
    [chunk] = read(tmp_path, {"j_1": cursor}).chunks
    seen += take(chunk, cursor).events
    assert seen == [event(n) for n in range(1, 6)]


# Frames


def frame(job: str, data: bytes, size: int | None = None, start: int = 0) -> bytes:
    size = len(data) if size is None else size
    return f"--{BOUNDARY} {job} {size} {start} {len(data)}\n".encode() + data + b"\n"


END = f"--{BOUNDARY} end\n".encode()


def test_frames_may_hold_anything_even_the_look_of_a_header() -> None:
    tricky = f"\n--{BOUNDARY[:-1]}x j_2 1 0 1\n".encode() + b"\n--\xff"
    frames = parse_frames(frame("j_1", tricky) + frame("j_2", b"") + END, BOUNDARY)
    assert frames == Frames([SpoolChunk("j_1", len(tricky), 0, tricky),
                             SpoolChunk("j_2", 0, 0, b"")])


def test_a_frame_shorter_than_its_header_says_is_dropped_not_misread() -> None:
    # A spool truncated between the reader's wc and its tail: fewer bytes than announced.
    short = f"--{BOUNDARY} j_1 100 0 50\n".encode() + line(1) + b"\n"
    frames = parse_frames(short + frame("j_2", line(2)) + END, BOUNDARY)
    assert frames.chunks == [SpoolChunk("j_2", len(line(2)), 0, line(2))]
    assert len(frames.problems) == 1 and "read again next time" in frames.problems[0]
    assert frames.whole


@pytest.mark.parametrize("output", [
    b"", frame("j_1", line(1)), frame("j_1", line(1))[:-5], b"garbage\n" + END,
    f"--{BOUNDARY} j_1 5 0 5\n".encode(),
])
def test_output_cut_short_gives_what_is_whole_and_says_so(output: bytes) -> None:
    frames = parse_frames(output, BOUNDARY)
    assert not frames.whole
    assert frames.chunks == []


def test_the_boundary_of_another_command_is_not_taken() -> None:
    other = "f" * 32
    output = frame("j_1", line(1)).replace(BOUNDARY.encode(), other.encode()) + END
    assert parse_frames(output, BOUNDARY).chunks == []


# take: a chunk into events


START = SpoolCursor()


def chunk(data: bytes, cursor: SpoolCursor = START, size: int | None = None) -> SpoolChunk:
    start = cursor.offset - len(cursor.check)
    return SpoolChunk("j_1", start + len(data) if size is None else size, start, data)


def test_an_unfinished_last_line_is_left_for_later() -> None:
    data = line(1) + line(2)[:-1]
    taken = take(chunk(data), SpoolCursor())
    assert taken.events == [event(1)]
    assert taken.cursor == SpoolCursor(len(line(1)), line(1)[-CHECK_BYTES:])


def test_the_cursor_checks_the_bytes_before_it() -> None:
    first = take(chunk(line(1)), SpoolCursor())
    spool = line(1) + line(2)
    again = take(chunk(spool[first.cursor.offset - CHECK_BYTES:], first.cursor),
                 first.cursor)
    assert again.events == [event(2)] and again.damage == []
    assert again.cursor.offset == len(spool)


def test_a_rewritten_spool_is_reported_and_read_again_from_its_start() -> None:
    cursor = take(chunk(line(1)), SpoolCursor()).cursor
    rewritten = line(9) + line(2)
    taken = take(chunk(rewritten[cursor.offset - CHECK_BYTES:], cursor), cursor)
    assert taken.events == []
    assert taken.cursor == SpoolCursor()
    assert "rewritten in place" in taken.damage[0]
    assert "dropped by their ids" in taken.damage[0]


def test_a_spool_that_shrank_is_reported_and_read_again_from_its_start() -> None:
    cursor = take(chunk(line(1) + line(2)), SpoolCursor()).cursor
    taken = take(SpoolChunk("j_1", 10, cursor.offset - CHECK_BYTES, b""), cursor)
    assert taken.events == [] and taken.cursor == SpoolCursor()
    assert taken.damage[0].startswith(f"the spool shrank from {cursor.offset} to 10 bytes")


@pytest.mark.parametrize("bad, why", [
    (b"not json", "not an event"),
    (b'{"type": "step", "data": 1}', "no idempotency id"),
    (b'{"type": "submitted", "data": 1, "id": "x1"}', "not an event"),
    (b'{"type": "step", "data": "\xff", "id": "x2"}', "not an event"),
    (b"[1, 2]", "not an event"),
])
def test_a_line_that_is_not_an_event_is_reported_and_skipped(bad: bytes, why: str) -> None:
    taken = take(chunk(line(1) + bad + b"\n" + line(2)), SpoolCursor())
    assert taken.events == [event(1), event(2)]
    assert len(taken.damage) == 1
    assert taken.damage[0].startswith(f"the line at byte {len(line(1))}")
    assert why in taken.damage[0]


def test_blank_lines_are_no_damage() -> None:
    taken = take(chunk(line(1) + b"\n  \n" + line(2)), SpoolCursor())
    assert taken.events == [event(1), event(2)] and taken.damage == []


def test_a_line_too_long_for_an_event_is_skipped_to_its_end() -> None:
    cursor = SpoolCursor()
    first = take(chunk(line(1) + b"x" * 300, cursor), cursor, max_event_bytes=100)
    assert first.events == [event(1)]
    assert "longer than an event may be (100 bytes)" in first.damage[0]
    assert first.cursor.skipping
    rest = b"x" * 50 + b"\n" + line(2)
    second = take(chunk(b"x" * CHECK_BYTES + rest, first.cursor), first.cursor,
                  max_event_bytes=100)
    assert second.events == [event(2)] and second.damage == []
    assert not second.cursor.skipping
    assert second.cursor.offset == len(line(1)) + 300 + len(rest)


def test_damage_notes_are_bounded() -> None:
    taken = take(chunk(b"bad\n" * 100 + line(1)), SpoolCursor())
    assert taken.events == [event(1)]
    assert len(taken.damage) == MAX_DAMAGE_NOTES + 1
    assert taken.damage[-1] == f"and {100 - MAX_DAMAGE_NOTES} more lines skipped"


def test_a_chunk_read_for_another_cursor_changes_nothing() -> None:
    cursor = take(chunk(line(1)), SpoolCursor()).cursor
    taken = take(chunk(line(1) + line(2)), cursor)
    assert taken == Taken([], [], cursor)


def test_the_cursor_survives_json() -> None:
    cursor = SpoolCursor(123, b"\x00\xff\n", True)
    assert SpoolCursor.from_json(orjson.loads(orjson.dumps(cursor.as_json()))) == cursor


# The sweeper: spools kept past spool_keep


@pytest.mark.parametrize("tools", ["dash", "busybox"])
def test_the_sweeper_removes_only_old_spools_of_ended_jobs(tmp_path: Path, tools: str) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    old = time.time() - 3600
    for job, has_token, mtime in [("j_old_ended", False, old), ("j_old_running", True, old),
                                  ("j_new_ended", False, time.time())]:
        path = spool(jobs, job, line(1))
        os.utime(path, (mtime, mtime))
        if has_token:
            (jobs / job / "token").write_text("t")
    search = busybox_path(tmp_path / "bin") if tools == "busybox" else os.environ["PATH"]
    argv = sweeper_argv(str(jobs), keep_seconds=1800)
    shell = ["sh"] if tools == "busybox" else [tools]
    subprocess.run([*shell, *argv[1:]], check=True, timeout=30, env={"PATH": search})
    assert sorted(p.parent.name for p in jobs.glob("*/events.ndjson")) == [
        "j_new_ended", "j_old_running"]
