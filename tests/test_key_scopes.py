"""Keys that see only their own jobs, on a real server (memory and Redis backends): two
client keys, an admin key, and an ``api_keys`` entry (an admin named after its hash), on
every route that takes or lists jobs. To a client key, another key's job gets exactly the
answer that a job which does not exist gets; an admin key sees every job."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from metis_stream.jobs import JobState, new_job_id
from metis_stream.tokens import hash_api_key
from tests.support.server import ServerProcess, idle_server, running

KEY_A = "client-key-a-" + "a" * 32
KEY_B = "client-key-b-" + "b" * 32
KEY_OPS = "admin-key-ops-" + "o" * 32
KEY_LISTED = "listed-key-" + "l" * 32
LISTED_NAME = hash_api_key(KEY_LISTED)[:19]
KEYS = {
    "api_keys": [hash_api_key(KEY_LISTED)],
    "keys": {"a": {"key": hash_api_key(KEY_A), "role": "client"},
             "b": {"key": hash_api_key(KEY_B)},  # client, by default
             "ops": {"key": KEY_OPS, "role": "admin"}},
}
SSE = {"Accept": "text/event-stream"}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    settings: dict[str, Any] = dict(KEYS)
    if request.param == "redis":
        settings["redis_url"] = request.getfixturevalue("private_redis").url
    with running(idle_server(tmp_path, **settings)) as started:
        try:
            yield started
        finally:  # the idle jobs wait for their end, and outlive a server
            listed = httpx.get(f"{started.url}/api/jobs", params={"limit": 1000},
                               headers=auth(KEY_OPS), timeout=30).json()["jobs"]
            for job in listed:
                if not JobState(job["state"]).terminal:
                    httpx.delete(f"{started.url}/api/jobs/{job['id']}", headers=auth(KEY_OPS),
                                 timeout=30)


def create(server: ServerProcess, key: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/api/jobs", headers=auth(key), timeout=30,
                          json={"template": "idle", **body})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def listed(server: ServerProcess, key: str, **query: str) -> list[str]:
    response = httpx.get(f"{server.url}/api/jobs", headers=auth(key), params=query, timeout=30)
    assert response.status_code == 200, response.text
    return [job["id"] for job in response.json()["jobs"]]


def answer(response: httpx.Response) -> tuple[int, Any]:
    return response.status_code, response.json()


def refused_watch(server: ServerProcess, job_id: str, key: str) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as refused, connect(
            f"{server.ws_url}/ws/jobs/{job_id}", additional_headers=auth(key)):
        pass
    return refused.value.response.status_code, json.loads(refused.value.response.body)


def first_watched(server: ServerProcess, job_id: str, key: str) -> dict[str, Any]:
    with connect(f"{server.ws_url}/ws/jobs/{job_id}", additional_headers=auth(key)) as socket:
        event: dict[str, Any] = json.loads(socket.recv(timeout=10))
    return event


def first_streamed(server: ServerProcess, job_id: str, key: str) -> dict[str, Any]:
    with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events",
                      headers={**SSE, **auth(key)}, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                event: dict[str, Any] = json.loads(line.removeprefix("data: "))
                return event
    raise AssertionError("the stream ended without an event")


def test_a_client_key_lists_its_own_jobs_and_an_admin_key_every_job(server: ServerProcess):
    a1 = create(server, KEY_A, user="u1")
    b1 = create(server, KEY_B, user="u1")
    a2 = create(server, KEY_A)
    ops = create(server, KEY_OPS, user="u1")
    legacy = create(server, KEY_LISTED)
    assert (a1["owner"], a1["user"], a2["user"]) == ("a", "u1", None)
    assert (b1["owner"], ops["owner"], legacy["owner"]) == ("b", "ops", LISTED_NAME)

    every = [legacy["id"], ops["id"], a2["id"], b1["id"], a1["id"]]
    assert listed(server, KEY_A) == [a2["id"], a1["id"]]
    assert listed(server, KEY_B) == [b1["id"]]
    assert listed(server, KEY_OPS) == every
    assert listed(server, KEY_LISTED) == every
    assert listed(server, KEY_A, user="u1") == [a1["id"]]
    assert listed(server, KEY_B, user="u1") == [b1["id"]]
    assert listed(server, KEY_OPS, user="u1") == [ops["id"], b1["id"], a1["id"]]
    assert listed(server, KEY_A, user="u2") == []
    assert listed(server, KEY_A, user="u1", state="cancelled") == []
    assert listed(server, KEY_A, limit="1") == [a2["id"]]
    owners = {job["id"]: job["owner"] for job in httpx.get(
        f"{server.url}/api/jobs", headers=auth(KEY_OPS), timeout=30).json()["jobs"]}
    assert owners == {a1["id"]: "a", a2["id"]: "a", b1["id"]: "b", ops["id"]: "ops",
                      legacy["id"]: LISTED_NAME}


def test_another_keys_job_is_a_job_that_does_not_exist_on_every_route(server: ServerProcess):
    theirs = create(server, KEY_B)["id"]
    mine = create(server, KEY_A)["id"]
    nowhere = new_job_id()
    url = f"{server.url}/api/jobs"

    for job_id in (theirs, nowhere):
        assert answer(httpx.get(f"{url}/{job_id}", headers=auth(KEY_A))) == (
            404, {"error": "unknown job"})
        assert answer(httpx.get(f"{url}/{job_id}/events", headers=auth(KEY_A))) == (
            404, {"error": "unknown job"})
        assert answer(httpx.get(f"{url}/{job_id}/events", headers={**SSE, **auth(KEY_A)})) == (
            404, {"error": "unknown job"})
        assert answer(httpx.delete(f"{url}/{job_id}", headers=auth(KEY_A))) == (
            404, {"error": "unknown job"})
        assert refused_watch(server, job_id, KEY_A) == (404, {"error": "unknown job"})
    # The refused cancel changed nothing.
    assert httpx.get(f"{url}/{theirs}", headers=auth(KEY_B)).json()["state"] != "cancelled"

    # Its own key and the admin keys see it, on every route.
    for key in (KEY_B, KEY_OPS, KEY_LISTED):
        record = httpx.get(f"{url}/{theirs}", headers=auth(key)).json()
        assert (record["id"], record["owner"]) == (theirs, "b")
        events = httpx.get(f"{url}/{theirs}/events", headers=auth(key)).json()["events"]
        assert events[0]["type"] == "starting"
        assert first_streamed(server, theirs, key)["type"] == "starting"
        assert first_watched(server, theirs, key)["type"] == "starting"
    assert first_watched(server, mine, KEY_A)["type"] == "starting"
    cancelled = httpx.delete(f"{url}/{theirs}", headers=auth(KEY_OPS))
    assert (cancelled.status_code, cancelled.json()["state"]) == (200, "cancelled")
    assert answer(httpx.delete(f"{url}/{mine}", headers=auth(KEY_A)))[0] == 200


def test_a_watch_token_reads_its_one_job_whoever_created_it(server: ServerProcess):
    job = create(server, KEY_B)
    url = f"{server.url}/api/jobs/{job['id']}"
    watched = httpx.get(url, params={"token": job["watch_token"]}, timeout=30)
    assert watched.status_code == 200
    assert not {"owner", "watch_token", "error_detail"} & set(watched.json())
    assert watched.json()["id"] == job["id"]
    with connect(f"{server.ws_url}/ws/jobs/{job['id']}?token={job['watch_token']}") as socket:
        assert json.loads(socket.recv(timeout=10))["type"] == "starting"
    # A request with an API key is judged by its key: another key's job stays unknown.
    assert answer(httpx.get(url, params={"token": job["watch_token"]},
                            headers=auth(KEY_A))) == (404, {"error": "unknown job"})
    # A watch token is no key: it neither lists nor cancels.
    assert httpx.delete(url, params={"token": job["watch_token"]}).status_code == 401


def test_metrics_are_for_admin_keys_templates_and_clusters_for_every_key(
        server: ServerProcess):
    refused = httpx.get(f"{server.url}/metrics", headers=auth(KEY_A))
    assert refused.status_code == 403
    assert "admin key" in refused.json()["error"]
    for key in (KEY_OPS, KEY_LISTED):
        assert httpx.get(f"{server.url}/metrics", headers=auth(key)).status_code == 200
    for key in (KEY_A, KEY_OPS):
        assert httpx.get(f"{server.url}/api/templates", headers=auth(key)).status_code == 200
        assert httpx.get(f"{server.url}/api/clusters", headers=auth(key)).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_a_bad_end_user_is_refused_and_changes_nothing(server: ServerProcess):
    before = listed(server, KEY_OPS)
    for user in (42, "", "a b", "alice@example.org", "a.b", "é", "x" * 65, "$(id)", ["u1"]):
        refused = httpx.post(f"{server.url}/api/jobs", headers=auth(KEY_A), timeout=30,
                             json={"template": "idle", "user": user})
        assert refused.status_code == 400, (user, refused.text)
        assert refused.json()["error"].startswith(
            "'user' must be 1 to 64 letters, digits, _ or -"), user
        if isinstance(user, str):
            query = httpx.get(f"{server.url}/api/jobs", headers=auth(KEY_A),
                              params={"user": user})
            assert query.status_code == 400, user
    assert listed(server, KEY_OPS) == before


def test_the_submit_socket_records_its_key_and_end_user(server: ServerProcess):
    with connect(f"{server.ws_url}/ws/jobs", additional_headers=auth(KEY_A)) as socket:
        socket.send(json.dumps({"template": "idle", "user": "ws-user"}))
        first = json.loads(socket.recv(timeout=10))
    assert first["type"] == "starting"
    record = httpx.get(f"{server.url}/api/jobs/{first['job']}", headers=auth(KEY_A)).json()
    assert (record["owner"], record["user"]) == ("a", "ws-user")
    assert listed(server, KEY_B, user="ws-user") == []
    assert listed(server, KEY_OPS, user="ws-user") == [first["job"]]
    with connect(f"{server.ws_url}/ws/jobs", additional_headers=auth(KEY_A)) as socket:
        socket.send(json.dumps({"template": "idle", "user": "no spaces"}))
        error = json.loads(socket.recv(timeout=10))
        assert "'user' must be" in error["error"]
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400
    assert listed(server, KEY_OPS, user="no-spaces") == []
