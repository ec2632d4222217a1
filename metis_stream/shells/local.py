"""The ``local`` shell: scheduler commands and files on the server's own machine."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import subprocess
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream, Process

from metis_stream.environment import SCHEDULER_CLIENT_NAMES, inherited
from metis_stream.errors import CommandTimeout, OutsideFolder, ShellError
from metis_stream.files import make_private_dirs, write_private
from metis_stream.shells.base import (
    CHUNK_BYTES,
    CommandResult,
    FileInfo,
    check_argv,
    file_kind,
    inside,
)

T = TypeVar("T")


class LocalShell:
    """The Shell protocol on this machine: argv runs directly (no shell in between), with
    the allowed part of the server's environment (``environment.inherited``), and
    relative paths are relative to ``home`` (the user's home folder by default)."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = home if home is not None else Path.home()
        self._closed = False

    async def run(self, argv: Sequence[str], *, timeout: float | None = None,
                  idempotent: bool = True) -> CommandResult:
        """Run one command; a non-zero exit is a result, not an error. A command that
        does not exist exits 127 and one that cannot be executed 126, as through a remote
        shell. A timeout, or cancelling the caller, kills the command and everything it
        started. Nothing is ever retried here, so ``idempotent`` changes nothing."""
        check_argv(argv)
        self._check_open()
        try:
            # A session of its own, as sshd gives every command: its process group is
            # everything it starts, and is killed as a whole. Only the allowed part of the
            # server's environment: qsub and sbatch may pass what they get on to the job.
            process = await anyio.open_process(
                list(argv), stdin=subprocess.DEVNULL, cwd=self.home, start_new_session=True,
                env=inherited(SCHEDULER_CLIENT_NAMES),
            )
        except OSError as exc:
            if exc.filename != argv[0]:  # not the command: the home folder, a pipe, fork
                raise ShellError(f"cannot run {argv[0]}: {exc}") from exc
            # As a POSIX shell says it: 127 not found, 126 found but not executable.
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            return CommandResult(status, "", f"{argv[0]}: {exc.strerror}\n")
        async with process:
            try:
                with anyio.fail_after(timeout):
                    stdout, stderr = await _outputs(process)
            except BaseException as exc:
                # Timed out or cancelled: killing only the process would leave behind what
                # it started (a pipeline, a child in the background).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                if isinstance(exc, TimeoutError):
                    raise CommandTimeout(
                        f"{argv[0]} ran past its timeout of {timeout} s and was killed"
                    ) from None
                raise
        assert process.returncode is not None  # _outputs waited for it
        return CommandResult.from_output(process.returncode, stdout, stderr)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        await self._in_thread(lambda: write_private(self.home / path, data, mode=mode))

    async def read_file(self, path: str, *, max_bytes: int, tail: bool = False) -> bytes | None:
        return await self._in_thread(lambda: read_part(self.home / path, max_bytes, tail))

    async def remove_file(self, path: str) -> None:
        await self._in_thread(lambda: (self.home / path).unlink(missing_ok=True))

    async def realpath(self, path: str) -> str:
        return await self._in_thread(lambda: os.path.realpath(self.home / path))

    async def list_folder(self, path: str) -> list[FileInfo] | None:
        return await self._in_thread(lambda: _list_folder(self.home / path))

    async def resolve(self, path: str, *, within: str) -> FileInfo | None:
        return await self._in_thread(lambda: _resolve(self.home / path, self.home / within))

    async def read_chunks(self, path: str, *, offset: int = 0,
                          length: int | None = None) -> AsyncGenerator[bytes, None]:
        file = await self._in_thread(lambda: (self.home / path).open("rb"))
        try:
            remaining = length
            while remaining is None or remaining > 0:
                size = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
                chunk = await self._in_thread(
                    functools.partial(os.pread, file.fileno(), size, offset))
                if not chunk:
                    return
                offset += len(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            file.close()

    async def write_chunks(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o600) -> int:
        target = self.home / path
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        file = await self._in_thread(lambda: _create(temporary, mode))
        written = 0
        try:
            with file:
                async for chunk in chunks:
                    await self._in_thread(functools.partial(file.write, chunk))
                    written += len(chunk)
            await self._in_thread(lambda: os.replace(temporary, target))
        finally:
            temporary.unlink(missing_ok=True)
        return written

    async def close(self) -> None:
        """Refuse what comes next; nothing to release, every command is its own process."""
        self._closed = True

    async def _in_thread(self, operation: Callable[[], T]) -> T:
        """A file operation, off the event loop; its failure is a ShellError, as over SSH."""
        self._check_open()
        try:
            return await anyio.to_thread.run_sync(operation)
        except OSError as exc:
            raise ShellError(f"local shell: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise ShellError("the local shell is closed")


def read_part(path: Path, max_bytes: int, tail: bool) -> bytes | None:
    """The first (or last) ``max_bytes`` bytes of ``path``; None when it does not exist."""
    try:
        with path.open("rb") as file:
            if tail:
                file.seek(max(0, os.fstat(file.fileno()).st_size - max_bytes))
            return file.read(max_bytes)
    except FileNotFoundError:
        return None


def _create(path: Path, mode: int) -> BinaryIO:
    """A new file with ``mode`` from its first moment, its parents made private."""
    make_private_dirs(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)  # the umask may have narrowed it
    return os.fdopen(fd, "wb")


def _list_folder(folder: Path) -> list[FileInfo] | None:
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries = []
    for name in names:
        try:
            entries.append(_info(name, os.lstat(folder / name)))
        except FileNotFoundError:
            continue  # removed meanwhile
    return entries


def _resolve(path: Path, within: Path) -> FileInfo | None:
    try:
        resolved = os.path.realpath(path, strict=True)
        root = os.path.realpath(within, strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not inside(resolved, root):
        raise OutsideFolder("the path leads outside the folder it must stay in")
    try:
        return _info(resolved, os.stat(resolved))
    except FileNotFoundError:
        return None


def _info(name: str, status: os.stat_result) -> FileInfo:
    return FileInfo(name, file_kind(status.st_mode), status.st_size, status.st_mtime)


async def _outputs(process: Process) -> tuple[bytes, bytes]:
    """stdout and stderr of ``process`` once it has exited. Both are read side by side: a
    pipe nobody reads fills up and stalls the command."""
    outputs = [b"", b""]

    async def read(stream: ByteReceiveStream | None, index: int) -> None:
        assert stream is not None  # opened with pipes
        outputs[index] = b"".join([chunk async for chunk in stream])

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read, process.stdout, 0)
        tasks.start_soon(read, process.stderr, 1)
        await process.wait()
    return outputs[0], outputs[1]
