"""The contract for running scheduler commands and placing files on a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from metis_stream.errors import UnsafeArgument

__all__ = [
    "CommandResult",
    "Shell",
    "check_argv",
]


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class Shell(Protocol):
    """Runs argv lists (every element quoted for the remote shell) and moves files.

    Relative paths are relative to the login user's home directory.
    """

    async def run(self, argv: Sequence[str], *, timeout: float | None = None,
                  idempotent: bool = True) -> CommandResult:
        """Run one command; a non-zero exit is a result, not an error.

        ``idempotent=False`` (a submission) forbids running the command again after a
        failure that left its outcome unknown: the shell reports the failure instead."""
        ...

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Write a whole file atomically with ``mode``, creating parent folders."""
        ...

    async def remove_file(self, path: str) -> None:
        """Remove a file; a missing file is not an error."""
        ...

    async def realpath(self, path: str) -> str:
        """The absolute form of ``path`` on the cluster."""
        ...

    async def close(self) -> None: ...


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
