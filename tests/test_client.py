"""The async Python client (metis_stream.client.Client) against a real server process."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Awaitable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import websockets

from metis_stream.client import Client
from metis_stream.errors import ClientError
from metis_stream.events import TERMINAL_TYPES
from metis_stream.jobs import state_machine
from metis_stream.tokens import hash_api_key
from tests.support.processes import end_group
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess, free_port, local_job_script

UNKNOWN_JOB = "j_01M87P14J6V8D2MYD25J6MJ0B2"
WORDS = [f"c{n}" for n in range(15)]
TEXT = " ".join(WORDS)


async def wait_for_state(client: Client, job_id: str, state: str, timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while (await client.get(job_id))["state"] != state:
            await asyncio.sleep(0.05)


async def wait_until_ended(client: Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            job = await client.get(job_id)
            if job["state"] in ("completed", "failed", "cancelled"):
                return job
            await asyncio.sleep(0.05)


def token_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "token")


def assert_exactly_once(events: list[dict[str, Any]], text: str = TEXT) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "starting"
    assert events[-1]["type"] == "completed"
    assert sum(e["type"] in TERMINAL_TYPES for e in events) == 1
    assert token_text(events) == text


async def test_submit_get_jobs_cancel_and_history(live_server: ServerProcess):
    async with Client(live_server.url) as client:
        templates = {t["name"] for t in await client.templates()}
        assert {"tokens", "download"} <= templates

        slow = await client.submit("tokens", {"text": "a b c d e f", "delay": 3})
        assert slow["id"].startswith("j_")
        assert slow["template"] == "tokens"
        assert slow["watch_url"] == f"/ws/jobs/{slow['id']}"
        fast = await client.submit("tokens", {"text": "quick one", "delay": 0})
        await wait_for_state(client, slow["id"], "running")
        assert (await wait_until_ended(client, fast["id"]))["state"] == "completed"

        got = await client.get(slow["id"])
        assert (got["id"], got["state"], got["params"]) == (
            slow["id"], "running", {"text": "a b c d e f", "delay": 3.0})
        assert [j["id"] for j in await client.jobs("running")] == [slow["id"]]
        assert [j["id"] for j in await client.jobs("completed")] == [fast["id"]]
        assert [j["id"] for j in await client.jobs()] == [fast["id"], slow["id"]]
        assert await client.jobs("cancelled") == []

        cancelled = await client.cancel(slow["id"])
        assert cancelled["state"] == "cancelled"
        assert [j["id"] for j in await client.jobs("cancelled")] == [slow["id"]]
        events = await client.history(slow["id"])
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "cancelled"
        assert await client.history(slow["id"], after=2) == events[2:]
        assert await client.history(slow["id"], after=len(events)) == []

        finished = await client.history(fast["id"])
        assert finished[-1]["type"] == "completed"
        assert finished[-1]["data"] == {"text": "quick one", "tokens": 2}

        with pytest.raises(ClientError) as again:
            await client.cancel(slow["id"])
        assert again.value.status == 409


async def test_watch_yields_every_event_once_and_ends_after_the_terminal(
        live_server: ServerProcess):
    async with Client(live_server.url) as client:
        job = await client.submit("tokens", {"text": TEXT, "delay": 0.03})
        assert (await client.get(job["id"]))["state"] not in ("completed", "failed")
        watched = [event async for event in client.watch(job["id"])]
        assert_exactly_once(watched)
        assert watched == await client.history(job["id"])
        # After the end: a replay, and one from the middle.
        assert [event async for event in client.watch(job["id"])] == watched
        assert [event async for event in client.watch(job["id"], after=5)] == watched[5:]
        last = len(watched) - 1
        assert [event async for event in client.watch(job["id"], after=last)] == watched[-1:]


async def test_watch_after_the_terminal_seq_ends_at_once_with_nothing(
        live_server: ServerProcess):
    async with Client(live_server.url, give_up_after=2, max_retry_delay=0.2) as client:
        job = await client.submit("tokens", {"text": "short", "delay": 0})
        ended = await wait_until_ended(client, job["id"])
        async with asyncio.timeout(10):
            rest = [event async for event in client.watch(job["id"], after=ended["last_seq"])]
        assert rest == []


async def test_unknown_job_is_404_everywhere(live_server: ServerProcess):
    async with Client(live_server.url) as client:
        for call in (client.get(UNKNOWN_JOB), client.cancel(UNKNOWN_JOB),
                     client.history(UNKNOWN_JOB)):
            with pytest.raises(ClientError) as caught:
                await call
            assert caught.value.status == 404
            assert "unknown job" in caught.value.message.lower()
        with pytest.raises(ClientError) as watched:
            async with asyncio.timeout(10):
                async for _ in client.watch(UNKNOWN_JOB):
                    pass
        assert watched.value.status == 404


async def test_an_unknown_template_is_422(live_server: ServerProcess):
    async with Client(live_server.url) as client:
        with pytest.raises(ClientError) as caught:
            await client.submit("no-such-template")
        assert caught.value.status == 422


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(state_dir=tmp_path / "keyed",
                           server_settings={"api_keys": [hash_api_key("right-key")]})
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_wrong_key_is_401_and_the_right_one_works(keyed_server: ServerProcess):
    async with Client(keyed_server.url, key="right-key") as good:
        job = await good.submit("tokens", {"text": "keyed words", "delay": 0})
        events = [event async for event in good.watch(job["id"])]
        assert_exactly_once(events, "keyed words")
    for key in ("wrong-key", None):
        async with Client(keyed_server.url, key=key) as bad:
            for call in (bad.jobs(), bad.get(job["id"]), bad.submit("tokens"),
                         bad.history(job["id"]), bad.cancel(job["id"])):
                with pytest.raises(ClientError) as caught:
                    await call
                assert caught.value.status == 401, key
            with pytest.raises(ClientError) as watched:
                async with asyncio.timeout(10):
                    async for _ in bad.watch(job["id"]):
                        pass
            assert watched.value.status == 401, key


async def test_a_client_key_sees_only_its_own_jobs_and_filters_by_end_user(tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "named", server_settings={"keys": {
        "a": {"key": hash_api_key("key-a")}, "b": {"key": hash_api_key("key-b")}}})
    server.start()
    try:
        async with Client(server.url, key="key-a") as a, Client(server.url, key="key-b") as b:
            job = await a.submit("tokens", {"text": "mine", "delay": 0}, user="u-7")
            other = await a.submit("tokens", {"text": "also mine", "delay": 0})
            assert (job["owner"], job["user"]) == ("a", "u-7")
            assert [j["id"] for j in await a.jobs(user="u-7")] == [job["id"]]
            assert [j["id"] for j in await a.jobs()] == [other["id"], job["id"]]
            assert await b.jobs() == [] and await b.jobs(user="u-7") == []
            for call in (b.get(job["id"]), b.cancel(job["id"]), b.history(job["id"])):
                with pytest.raises(ClientError) as caught:
                    await call
                assert (caught.value.status, caught.value.message) == (404, "unknown job")
            with pytest.raises(ClientError) as watched:
                async with asyncio.timeout(10):
                    async for _ in b.watch(job["id"]):
                        pass
            assert watched.value.status == 404
            with pytest.raises(ClientError) as refused:
                await a.submit("tokens", user="not an id")
            assert refused.value.status == 400
            for done in (job, other):
                assert_exactly_once([e async for e in a.watch(done["id"])],
                                    "mine" if done is job else "also mine")
    finally:
        server.stop()


def every_call(client: Client) -> list[Awaitable[Any]]:
    """One of each call that talks to the server, ``watch`` up to its first event."""
    return [client.templates(), client.submit("tokens"), client.get(UNKNOWN_JOB),
            client.jobs(), client.cancel(UNKNOWN_JOB), client.history(UNKNOWN_JOB),
            anext(client.watch(UNKNOWN_JOB))]


async def assert_fails_at_once(call: Awaitable[Any], within: float) -> str:
    """The call raises a status-0 ClientError within ``within`` seconds; its message."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ClientError) as caught:
        async with asyncio.timeout(within):
            await call
    assert loop.time() - started < within
    assert caught.value.status == 0
    return caught.value.message


