"""The naive peer of issue 7: Starlette + encode/broadcaster on Redis, written the way
broadcaster's README shows: one POST route that publishes, one websocket route that
subscribes. No seqs, no log, no auth, no backfill: what a quick implementation does.

It uses the same paths as metis-stream so that bench/load.py drives both alike:

- ``POST /api/jobs/{job_id}/events``: a JSON body is published as it is; an NDJSON body
  (with Content-Length or streamed) is published line by line, as its lines arrive.
- ``WS /ws/jobs/{job_id}``: subscribes to the job's channel and forwards every message.
  After subscribing it sends one ``{"ready": true}`` frame (the only addition to the
  README's shape), so that the load generator starts posting only once it is listening.

Needs ``pip install broadcaster`` (not a dependency of metis-stream).

    python -m bench.naive_peer --port 8100 --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import anyio
import uvicorn
from broadcaster import Broadcast
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

NDJSON = "application/x-ndjson"


def create_app(redis_url: str) -> Starlette:
    broadcast = Broadcast(redis_url)

    async def publish(request: Request) -> Response:
        channel = request.path_params["job_id"]
        if request.headers.get("content-type", "").startswith(NDJSON):
            count = 0
            pending = b""
            async for chunk in request.stream():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        await broadcast.publish(channel=channel, message=line.decode())
                        count += 1
            if pending.strip():
                await broadcast.publish(channel=channel, message=pending.decode())
                count += 1
            return JSONResponse({"published": count})
        body = await request.body()
        await broadcast.publish(channel=channel, message=body.decode())
        return JSONResponse({"published": 1})

    async def watch(websocket: WebSocket) -> None:
        await websocket.accept()
        channel = websocket.path_params["job_id"]
        async with anyio.create_task_group() as tasks:

            async def receiver() -> None:
                with contextlib.suppress(Exception):
                    async for _ in websocket.iter_text():
                        pass
                tasks.cancel_scope.cancel()

            tasks.start_soon(receiver)
            async with broadcast.subscribe(channel=channel) as subscriber:
                await websocket.send_text('{"ready": true}')
                async for event in subscriber:
                    await websocket.send_text(event.message)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await broadcast.connect()
        try:
            async with contextlib.AsyncExitStack() as anchors:
                await _anchor(broadcast, anchors)
                yield
        finally:
            await broadcast.disconnect()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    return Starlette(routes=[
        Route("/healthz", healthz),
        Route("/api/jobs/{job_id}/events", publish, methods=["POST"]),
        WebSocketRoute("/ws/jobs/{job_id}", watch),
    ], lifespan=lifespan)


async def _anchor(broadcast: Broadcast, stack: contextlib.AsyncExitStack) -> None:
    """Keep one channel subscribed for the life of the process, checked with a probe.

    The one workaround of a broadcaster 0.3.1 bug: its listener task leaves redis-py's
    ``PubSub.listen()``, which returns at once while no channel is subscribed, and then
    waits for a ``_ready`` event that ``subscribe`` sets *before* the channel is
    registered. A listener that wakes in between, or whose ``listen()`` ends when the last
    watcher of the last channel leaves just as a new one subscribes, waits forever while
    channels are subscribed: every message is lost from then on. A channel that is never
    unsubscribed keeps ``listen()`` running, so neither can happen after this returns.
    """
    for attempt in range(50):
        channel = f"naive-peer-anchor-{attempt}"
        subscriber = await stack.enter_async_context(broadcast.subscribe(channel=channel))
        await broadcast.publish(channel=channel, message="probe")
        with anyio.move_on_after(0.2):
            await subscriber.get()
            return
    raise RuntimeError("broadcaster's listener never received the probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    # The same uvicorn settings as `metis-stream serve`, so the comparison is like for like.
    uvicorn.run(create_app(args.redis), host=args.host, port=args.port, log_level="info",
                ws_ping_interval=20, ws_ping_timeout=20)


if __name__ == "__main__":
    main()
