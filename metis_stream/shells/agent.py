"""The ``agent`` shell: a cluster reached through ``metis-agent``, which dials out to the
server (docs/agent.md).

Each call becomes one typed operation (metis_stream/metis_agent.py carries them out) put
in the cluster's queue in the backend; the agent's long poll takes it on whichever server
process it reached, and its reply comes back, through any process, to this shell's inbox.
An operation that no agent takes within ``wait`` seconds is taken back out of the queue,
so it never runs later, and the call fails with AgentAway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import posixpath
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from typing import Any

import orjson

from metis_stream.backends.contract import Backend
from metis_stream.errors import (
    AgentAway,
    BackendUnavailable,
    CommandTimeout,
    ConnectionLost,
    OperationRefused,
    OutsideFolder,
    ShellError,
    UnsafeArgument,
)
from metis_stream.shells.base import CHUNK_BYTES, CommandResult, FileInfo, check_argv

__all__ = [
    "AgentShell",
]

logger = logging.getLogger(__name__)

DEFAULT_WAIT = 30.0
"""Seconds an operation waits for an agent to take it (``[clusters.X] agent_wait``)."""
REPLY_MARGIN = 30.0
"""Seconds, past a command's own timeout, that its reply may take to come back."""
UNTIMED_OPERATION = 300.0
"""Seconds a taken operation without a timeout of its own (a file) may take."""
PRESENCE_CHECK = 2.0
"""Seconds between looks at the agent's presence while a taken operation runs: an agent
killed mid-operation never replies, and its cluster must not wait out the whole limit to
show unreachable."""
INBOX_WAIT = 1.0


