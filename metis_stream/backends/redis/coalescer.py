"""The append coalescer: many callers' runs of one Lua script, pipelined together.

I/O: it sends on the client it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


class Coalescer:
    """Runs one Lua script for many callers: calls that arrive while a round trip is in
    flight go together in the next one, pipelined on one connection.

    Under load this turns N appends into one pool checkout, one write and one read
    instead of N; alone, a call waits for no one. EVALSHA goes out directly (a redis-py
    pipeline would ask SCRIPT EXISTS first, every time); a server that lost its scripts
    (restarted) gets them loaded again once, and the calls are sent again: a script that
    was not found did not run, so nothing is appended twice.
    """

    def __init__(self, client: Redis, script: AsyncScript) -> None:
        self._client = client
        self._script = script
        self._waiting: list[tuple[Sequence[str], Sequence[str | int], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None
        """Held here: the event loop keeps only weak references to its tasks."""

    async def call(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((keys, args, future))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._run(batch)
        finally:
            self._drainer = None

    async def _run(self, batch: list[tuple[Sequence[str], Sequence[str | int],
                                           asyncio.Future[Any]]]) -> None:
        try:
            results = await self._send(batch)
            if any(isinstance(r, NoScriptError) for r in results):
                await self._client.script_load(self._script.script)
                results = await self._send(batch)
        except Exception as exc:  # the connection: every call of the batch fails alike
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue  # its caller gave up; what ran stays (ids make retries safe)
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, batch: list[tuple[Sequence[str], Sequence[str | int],
                                            asyncio.Future[Any]]]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results
