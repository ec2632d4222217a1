"""The contract for running scheduler commands and placing files on a cluster.

Every shell passes the same contract test (tests/test_shell_contract.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from metis_stream.errors import LoginNeeded, UnsafeArgument

__all__ = [
    "CommandResult",
    "Shell",
    "TakesLogin",
    "check_argv",
]


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

    async def close(self) -> None:
        """Release the shell; closing it again does nothing."""
        ...


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
