"""A job's folder on its cluster as the files API serves it (docs/files.md): the list of
its files, one file's bytes, and the inputs a submission uploads into ``inputs/``.

A client's path is checked twice: here, before anything is asked of the cluster
(``relative_path``, pure), and on the cluster, where ``Shell.resolve`` follows every
symbolic link and refuses a path that ends up outside the folder. Only the resolved
path is ever read.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass

from metis_stream.errors import NotFound, OutsideFolder, TooLarge, UnsafePath
from metis_stream.shells.base import FileInfo, Shell

__all__ = [
    "INPUTS_FOLDER",
    "FileEntry",
    "JobFolder",
    "Listing",
    "input_name",
    "limited",
    "relative_path",
]

INPUTS_FOLDER = "inputs"
PRIVATE_NAMES = frozenset({"token", "spec.json", "env"})
"""The job's secrets and the values that stand in for its environment: never listed,
never served, whoever asks (a watch token must not give the job's own token)."""
MAX_PATH_CHARS = 1024
MAX_NAME_CHARS = 255
MAX_LISTED = 5000
"""Entries one listing looks at; a folder with more is listed in part (``truncated``)."""
MAX_DEPTH = 16


def relative_path(raw: str) -> str:
    """A client's path of a file in a job's folder, normalised (``a//./b`` is ``a/b``), or
    UnsafePath that says why it cannot be one."""
    if not raw or len(raw) > MAX_PATH_CHARS:
        raise UnsafePath(f"a file path must have 1 to {MAX_PATH_CHARS} characters")
    if any(not character.isprintable() for character in raw):
        raise UnsafePath("a file path must not contain control characters")
    if raw.startswith("/") or "\\" in raw:
        raise UnsafePath("a file path must be relative to the job's folder, with / between "
                         "folders")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafePath("a file path must not contain '..'")
    if not parts:
        raise UnsafePath("a file path must name a file")
    if any(len(part.encode()) > MAX_NAME_CHARS for part in parts):
        raise UnsafePath(f"a file name may be at most {MAX_NAME_CHARS} bytes")
    return "/".join(parts)


def input_name(raw: str) -> str:
    """The name an uploaded input gets in ``inputs/``: one file name, as the client gave it,
    not hidden (the upload's temporary file is hidden), or UnsafePath."""
    name = relative_path(raw)
    if "/" in name or name.startswith("."):
        raise UnsafePath(f"an input's file name must be a plain name, not a path or a hidden "
                         f"file: {raw[:100]!r}")
    return name


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a job's folder, as a listing gives it."""

    path: str
    """Relative to the job's folder, with ``/`` between folders."""
    size: int
    modified: float
    output: bool = False
    """It matches one of the template's ``outputs``."""

    def as_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "modified": self.modified,
                "output": self.output}


@dataclass(frozen=True, slots=True)
class Listing:
    files: list[FileEntry]
    truncated: bool
    """The folder held more than MAX_LISTED entries: only the first ones are here."""


@dataclass(frozen=True, slots=True)
class JobFolder:
    """``<workdir>/jobs/<id>/`` on the job's cluster, and the shell that reaches it
    (``Scheduler.job_folder``)."""

    shell: Shell
    path: str
    """As the shell takes it: relative to its home, or absolute."""

    async def listing(self, is_output: Callable[[str], bool]) -> Listing:
        """Every regular file in the folder and its subfolders, the private ones left out.
        A symbolic link is listed as the file it leads to when that is in the folder, and
        left out otherwise; links to folders are not followed (they could loop)."""
        files: list[FileEntry] = []
        pending = [""]
        seen = 0
        while pending:
            folder = pending.pop(0)
            entries = await self.shell.list_folder(self._join(folder))
            if entries is None:
                if folder:
                    continue  # removed meanwhile
                raise NotFound("the job has no files (yet)")
            for entry in sorted(entries, key=lambda entry: entry.name):
                seen += 1
                if seen > MAX_LISTED:
                    return Listing(_sorted(files), truncated=True)
                path = posixpath.join(folder, entry.name) if folder else entry.name
                if _private(path) or _temporary(entry.name):
                    continue
                info: FileInfo | None = entry
                if entry.kind == "link":
                    with contextlib.suppress(OutsideFolder):
                        info = await self._resolved(path)
                if info is None:
                    continue
                if info.kind == "folder" and entry.kind == "folder":
                    if path.count("/") < MAX_DEPTH:
                        pending.append(path)
                elif info.kind == "file":
                    files.append(FileEntry(path, info.size, info.modified, is_output(path)))
        return Listing(_sorted(files), truncated=False)

    async def find(self, path: str) -> FileInfo:
        """The regular file at ``path`` (from ``relative_path``), resolved on the cluster:
        its info names the real path to read. NotFound when there is none, or when it is
        one of the job's private files; OutsideFolder when it leads out of the folder."""
        if _private(path):
            raise NotFound("no such file")
        info = await self._resolved(path)
        if info is None or info.kind != "file":
            raise NotFound("no such file" if info is None else "not a file")
        return info

    def read(self, info: FileInfo, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """``length`` bytes of the file ``find`` found, from ``offset``."""
        return self.shell.read_chunks(info.name, offset=offset, length=length)

    async def store_input(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        """Write one uploaded input (``input_name``) into ``inputs/``, streamed; its size."""
        return await self.shell.write_chunks(
            self._join(f"{INPUTS_FOLDER}/{name}"), chunks, mode=0o600)

    async def remove_inputs(self, names: list[str]) -> None:
        """Remove uploaded inputs of a submission that did not go through."""
        for name in names:
            await self.shell.remove_file(self._join(f"{INPUTS_FOLDER}/{name}"))

    async def _resolved(self, path: str) -> FileInfo | None:
        """What ``path`` leads to, resolved on the cluster; None for nothing, or for one
        of the private files (a link to the token)."""
        info = await self.shell.resolve(self._join(path), within=self.path)
        if info is None:
            return None
        root = await self.shell.realpath(self.path)
        return None if _private(info.name[len(root):].lstrip("/")) else info

    def _join(self, path: str) -> str:
        return f"{self.path}/{path}" if path else self.path


def limited(chunks: AsyncIterable[bytes], limit: int, what: str) -> AsyncIterator[bytes]:
    """``chunks``, refused with TooLarge once more than ``limit`` bytes have come."""

    async def counted() -> AsyncIterator[bytes]:
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"{what} may be at most {limit} bytes")
            yield chunk

    return counted()


def _private(path: str) -> bool:
    return path.split("/", 1)[0] in PRIVATE_NAMES


def _temporary(name: str) -> bool:
    """A file being written (metis-stream's, or the launcher's ``.exit.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def _sorted(files: list[FileEntry]) -> list[FileEntry]:
    return sorted(files, key=lambda entry: entry.path)

