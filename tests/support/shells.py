"""Shells for the tests: FakeShell, the test double for code that drives a shell, and
ssh_shell, an SSHShell connected to the test cluster."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from dataclasses import dataclass

from metis_stream.errors import OutsideFolder, ShellError
from metis_stream.shells.base import CHUNK_BYTES, CommandResult, FileInfo, check_argv, inside
from metis_stream.shells.ssh import SSHShell
from tests.support.cluster import TestCluster

HOME = "/home/alice"
"""FakeShell's home folder: where its relative paths lead."""


@dataclass(frozen=True, slots=True)
class Run:
    """One call of FakeShell.run."""

    argv: list[str]
    timeout: float | None
    idempotent: bool


class FakeShell:
    """A Shell that runs nothing and records everything (httpx ships MockTransport for
    the same reason): each command gets the next of ``answers``, a result that is
    returned or an error that is raised, and files live in ``files``.

    It keeps the part of the shell contract that needs no real command (the contract
    test runs it): argv refused as every shell refuses it, paths relative to ``HOME``,
    a closed shell refusing every call.
    """

    def __init__(self, *answers: CommandResult | ShellError) -> None:
        self.answers = list(answers)
        self.runs: list[Run] = []
        self.files: dict[str, tuple[bytes, int]] = {}
        """Each written path as it was given, with its content and mode."""
        self.writes: list[str] = []
        self.removed: list[str] = []
        self.reads: list[str] = []
        self.closed = False

    @property
    def commands(self) -> list[list[str]]:
        """The argv of every command run, in order."""
        return [run.argv for run in self.runs]

    async def run(self, argv: Sequence[str], *, timeout: float | None = None,
                  idempotent: bool = True) -> CommandResult:
        check_argv(argv)
        self._check_open()
        self.runs.append(Run(list(argv), timeout, idempotent))
        if not self.answers:
            raise AssertionError(f"unexpected command {argv}")
        answer = self.answers.pop(0)
        if isinstance(answer, ShellError):
            raise answer
        return answer

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        self._check_open()
        self.files[path] = (data, mode)
        self.writes.append(path)

    async def read_file(self, path: str, *, max_bytes: int, tail: bool = False) -> bytes | None:
        self._check_open()
        self.reads.append(path)
        found = [data for name, (data, _) in self.files.items()
                 if posixpath.join(HOME, name) == posixpath.join(HOME, path)]
        if not found:
            return None
        data = found[-1]
        return data[-max_bytes:] if tail and max_bytes else data[:max_bytes]

    async def remove_file(self, path: str) -> None:
        self._check_open()
        self.removed.append(path)
        self.files.pop(path, None)

    async def realpath(self, path: str) -> str:
        self._check_open()
        return posixpath.normpath(posixpath.join(HOME, path))

    async def list_folder(self, path: str) -> list[FileInfo] | None:
        self._check_open()
        folder = self._absolute(path)
        names: dict[str, FileInfo] = {}
        for absolute, data in self._contents().items():
            if inside(absolute, folder) and absolute != folder:
                first, _, rest = absolute[len(folder):].lstrip("/").partition("/")
                names[first] = FileInfo(first, "folder" if rest else "file",
                                        0 if rest else len(data), 0.0)
        return list(names.values()) if names else None

    async def resolve(self, path: str, *, within: str) -> FileInfo | None:
        self._check_open()
        absolute = self._absolute(path)
        if not inside(absolute, self._absolute(within)):
            raise OutsideFolder("the path leads outside the folder it must stay in")
        data = self._contents().get(absolute)
        return None if data is None else FileInfo(absolute, "file", len(data), 0.0)

    async def read_chunks(self, path: str, *, offset: int = 0,
                          length: int | None = None) -> AsyncGenerator[bytes, None]:
        self._check_open()
        data = self._contents().get(self._absolute(path))
        if data is None:
            raise ShellError(f"no such file: {path}")
        end = len(data) if length is None else min(len(data), offset + length)
        for start in range(offset, end, CHUNK_BYTES):
            yield data[start:min(end, start + CHUNK_BYTES)]

    async def write_chunks(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o600) -> int:
        data = b"".join([chunk async for chunk in chunks])
        await self.write_file(path, data, mode=mode)
        return len(data)

    def _contents(self) -> dict[str, bytes]:
        """Each file by its absolute path."""
        return {self._absolute(name): data for name, (data, _) in self.files.items()}

    @staticmethod
    def _absolute(path: str) -> str:
        return posixpath.normpath(posixpath.join(HOME, path))

    async def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise ShellError("the fake shell is closed")


def ssh_shell(cluster: TestCluster, **options: object) -> SSHShell:
    """An SSHShell for the test cluster's user, with the cluster's key and host key;
    ``options`` override SSHShell's own."""
    settings: dict[str, object] = {
        "port": cluster.port,
        "user": cluster.user,
        "known_hosts": cluster.known_hosts,
        "key_file": cluster.key_file,
        "use_agent": False,
    }
    settings.update(options)
    return SSHShell(cluster.host, **settings)  # type: ignore[arg-type]