async def test_a_closed_port_fails_every_call_at_once_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # The default give_up_after (120 s): a watch that retried would time out here.
    async with Client(url) as client:
        for call in every_call(client):
            message = await assert_fails_at_once(call, within=5)
            assert message == f"cannot reach {url}: connection refused"


async def test_an_unknown_host_fails_every_call_at_once():
    url = "http://no-such-host.invalid:8000"  # .invalid never resolves (RFC 6761)
    async with Client(url) as client:
        for call in every_call(client):
            message = await assert_fails_at_once(call, within=5)
            assert message.startswith(f"cannot reach {url}: unknown host ("), message


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A URL whose port drops connection attempts, as a firewall would: a listening socket
    whose accept queue (of one) is already full, so the kernel ignores further SYNs."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler.connect(listener.getsockname())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


async def test_a_blackholed_address_fails_after_the_connect_timeout(blackhole: str):
    async with Client(blackhole, connect_timeout=0.5) as client:
        # One call over HTTP and the watch's websocket: every HTTP call shares the one timeout.
        for call in (client.jobs(), anext(client.watch(UNKNOWN_JOB))):
            message = await assert_fails_at_once(call, within=3)
            assert message == f"cannot reach {blackhole}: no answer within 0.5 s"


async def test_a_port_where_something_else_answers_fails_at_once():
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    other = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{other.sockets[0].getsockname()[1]}"
    async with other, Client(url) as client:
        for call in every_call(client):
            message = await assert_fails_at_once(call, within=5)
            assert message.startswith(f"cannot reach {url}: "), message


