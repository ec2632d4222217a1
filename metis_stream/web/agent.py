"""The routes of metis-agent (docs/agent.md): ``GET /agent`` serves the agent itself and
its SHA-256; the agent, with its cluster's agent key, long-polls for operations and posts
its replies. Any server process serves any agent: operations and replies go through the
backend (metis_stream.shells.agent)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import replace
from functools import cache

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from metis_stream import tokens
from metis_stream.clusters import AgentPresence
from metis_stream.config import AGENT_SCRIPT, Config
from metis_stream.errors import BadInput, NotAllowed, NotAuthenticated
from metis_stream.web.api import body_chunks, service_of
from metis_stream.web.auth import bearer

logger = logging.getLogger(__name__)

POLL_SECONDS = 25.0
"""How long a poll is held open without an operation (the agent waits longer for it)."""
POLL_SLICE = 1.0
"""A poll takes operations in slices this long, and stops when its agent has gone."""
PRESENCE_EVERY = 5.0
"""How often a held poll tells that its agent is there (clusters.AGENT_AWAY_AFTER)."""
OPERATIONS_PER_POLL = 32
MAX_POLL_BYTES = 64 * 1024
MAX_REPLY_BYTES = 64 << 20
"""A reply carries a command's output (at most 16 MiB on each stream, as base64)."""


@cache
def agent_file() -> tuple[bytes, str]:
    """metis-agent's bytes and their SHA-256, read once."""
    data = AGENT_SCRIPT.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


async def get_agent(request: Request) -> Response:
    """The agent, for ``curl -o metis-agent``; its hash in ``X-Metis-Agent-SHA256``."""
    data, digest = agent_file()
    return Response(data, media_type="text/x-python", headers={
        "X-Metis-Agent-SHA256": digest,
        "Content-Disposition": 'attachment; filename="metis-agent"'})


async def get_agent_hash(request: Request) -> Response:
    """``sha256sum -c`` reads it: the hash, two spaces, the file's name."""
    return PlainTextResponse(f"{agent_file()[1]}  metis-agent\n")


def agent_cluster(request: Request, config: Config) -> str:
    """The cluster whose agent key the request carries; NotAuthenticated otherwise. Every
    agent key is compared, in constant time."""
    given = bearer(request)
    hashed = tokens.hash_api_key(given or "").encode()
    found = None
    for name, cluster in config.clusters.items():
        if cluster.link == "agent" and hmac.compare_digest(cluster.agent_key.encode(), hashed):
            found = name
    if given is None or found is None:
        logger.warning("an agent with a key of no cluster's was refused (from %s)",
                       request.client.host if request.client else "unknown")
        raise NotAuthenticated("a valid agent key is required (Authorization: Bearer <key>); "
                               "check the key file the agent was started with")
    return found


async def _json_body(request: Request, limit: int) -> dict[str, object]:
    body = b"".join([chunk async for chunk in body_chunks(request, limit)])
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadInput("the body must be a JSON object") from None
    if not isinstance(parsed, dict):
        raise BadInput("the body must be a JSON object")
    return parsed


async def agent_poll(request: Request) -> Response:
    """Hold the line up to POLL_SECONDS, and answer with the operations that came for the
    agent's cluster (as soon as there is one)."""
    service = service_of(request)
    cluster = agent_cluster(request, service.config)
    hello = await _json_body(request, MAX_POLL_BYTES)
    backend = service.backend
    now = time.time()
    presence = (await backend.agent_presence()).get(cluster) or AgentPresence(cluster)
    returning = not presence.connected(now)
    if returning:
        last_error = str(hello.get("last_error") or "")[:500]
        logger.info("the agent of cluster %s connected%s", cluster,
                    f" (it had lost its link: {last_error})" if last_error else "")
        presence = replace(presence, since=now, last_error=last_error)
    presence = replace(presence, seen=now)
    await backend.set_agent_presence(presence)
    operations: list[bytes] = []
    # An agent that comes back hears at once that its key is good (it says it connected).
    deadline = now if returning else now + POLL_SECONDS
    while not operations and time.time() < deadline:
        if await request.is_disconnected():
            # Taking an operation now would lose it: nobody would carry it out.
            return Response(status_code=204)
        operations = await backend.agent_take(cluster, wait=POLL_SLICE,
                                              limit=OPERATIONS_PER_POLL)
        if time.time() - presence.seen >= PRESENCE_EVERY:
            presence = replace(presence, seen=time.time())
            await backend.set_agent_presence(presence)
    # Each operation is JSON already, sent as it was queued.
    body = b'{"cluster":' + orjson.dumps(cluster) + b',"operations":[' + b",".join(
        operations) + b"]}"
    return Response(body, media_type="application/json")


async def agent_reply(request: Request) -> Response:
    """Hand a reply to the shell that waits for it, on whichever process it runs."""
    service = service_of(request)
    cluster = agent_cluster(request, service.config)
    body = b"".join([chunk async for chunk in body_chunks(request, MAX_REPLY_BYTES)])
    try:
        reply = orjson.loads(body)
        inbox = reply["reply_to"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise BadInput("a reply is a JSON object with id and reply_to") from None
    if not isinstance(inbox, str) or not inbox.startswith(f"{cluster}:"):
        raise NotAllowed("a reply goes only to its own cluster's operations")
    # Shielded: a reply the agent sent reaches its caller even if the request goes away.
    with anyio.CancelScope(shield=True):
        await service.backend.agent_reply(inbox, body)
    return Response(status_code=204)
