"""The FastAPI host app of docs/embedding.md, taken from the page, under a real uvicorn
process, with metis-stream mounted at ``/hpc``: real jobs of the local scheduler whose
``metis-emit`` posts each event with curl to the events URL it was given, a websocket
submit, Server-Sent Events, the host's in-process route, the host's own routes, and the
host's sign-in guarding metis-stream's routes. The viewer under the mount, in Chromium.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.support.embedded_host import SESSION, HostProcess

KEY = "embedding-e2e-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ALICE = {"Cookie": f"session={SESSION}"}
TEXT = "streamed through the host app"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[HostProcess]:
    process = HostProcess(tmp_path / "host", KEY)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def sse_events(host: HostProcess, path: str) -> list[dict[str, Any]]:
    """A job's Server-Sent Events, read until the server ends the stream."""
    events = []
    with httpx.stream("GET", f"{host.url}{path}", timeout=30,
                      headers=AUTH | ALICE | {"Accept": "text/event-stream"}) as stream:
        assert stream.status_code == 200, stream.read()
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return events


def test_a_job_runs_end_to_end_through_the_mount(host: HostProcess) -> None:
    home = httpx.get(f"{host.url}/", timeout=10)
    assert home.json() == {"app": "the host's own page", "signed_in": False}

    # Submitted on a websocket under /hpc; its events come back on it to the end.
    with connect(f"{host.ws_url}/hpc/ws/jobs", additional_headers=AUTH | ALICE,
                 open_timeout=10) as ws:
        ws.send(json.dumps({"template": "tokens", "params": {"text": TEXT, "delay": 0}}))
        frames = [json.loads(frame) for frame in ws]
    job_id = frames[0]["job"]
    types = [frame["type"] for frame in frames]
    assert types[:2] == ["starting", "submitted"] and types[-1] == "completed", types
    assert [frame["seq"] for frame in frames] == list(range(1, len(frames) + 1))
    # The job's own events: its script's metis-emit posted them, with curl, to the events
    # URL it was given, under the mount.
    assert "".join(f["data"] for f in frames if f["type"] == "token") == TEXT
    assert f'"POST /hpc/api/jobs/{job_id}/events HTTP/1.1" 200' in host.log()

    record = httpx.get(f"{host.url}/hpc/api/jobs/{job_id}", headers=AUTH | ALICE,
                       timeout=10).json()
    assert record["state"] == "completed"
    assert record["watch_url"] == f"/hpc/ws/jobs/{job_id}"
    assert record["events_url"] == f"/hpc/api/jobs/{job_id}/events"
    assert record["result"] == {"text": TEXT, "tokens": len(TEXT.split())}

    # The same events as Server-Sent Events, from the events URL the API gave.
    assert sse_events(host, record["events_url"]) == frames

    # Submitted with POST, followed live with SSE.
    created = httpx.post(f"{host.url}/hpc/api/jobs", headers=AUTH | ALICE, timeout=10,
                         json={"template": "tokens", "params": {"text": "two words",
                                                                 "delay": 0.2}})
    assert created.status_code == 201, created.text
    live = sse_events(host, created.json()["events_url"])
    assert [e["type"] for e in live][-1] == "completed"
    assert "".join(e["data"] for e in live if e["type"] == "token") == "two words"


def test_the_host_submits_and_follows_in_its_own_code(host: HostProcess) -> None:
    summary = httpx.post(f"{host.url}/summaries", params={"text": TEXT}, headers=ALICE,
                         timeout=30)
    assert summary.status_code == 200, summary.text
    assert summary.json()["state"] == "completed"
    assert summary.json()["text"] == TEXT
    # The job went through the same service as the mounted app's: its events came by the
    # mount, and a key holder sees it there, with its end user.
    job_id = summary.json()["job"]
    assert f'"POST /hpc/api/jobs/{job_id}/events HTTP/1.1" 200' in host.log()
    record = httpx.get(f"{host.url}/hpc/api/jobs/{job_id}", headers=AUTH | ALICE,
                       timeout=10).json()
    assert (record["state"], record["user"]) == ("completed", "alice")
    # The host's own route keeps its own rule.
    assert httpx.post(f"{host.url}/summaries", params={"text": "x"},
                      timeout=10).status_code == 401


def test_the_hosts_sign_in_refuses_what_it_does_not_like(host: HostProcess) -> None:
    strangers = [{}, {"Cookie": "session=guessed"}]
    for cookie in strangers:
        for path in ("/hpc/api/templates", "/hpc/api/jobs", "/hpc/", "/hpc/js/main.js"):
            refused = httpx.get(f"{host.url}{path}", headers=AUTH | cookie, timeout=10)
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json() == {"error": "refused by the host application"}
        with pytest.raises(InvalidStatus) as denied, \
                connect(f"{host.ws_url}/hpc/ws/jobs", additional_headers=AUTH | cookie,
                        open_timeout=10):
            pass
        assert denied.value.response.status_code == 403
        posted = httpx.post(f"{host.url}/hpc/api/jobs", headers=AUTH | cookie, timeout=10,
                            json={"template": "tokens"})
        assert posted.status_code == 403
    # Signed in to the host, a caller still needs metis-stream's key.
    assert httpx.get(f"{host.url}/hpc/api/templates", headers=ALICE,
                     timeout=10).status_code == 401
    assert httpx.get(f"{host.url}/hpc/api/templates", headers=AUTH | ALICE,
                     timeout=10).status_code == 200
    # The host's own routes are its own business.
    assert httpx.get(f"{host.url}/", timeout=10).status_code == 200
    assert httpx.get(f"{host.url}/", headers=ALICE, timeout=10).json()["signed_in"] is True


def test_a_public_url_without_the_mount_path_is_refused_with_the_fix(tmp_path: Path) -> None:
    host = HostProcess(tmp_path / "host", KEY)
    host.public_url = host.url  # the host's address, without /hpc
    host.start()
    try:
        refused = httpx.post(f"{host.url}/hpc/api/jobs", headers=AUTH | ALICE, timeout=10,
                             json={"template": "tokens"})
        assert refused.status_code == 500
        assert "mounted at /hpc" in refused.json()["error"]
        assert "set [server] public_url (or METIS_PUBLIC_URL)" in refused.json()["error"]
        assert httpx.get(f"{host.url}/hpc/api/jobs", headers=AUTH | ALICE,
                         timeout=10).json()["jobs"] == []
    finally:
        host.stop()


@pytest.mark.browser
def test_the_viewer_works_under_the_mount(host: HostProcess) -> None:
    from playwright.sync_api import expect

    from tests.test_viewer import chromium

    with chromium() as browser:
        context = browser.new_context()
        context.add_cookies([{"name": "session", "value": SESSION, "url": host.url}])
        page = context.new_page()
        page.set_default_timeout(30_000)
        sockets: list[str] = []
        errors: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(f"{host.url}/hpc#key={KEY}")  # redirected to /hpc/, the key kept
            page.locator("#template-tokens").check()
            page.get_by_label("text").fill(TEXT)
            page.get_by_label("delay").fill("0")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url("**/hpc/#/jobs/*")
            expect(page.locator("#job-state")).to_have_text("completed")
            expect(page.locator("#output")).to_have_text(TEXT)
            page.goto(f"{host.url}/hpc/#/")
            expect(page.locator(".job-link")).to_have_count(1)
        finally:
            context.close()
    assert errors == []
    assert sockets and all(url.startswith(f"{host.ws_url}/hpc/ws/jobs/") for url in sockets)
