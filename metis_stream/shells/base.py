"""The contract for running scheduler commands and placing files on a cluster.

Every shell passes the same contract test (tests/test_shell_contract.py).
"""

from __future__ import annotations

import stat
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from metis_stream.errors import LoginNeeded, UnsafeArgument

__all__ = [
    "CHUNK_BYTES",
    "CommandResult",
    "FileInfo",
    "Shell",
    "SpoolReading",
    "TakesLogin",
    "check_argv",
    "file_kind",
    "inside",
]

CHUNK_BYTES = 256 * 1024
"""The most ``read_chunks`` gives at once: what a streamed download holds per reader."""

FileKind = Literal["file", "folder", "link", "other"]


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str
    raw_stdout: bytes = b""
    """What the command wrote to stdout, byte for byte; ``stdout`` is its UTF-8 decoding.
    Bytes counted by the command (a spool reader's frames) need this one."""

    @classmethod
    def from_output(cls, exit_status: int, stdout: bytes, stderr: bytes) -> CommandResult:
        return cls(exit_status, stdout.decode(errors="replace"),
                   stderr.decode(errors="replace"), stdout)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One file as the cluster sees it."""

    name: str
    """Its name in its folder (``list_folder``), or its resolved absolute path
    (``resolve``)."""
    kind: FileKind
    size: int
    modified: float
    """Seconds since the epoch."""


class Shell(Protocol):
    """Runs argv lists (every element arrives as one argument, byte for byte) and moves
    files.

    Relative paths, and the folder commands run in, are relative to the login user's
    home directory. Failures raise ShellError (or its subclasses); once closed, a shell
    refuses every call with ShellError.
    """

    async def run(self, argv: Sequence[str], *, timeout: float | None = None,
                  idempotent: bool = True) -> CommandResult:
        """Run one command with empty input; a non-zero exit is a result, not an error.

        A command that does not exist exits 127 and one that cannot be executed 126, as
        through a POSIX shell; one killed by a signal has a negative exit status. Output
        that is not UTF-8 is decoded with replacement characters. An argv that
        :func:`check_argv` refuses raises UnsafeArgument before anything runs. A command
        still running after ``timeout`` seconds is killed, with everything it started in
        its process group, and CommandTimeout is raised.

        ``idempotent=False`` (a submission) forbids running the command again after a
        failure that left its outcome unknown: the shell reports the failure instead."""
        ...

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write a whole file atomically with ``mode``, replacing any file there; missing
        parent folders are created private to the user (0700)."""
        ...

    async def read_file(self, path: str, *, max_bytes: int, tail: bool = False) -> bytes | None:
        """The first ``max_bytes`` bytes of a file, or with ``tail`` its last ones (a job's
        ``exit`` file, the end of its ``stderr``); None when there is no such file. A file
        that grows meanwhile gives what it held when it was read."""
        ...

    async def remove_file(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""
        ...

    async def realpath(self, path: str) -> str:
        """The absolute form of an existing ``path`` on the cluster."""
        ...

    async def list_folder(self, path: str) -> list[FileInfo] | None:
        """The entries of a folder (without ``.`` and ``..``) as ``lstat`` sees them: a
        symbolic link is a ``link``, whatever it points to; None when there is no such
        folder."""
        ...

    async def resolve(self, path: str, *, within: str) -> FileInfo | None:
        """What ``path`` leads to once every symbolic link in it is followed, resolved
        on the cluster itself: its ``stat``, named by its absolute path. None when nothing
        is there. A path that leads outside ``within`` (itself resolved) raises
        OutsideFolder, and nothing out there is looked at beyond resolving the path."""
        ...

    def read_chunks(self, path: str, *, offset: int = 0,
                    length: int | None = None) -> AsyncGenerator[bytes, None]:
        """The bytes of a file from ``offset``, ``length`` of them (None: to its end), in
        pieces of at most CHUNK_BYTES, each read when the caller asks for it: a slow
        reader holds one piece, never the file. A missing file raises ShellError; a file
        that shrinks meanwhile ends early."""
        ...

    async def write_chunks(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o600) -> int:
        """Write a file from ``chunks`` as they arrive, under a temporary name put in
        place at the end (as ``write_file``); the number of bytes written. When
        ``chunks`` raises, the temporary file is removed and the error goes on."""
        ...

    async def close(self) -> None:
        """Release the shell; closing it again does nothing."""
        ...


@runtime_checkable
class SpoolReading(Protocol):
    """A shell that reads and sweeps spools itself instead of running metis_stream.spool's
    ``sh`` programs: the agent's, which runs no ``sh``. Schedulers ask with isinstance."""

    async def read_spools(self, jobs_dir: str, words: Sequence[str], boundary: str, *,
                          timeout: float | None) -> bytes:
        """What spool.READER would print for these words (``SpoolRead.word``), byte for
        byte in the same frames, for spool.parse_frames."""
        ...

    async def remove_old_spools(self, jobs_dir: str, minutes: int, *,
                                timeout: float | None) -> None:
        """What spool.SWEEPER does: remove the spools of ended jobs older than
        ``minutes``."""
        ...


def file_kind(mode: int) -> FileKind:
    """What a ``stat`` mode says a file is."""
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def inside(path: str, folder: str) -> bool:
    """Whether the absolute ``path`` is ``folder`` or under it (both resolved)."""
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder if folder == "/" else folder + "/")


@runtime_checkable
class TakesLogin(Protocol):
    """A shell whose login node may ask for a second factor after the key (SSHShell), and
    the scheduler that owns one: an operator's one-time code opens its connection
    (docs/login.md)."""

    def needs_login(self) -> LoginNeeded | None:
        """The error a command meets now for want of a login; None when none is needed."""
        ...

    async def login(self, code: str) -> bool:
        """Open the connection with ``code``: True, or False when one was open already
        (the code unused). LoginRefused when the login node refuses the code."""
        ...


def check_argv(argv: Sequence[str]) -> None:
    """Refuse an argv that cannot reach a command intact, with UnsafeArgument."""
    if not argv:
        raise UnsafeArgument("empty command")
    if argv[0].startswith("-"):
        # A remote login shell runs `$SHELL -c COMMAND`: it would read this as its own
        # option (and no command names start with "-").
        raise UnsafeArgument(f"a command name cannot start with '-': {argv[0]!r}")
    for arg in argv:
        # A C string ends at NUL: the command would get a shortened argument.
        if "\0" in arg:
            raise UnsafeArgument(f"NUL character in command argument {arg!r}")
