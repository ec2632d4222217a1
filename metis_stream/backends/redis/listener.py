"""The pub/sub listener: this process's one Redis pub/sub connection and its reader,
which hands every event published by any process to the hub.

I/O: it owns the connection and the task that reads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import TimeoutError as RedisTimeoutError

from metis_stream.backends.hub import Hub
from metis_stream.backends.redis.connection import CONNECTION_ERRORS, unavailable_on_errors
from metis_stream.backoff import Backoff
from metis_stream.errors import BackendUnavailable
from metis_stream.events import Event, decode_event

log = logging.getLogger(__name__)

class Listener:
    """This process's one pub/sub connection and the one task that reads it.

    The hub calls :meth:`_subscribe` for a job's first local watcher and
    :meth:`_unsubscribe` for its last. A broken connection is replaced with backoff;
    the new one subscribes every job the hub still has, and then every watcher is
    told to backfill from the log what it may have missed meanwhile.
    """

    def __init__(self, pool: ConnectionPool, channel_prefix: str, *, interval: float,
                 timeout: float, store_was_wiped: Callable[[], Awaitable[bool]],
                 on_event: Callable[[Event], None]) -> None:
        self.hub = Hub(on_first=self._subscribe, on_last=self._unsubscribe)
        self._pool = pool
        self._prefix = channel_prefix
        self._interval = interval
        self._timeout = timeout
        self._store_was_wiped = store_was_wiped
        self._on_event = on_event
        self._conn: AbstractConnection | None = None
        self._confirmations: dict[bytes, deque[asyncio.Future[None]]] = {}
        self._ping_pending = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with unavailable_on_errors():
            await self._connect()
        self._task = asyncio.create_task(self._run(), name="metis-stream redis pub/sub")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._drop()

    def channel(self, job_id: str) -> bytes:
        return (self._prefix + job_id).encode()

    async def _subscribe(self, job_id: str) -> None:
        """SUBSCRIBE, and return only once Redis confirms: follow() reads the log next."""
        conn = self._conn
        # A connection that is down must not be re-opened here behind the reader's back
        # (send_command would); the reader reconnects and subscribes this job itself.
        if conn is None or not conn.is_connected:
            raise BackendUnavailable("Redis pub/sub is reconnecting")
        channel = self.channel(job_id)
        confirmed = self._expect(channel)
        try:
            await conn.send_command("SUBSCRIBE", channel, check_health=False)
            async with asyncio.timeout(self._timeout):
                await confirmed
        except (*CONNECTION_ERRORS, TimeoutError) as exc:
            raise BackendUnavailable(f"Redis did not confirm SUBSCRIBE: {exc!r}") from exc

    async def _unsubscribe(self, job_id: str) -> None:
        conn = self._conn
        if conn is None or not conn.is_connected:
            return  # the next connection subscribes only the jobs the hub still has
        try:
            await conn.send_command("UNSUBSCRIBE", self.channel(job_id), check_health=False)
        except CONNECTION_ERRORS:
            return  # the reader notices the broken connection and reconnects

    def _expect(self, channel: bytes) -> asyncio.Future[None]:
        """A future resolved by the reader at this channel's next subscribe confirmation;
        Redis confirms in the order the SUBSCRIBEs were sent, hence a FIFO per channel."""
        future = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, deque()).append(future)
        return future

    async def _run(self) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                    backoff.reset()
                await self._read()
            except Exception as exc:
                # Whatever broke (the connection, or a message that would not decode), a
                # fresh connection and a backfill from the log lose nothing; a dead reader would
                # leave every watcher of this process waiting forever.
                log.warning("Redis pub/sub reader failed (%r); reconnecting", exc,
                            exc_info=not isinstance(exc, CONNECTION_ERRORS))
                await self._drop()
                await asyncio.sleep(backoff.next_delay())

    async def _connect(self) -> None:
        """A new connection, subscribed to every job the hub has, then every watcher
        backfills: what was published while no connection listened is only in the log."""
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        self._conn = conn
        self._ping_pending = False
        channels = [self.channel(job_id) for job_id in self.hub.job_ids]
        if channels:
            confirmations = [self._expect(channel) for channel in channels]
            await conn.send_command("SUBSCRIBE", *channels, check_health=False)
            while not all(future.done() for future in confirmations):
                response = await conn.read_response(timeout=self._timeout)
                if response is None:
                    raise RedisTimeoutError("no SUBSCRIBE confirmation from Redis")
                self._handle(response)
        self.hub.mark_all_lagged()

    async def _read(self) -> None:
        """Read messages; every ``interval`` seconds PING (a half-open connection never
        answers) and check the store was not wiped under a connection that stayed up."""
        assert self._conn is not None
        conn = self._conn
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._interval
        while True:
            response = await conn.read_response(timeout=max(0.0, next_check - loop.time()))
            if response is not None:
                self._ping_pending = False
                self._handle(response)
                continue
            if self._ping_pending:
                raise RedisTimeoutError(f"no answer to PING within {self._interval}s")
            self._ping_pending = True
            await conn.send_command("PING", check_health=False)
            if await self._store_was_wiped():
                log.warning("Redis lost its data (flushed or replaced); watchers re-read logs")
                self.hub.mark_all_lagged()
            next_check = loop.time() + self._interval

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list):
            return  # the PONG of a connection that has no subscription
        kind = response[0]
        if kind == b"message":
            # One message per append: its events' JSON, a line each (encoded JSON never
            # holds a raw newline).
            for wire in response[2].split(b"\n"):
                event = decode_event(wire)
                self._on_event(event)
                self.hub.publish(event.job, event)
        elif kind == b"subscribe":
            waiting = self._confirmations.get(response[1])
            if waiting:
                future = waiting.popleft()
                if not waiting:
                    del self._confirmations[response[1]]
                if not future.done():  # its subscriber may have timed out or left
                    future.set_result(None)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        for waiting in self._confirmations.values():
            for future in waiting:
                if not future.done():
                    future.set_exception(BackendUnavailable("Redis pub/sub connection lost"))
        self._confirmations.clear()
        if conn is not None:
            await conn.disconnect(nowait=True)