async def test_a_watch_that_was_connected_waits_for_the_server_to_come_back(
        live_server: ServerProcess):
    """Patience is for a connection that worked: after a drop, refused reconnects are
    retried until ``give_up_after``, not reported at once."""
    async with Client(live_server.url, give_up_after=1.5, max_retry_delay=0.2) as client:
        job = await client.submit("tokens", {"text": "a b c d e f g h", "delay": 1})
        events = client.watch(job["id"])
        assert (await anext(events))["type"] == "starting"
        assert (await anext(events))["type"] == "submitted"
        # Its job runs on without the server, which can no longer cancel it.
        script = local_job_script(live_server.url, job["id"])
        live_server.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            with pytest.raises(ClientError) as caught:
                async with asyncio.timeout(10):
                    async for _ in events:
                        pass
        finally:
            end_group(script)
        assert loop.time() - started >= 1.5
        assert caught.value.status == 0
        assert caught.value.message == f"cannot reach {live_server.url} to watch job {job['id']}"


@pytest.mark.redis
async def test_watch_resumes_across_a_server_restart_with_redis(redis_server: RedisServer,
                                                                tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"redis_url": redis_server.url})
    server.start()
    try:
        words = [f"r{n}" for n in range(24)]
        received: list[dict[str, Any]] = []
        async with Client(server.url, max_retry_delay=0.5) as client:
            job = await client.submit("tokens", {"text": " ".join(words), "delay": 0.05})

            async def watch() -> None:
                async for event in client.watch(job["id"]):
                    received.append(event)

            watcher = asyncio.create_task(watch())
            async with asyncio.timeout(30):
                while sum(e["type"] == "token" for e in received) < 5:
                    await asyncio.sleep(0.02)
            seen_at_restart = len(received)
            await asyncio.to_thread(server.restart)
            await asyncio.wait_for(watcher, 60)
            assert_exactly_once(received, " ".join(words))
            assert received == await client.history(job["id"])
        assert received[seen_at_restart - 1]["type"] not in TERMINAL_TYPES
        assert len(received) > seen_at_restart, "events must have arrived after the restart"
        log = server.log()
        assert log.count("Started server process") == 2
        resumed = re.findall(rf"WebSocket /ws/jobs/{job['id']}\?after=(\d+)", log)
        assert len(resumed) >= 2 and int(resumed[-1]) >= seen_at_restart, resumed
    finally:
        server.stop()


async def test_watch_ends_where_the_servers_state_machine_says():
    """The client keeps no copy of the terminal types: a server whose /api/meta names
    another terminal type ends the watch there (here a stand-in server made with
    websockets, which answers plain HTTP from process_request)."""
    machine = state_machine()
    machine["terminal_types"] = [*machine["terminal_types"], "halfway"]
    events = [{"job": UNKNOWN_JOB, "seq": seq, "type": kind, "data": None, "time": 1.0}
              for seq, kind in enumerate(["starting", "token", "halfway", "token"], start=1)]

    def answer(connection: Any, request: Any) -> Any:
        if request.path == "/api/meta":
            return connection.respond(HTTPStatus.OK, json.dumps(machine))
        return None

    async def stream(connection: Any) -> None:
        for event in events:
            await connection.send(json.dumps(event))
        await connection.wait_closed()

    async with websockets.serve(stream, "127.0.0.1", 0, process_request=answer) as server:
        port = server.sockets[0].getsockname()[1]
        async with Client(f"http://127.0.0.1:{port}") as client:
            seen = [event["type"] async for event in client.watch(UNKNOWN_JOB)]
    assert seen == ["starting", "token", "halfway"]