class AgentShell:
    """The Shell protocol over a cluster's agent, through ``backend``; also SpoolReading:
    the agent reads and sweeps spools itself, since it runs no ``sh``."""

    def __init__(self, cluster: str, backend: Backend, *, wait: float = DEFAULT_WAIT) -> None:
        self.cluster = cluster
        self._backend = backend
        self._wait = wait
        self._inbox = f"{cluster}:{secrets.token_hex(8)}"
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    async def run(self, argv: Sequence[str], *, timeout: float | None = None,
                  idempotent: bool = True) -> CommandResult:
        """One command, run by the agent if its allowlist has it. Nothing is retried here,
        so ``idempotent`` changes nothing."""
        check_argv(argv)
        result = await self._call("run", {"argv": list(argv), "timeout": timeout},
                                  timeout=timeout, what=argv[0])
        return CommandResult.from_output(int(result["exit"]), _bytes(result["stdout"]),
                                         _bytes(result["stderr"]))

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        await self._write(path, data, mode, "replace")

    async def read_file(self, path: str, *, max_bytes: int, tail: bool = False) -> bytes | None:
        result = await self._call("read", {"path": path, "offset": 0, "length": max_bytes,
                                           "tail": tail})
        return None if result.get("missing") else _bytes(result["data"])

    async def remove_file(self, path: str) -> None:
        await self._call("remove", {"path": path})

    async def realpath(self, path: str) -> str:
        return str((await self._call("realpath", {"path": path}))["path"])

    async def list_folder(self, path: str) -> list[FileInfo] | None:
        entries = (await self._call("list", {"path": path}))["entries"]
        return None if entries is None else [_info(entry) for entry in entries]

    async def resolve(self, path: str, *, within: str) -> FileInfo | None:
        found = (await self._call("resolve", {"path": path, "within": within}))["found"]
        return None if found is None else _info(found)

    async def read_chunks(self, path: str, *, offset: int = 0,
                          length: int | None = None) -> AsyncGenerator[bytes, None]:
        remaining = length
        while remaining is None or remaining > 0:
            size = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
            result = await self._call("read", {"path": path, "offset": offset,
                                               "length": size})
            if result.get("missing"):
                raise ShellError(f"no such file on {self.cluster}: {path}")
            chunk = _bytes(result["data"])
            if not chunk:
                return
            offset += len(chunk)
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk

    async def write_chunks(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o600) -> int:
        folder, name = posixpath.split(path)
        temporary = posixpath.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        await self._write(temporary, b"", mode, "create")
        written = 0
        try:
            async for chunk in chunks:
                await self._write(temporary, chunk, mode, "append")
                written += len(chunk)
            await self._call("rename", {"source": temporary, "target": path})
        except BaseException:
            with contextlib.suppress(ShellError, OutsideFolder):
                await self._call("remove", {"path": temporary})
            raise
        return written

    async def read_spools(self, jobs_dir: str, words: Sequence[str], boundary: str, *,
                          timeout: float | None) -> bytes:
        result = await self._call("read_spools", {"jobs_dir": jobs_dir, "reads": list(words),
                                                  "boundary": boundary}, timeout=timeout)
        return _bytes(result["output"])

    async def remove_old_spools(self, jobs_dir: str, minutes: int, *,
                                timeout: float | None) -> None:
        await self._call("sweep_spools", {"jobs_dir": jobs_dir, "minutes": minutes},
                         timeout=timeout)

    async def close(self) -> None:
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            # Not cancelled: redis-py swallows a cancel that lands in a blocking read; the
            # reader sees the flag within INBOX_WAIT.
            await asyncio.gather(reader, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ShellError(f"the agent shell of {self.cluster} is closed"))

    async def _write(self, path: str, data: bytes, mode: int, how: str) -> None:
        await self._call("write", {"path": path, "data": base64.b64encode(data).decode(),
                                   "mode": mode, "how": how})

    async def _call(self, operation: str, args: dict[str, Any], *,
                    timeout: float | None = None, what: str = "") -> dict[str, Any]:
        """Send one operation and wait for its reply: up to ``wait`` seconds for an agent
        to take it, then as long as it may run."""
        if self._closed:
            raise ShellError(f"the agent shell of {self.cluster} is closed")
        self._start_reader()
        operation_id = secrets.token_hex(12)
        payload = orjson.dumps({"id": operation_id, "reply_to": self._inbox, "op": operation,
                                "args": args})
        future = self._waiting[operation_id] = asyncio.get_running_loop().create_future()
        try:
            await self._send(payload)
            try:
                async with asyncio.timeout(self._wait):
                    reply = await asyncio.shield(future)
            except TimeoutError:
                if await self._backend.agent_withdraw(self.cluster, payload):
                    raise AgentAway(
                        f"the agent of cluster {self.cluster} did not take the operation "
                        f"within {self._wait:g} s: it is not connected (start metis-agent "
                        "on the cluster: docs/agent.md); nothing ran") from None
                limit = (timeout if timeout is not None else UNTIMED_OPERATION) + REPLY_MARGIN
                reply = await self._reply(future, operation, limit)
        finally:
            self._waiting.pop(operation_id, None)
        return self._result(operation, what, reply)

    async def _reply(self, future: asyncio.Future[dict[str, Any]], operation: str,
                     limit: float) -> dict[str, Any]:
        """The reply to an operation the agent took: within ``limit`` seconds, and only
        while the agent is connected (its presence); ConnectionLost otherwise."""
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost(
                    f"the agent of cluster {self.cluster} took {operation} but sent no "
                    f"reply within {limit:g} s: it may or may not have run")
            try:
                async with asyncio.timeout(min(PRESENCE_CHECK, left)):
                    return await asyncio.shield(future)
            except TimeoutError:
                if not await self._agent_connected():
                    raise ConnectionLost(
                        f"the agent of cluster {self.cluster} took {operation} and lost its "
                        "link before it replied: it may or may not have run") from None

    async def _agent_connected(self) -> bool:
        try:
            presence = (await self._backend.agent_presence()).get(self.cluster)
        except BackendUnavailable:
            return True  # no news of it is no news that it left: wait on to the limit
        return presence is not None and presence.connected(time.time())

    async def _send(self, payload: bytes) -> None:
        try:
            await self._backend.agent_send(self.cluster, payload)
        except BackendUnavailable as exc:
            raise ShellError(f"cannot queue an operation for the agent of {self.cluster}: "
                             f"{exc}") from exc

    def _result(self, operation: str, what: str, reply: dict[str, Any]) -> dict[str, Any]:
        error = reply.get("error")
        if not isinstance(error, dict):
            result = reply.get("result")
            if not isinstance(result, dict):
                raise ShellError(f"the agent of {self.cluster} sent a reply without a result")
            return result
        kind, message = error.get("kind"), str(error.get("message", ""))[:500]
        if kind == "timeout":
            raise CommandTimeout(message)
        if kind == "failed":
            raise ShellError(f"agent of {self.cluster}: {message}")
        if kind == "outside":
            raise OutsideFolder(message)
        if kind == "unsafe":
            raise UnsafeArgument(message)
        logger.warning("the agent of cluster %s refused %s %s: %s", self.cluster, operation,
                       what, message)
        raise OperationRefused(f"the agent of cluster {self.cluster} refused {operation}: "
                               f"{message}")

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_replies(),
                                               name=f"metis-stream agent {self._inbox}")

    async def _read_replies(self) -> None:
        """Hand each reply in this shell's inbox to the call that waits for it."""
        while not self._closed:
            try:
                replies = await self._backend.agent_replies(self._inbox, wait=INBOX_WAIT)
            except BackendUnavailable as exc:
                logger.warning("agent replies of %s: %s; retrying", self.cluster, exc)
                await asyncio.sleep(1.0)
                continue
            for raw in replies:
                try:
                    reply = orjson.loads(raw)
                    future = self._waiting.get(reply["id"])
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    logger.warning("agent of %s: a reply that is not one: %r", self.cluster,
                                   raw[:200])
                    continue
                if future is not None and not future.done():
                    future.set_result(reply)


def _bytes(text: object) -> bytes:
    if not isinstance(text, str):
        raise ShellError("the agent sent data that is not base64 text")
    return base64.b64decode(text)


def _info(raw: dict[str, Any]) -> FileInfo:
    return FileInfo(str(raw["name"]), raw["kind"], int(raw["size"]), float(raw["modified"]))
