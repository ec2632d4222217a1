"""This machine's processes, read from /proc (Linux): for tests that find, check or end
the processes they started."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Process:
    """One process as /proc/PID/stat shows it."""

    pid: int
    ppid: int
    pgid: int
    state: str
    """``R``, ``S``, ...; ``Z`` for a zombie: ended, not yet reaped by its parent."""
    name: str
    """The command's name, at most 15 characters (``comm``)."""
    started: int
    """Clock ticks after boot. A pid is reused once its process is gone: with the start
    time it names one process for good."""

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.started

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def processes() -> dict[int, Process]:
    """Every process of this machine now, zombies included, by pid."""
    table = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                table[int(entry.name)] = _read_stat(int(entry.name))
    return table


def find(pid: int) -> Process | None:
    """The process ``pid`` now, or None when there is none."""
    try:
        return _read_stat(pid)
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int, table: Mapping[int, Process] | None = None) -> list[Process]:
    """The processes below ``pid``: its children, theirs, and so on."""
    table = processes() if table is None else table
    children: dict[int, list[Process]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process)
    found: list[Process] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += [process.pid for process in below]
    return found


def process_group(pgid: int) -> list[Process]:
    """The running processes of process group ``pgid``."""
    return [process for process in processes().values()
            if process.pgid == pgid and process.running]


def end_group(leader: Process, grace: float = 5.0) -> None:
    """End the process group that ``leader`` leads (SIGTERM, and SIGKILL to what is
    left after ``grace``), whether or not the leader itself still runs."""

    def still_there() -> bool:
        # A group outlives its leader while it has members, and its id cannot be reused
        # until it has none: a different leader with the id is a new group, not this one.
        now = find(leader.pid)
        return now.started == leader.started if now else bool(process_group(leader.pid))

    if not still_there():
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process_group(leader.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if still_there():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


def command_line(pid: int) -> str:
    """The process's arguments, or its bracketed name when it has none to show (a
    zombie's, a kernel thread's) or is gone."""
    try:
        argv = (PROC / str(pid) / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        argv = [b""]
    if argv != [b""]:
        return " ".join(arg.decode(errors="replace") for arg in argv)
    process = find(pid)
    return f"[{process.name if process else '?'}]"


def folders_used(pid: int, folders: Iterable[Path]) -> set[Path]:
    """Those of ``folders`` that the process works in, or names in an argument or an
    environment variable (``--file=PATH``, ``NAME=PATH:PATH``), themselves or a path
    below them. Empty when /proc does not let this process read the process's details
    (another user's, without root)."""
    texts: list[str] = []
    with contextlib.suppress(OSError):
        texts.append(os.readlink(PROC / str(pid) / "cwd"))
    for name in ("cmdline", "environ"):
        with contextlib.suppress(OSError):
            texts += (PROC / str(pid) / name).read_bytes().decode(errors="replace").split("\0")
    # A process may rewrite its arguments as one line with spaces (sshd does).
    paths = {piece for text in texts for piece in re.split(r"[\s=:]", text)}
    return {folder for folder in folders
            if any(path == str(folder) or path.startswith(f"{folder}/") for path in paths)}


def _read_stat(pid: int) -> Process:
    text = (PROC / str(pid) / "stat").read_text()
    # The name (field 2) is in parentheses and may hold spaces and parentheses itself.
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return Process(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), state=fields[0],
                   name=name, started=int(fields[19]))
