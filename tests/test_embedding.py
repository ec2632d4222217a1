"""metis-stream mounted in a host Starlette app under ``/hpc`` (docs/embedding.md), served by
uvicorn in a thread of this process, with a scheduler double that records what it is
given: the host's lifespan runs the service, every URL is under the mount, a public_url
outside it is refused, and the host's own check guards every route but the job's.

The same with FastAPI, a real uvicorn, real jobs and curl: tests/test_embedding_e2e.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response as WebSocketResponse
from websockets.sync.client import connect

import metis_stream
from metis_stream import (
    Client,
    Event,
    Job,
    JobService,
    JobState,
    NewEvent,
    create_app,
    load_config,
)
from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import ClusterConfig, Config, ServerConfig
from metis_stream.errors import EmbeddingError, InvalidParams, NotRunning, UnknownTemplate
from metis_stream.schedulers.base import SchedulerStatus, Submission
from metis_stream.templates import Template
from metis_stream.tokens import job_token
from tests.support.embedded_host import example_file
from tests.support.schedulers import SchedulerDouble
from tests.support.server import serve_in_thread

KEY = "embedded-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET = "s" * 40
PUBLIC_URL = "http://jobs.example/hpc"
SUBMIT = {"template": "t", "params": {}}


class Recording(SchedulerDouble):
    def __init__(self) -> None:
        self.submitted: list[Submission] = []
        self.starts = self.closes = 0

    async def start(self) -> None:
        self.starts += 1

    async def close(self) -> None:
        self.closes += 1

    async def submit(self, submission: Submission) -> str:
        self.submitted.append(submission)
        return f"{len(self.submitted)}.double"


def config(public_url: str = PUBLIC_URL) -> Config:
    return Config(server=ServerConfig(api_keys=(KEY,), secret=SECRET, public_url=public_url),
                  clusters={"double": ClusterConfig(name="double")},
                  templates={"t": Template(name="t", cluster="double")})


def host(hpc: Starlette, *, run_service: bool = True, log: list[str] | None = None
         ) -> Starlette:
    """A host app with a route of its own and ``hpc`` mounted at /hpc; its lifespan, its
    own part and metis-stream's, composed as docs/embedding.md says."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if log is not None:
            log.append("host up")
        if run_service:
            async with metis_stream.lifespan(hpc):
                yield
        else:
            yield
        if log is not None:
            log.append("host down")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("the host's own page")

    return Starlette(routes=[Route("/", home), Mount("/hpc", hpc)], lifespan=lifespan)


def embedded(authorize: metis_stream.Authorize | None = None, **settings: Any
             ) -> tuple[Starlette, Recording]:
    scheduler = Recording()
    hpc = create_app(config(**settings), backend=MemoryBackend(),
                     schedulers={"double": scheduler}, authorize=authorize)
    return hpc, scheduler


def service(hpc: Starlette) -> JobService:
    found: JobService = hpc.state.service
    return found


@contextlib.contextmanager
def serving(app: Starlette) -> Iterator[tuple[httpx.Client, str]]:
    """``app`` under a real uvicorn (which runs its lifespan): an HTTP client for it, and
    its websocket URL."""
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield client, "ws" + url.removeprefix("http")


def refused_handshake(url: str, **headers: str) -> WebSocketResponse:
    """The HTTP answer to a websocket handshake that must be refused."""
    with pytest.raises(InvalidStatus) as refused, \
            connect(url, additional_headers=headers, open_timeout=10):
        pass
    return refused.value.response


def test_a_mount_without_the_hosts_lifespan_says_what_to_start_and_records_nothing() -> None:
    hpc, scheduler = embedded()
    with serving(host(hpc, run_service=False)) as (client, ws_url):
        answer = client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH)
        assert answer.status_code == 500
        assert "metis_stream.lifespan(app)" in answer.json()["error"]
        assert client.get("/hpc/healthz").status_code == 500
        denied = refused_handshake(f"{ws_url}/hpc/ws/jobs", **AUTH)
        assert denied.status_code == 500
        assert "not running" in json.loads(denied.body)["error"]
        assert client.get("/").text == "the host's own page"
    assert scheduler.submitted == []
    assert anyio.run(functools.partial(service(hpc).jobs, seen_by=None)) == []


def test_the_hosts_lifespan_runs_the_service_and_every_url_is_under_the_mount() -> None:
    hpc, scheduler = embedded()
    log: list[str] = []
    with serving(host(hpc, log=log)) as (client, ws_url):
        assert service(hpc).running
        created = client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["watch_url"] == f"/hpc/ws/jobs/{job['id']}"
        assert job["events_url"] == f"/hpc/api/jobs/{job['id']}/events"
        listed = client.get("/hpc/api/jobs", headers=AUTH).json()["jobs"]
        assert [entry["watch_url"] for entry in listed] == [job["watch_url"]]
        # The job is told public_url, the mount path in it.
        [submission] = scheduler.submitted
        assert submission.env["METIS_EVENTS_URL"] == f"{PUBLIC_URL}/api/jobs/{job['id']}/events"
        # The job posts under the mount without any key of the host's; a watcher follows.
        posted = client.post(f"/hpc/api/jobs/{job['id']}/events",
                             json={"type": "completed", "data": {"ok": True}},
                             headers={"Authorization": f"Bearer {job_token(SECRET, job['id'])}"})
        assert posted.status_code == 200, posted.text
        with connect(f"{ws_url}{job['watch_url']}?token={job['watch_token']}",
                     open_timeout=10) as ws:
            types = [json.loads(frame)["type"] for frame in ws]
        # The monitor may have seen the job run in between.
        assert types in (["starting", "submitted", "completed"],
                         ["starting", "submitted", "running", "completed"])
        # The viewer's page and files, whose URLs are relative, are there too.
        page = client.get("/hpc/")
        assert page.status_code == 200 and 'src="js/main.js"' in page.text
        assert client.get("/hpc/js/http.js").status_code == 200
        assert client.get("/hpc").headers["location"].endswith("/hpc/")
        assert client.get("/").text == "the host's own page"
        assert log == ["host up"]
    assert log == ["host up", "host down"]
    assert not service(hpc).running


def test_a_submit_socket_under_the_mount_streams_its_job() -> None:
    hpc, _ = embedded()
    with serving(host(hpc)) as (_client, ws_url), \
            connect(f"{ws_url}/hpc/ws/jobs", additional_headers=AUTH, open_timeout=10) as ws:
        ws.send(json.dumps(SUBMIT))
        assert json.loads(ws.recv(10))["type"] == "starting"
        assert json.loads(ws.recv(10))["type"] == "submitted"


@pytest.mark.parametrize("public_url", ["http://jobs.example", "http://jobs.example/other",
                                        "http://jobs.example/xhpc"])
def test_a_public_url_outside_the_mount_is_refused_before_any_job_exists(public_url) -> None:
    hpc, scheduler = embedded(public_url=public_url)
    with serving(host(hpc)) as (client, ws_url):
        answer = client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH)
        assert answer.status_code == 500
        assert "mounted at /hpc" in answer.json()["error"]
        assert "http://HOST:PORT/hpc" in answer.json()["error"]
        assert refused_handshake(f"{ws_url}/hpc/ws/jobs", **AUTH).status_code == 500
        # Only a submission needs it; the rest answers.
        assert client.get("/hpc/api/templates", headers=AUTH).status_code == 200
    assert scheduler.submitted == []


def test_a_public_url_through_a_proxy_ends_with_the_mount_path() -> None:
    hpc, scheduler = embedded(public_url="https://apps.example.org/lab/hpc/")
    with serving(host(hpc)) as (client, _):
        created = client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH)
        assert created.status_code == 201, created.text
    assert scheduler.submitted[0].env["METIS_EVENTS_URL"].startswith(
        "https://apps.example.org/lab/hpc/api/jobs/")


def test_the_server_on_its_own_takes_any_public_url_path() -> None:
    """Not mounted, the app cannot tell a proxy's prefix from a mistake: it checks nothing."""
    hpc, _ = embedded(public_url="http://jobs.example/behind/a/proxy")
    with serving(hpc) as (client, _):
        created = client.post("/api/jobs", json=SUBMIT, headers=AUTH)
        assert created.status_code == 201, created.text
        assert created.json()["watch_url"].startswith("/ws/jobs/")


async def test_the_python_client_takes_the_mount_in_its_url() -> None:
    hpc, _ = embedded()
    with serve_in_thread(host(hpc)) as url:
        async with Client(f"{url}/hpc", key=KEY) as client:
            job = await client.submit("t")
            assert job["watch_url"] == f"/hpc/ws/jobs/{job['id']}"
            async for event in client.watch(job["id"]):
                assert event["type"] == "starting"
                break
            assert [template["name"] for template in await client.templates()] == ["t"]


def test_the_starlette_example_of_the_docs_runs_its_service(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METIS_API_KEYS", KEY)
    monkeypatch.setenv("METIS_STATE_DIR", str(tmp_path))
    example: dict[str, Any] = {}
    exec(compile(example_file("starlette_host.py"), "starlette_host.py", "exec"), example)
    with serving(example["app"]) as (client, _):
        assert client.get("/hpc/healthz").json() == {"ok": True}  # 500 unless it runs
        assert client.get("/hpc/api/templates", headers=AUTH).status_code == 200


# The host's own check


def signed_in(conn: HTTPConnection) -> bool:
    return conn.cookies.get("session") == "alice"


async def signed_in_async(conn: HTTPConnection) -> bool:
    return signed_in(conn)


@pytest.mark.parametrize("hook", [signed_in, signed_in_async], ids=["sync", "async"])
def test_the_hosts_hook_guards_every_client_route_and_never_the_jobs_own(
        hook: metis_stream.Authorize) -> None:
    hpc, _ = embedded(authorize=hook)
    alice = {"Cookie": "session=alice"}
    with serving(host(hpc)) as (client, ws_url):
        for path in ("/hpc/api/templates", "/hpc/api/jobs", "/hpc/healthz", "/hpc/",
                     "/hpc/js/main.js", "/hpc/api/no-such-thing"):
            refused = client.get(path, headers=AUTH)
            assert refused.status_code == 403, path
            assert refused.json() == {"error": "refused by the host application"}
        assert client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH).status_code == 403
        assert refused_handshake(f"{ws_url}/hpc/ws/jobs", **AUTH).status_code == 403

        created = client.post("/hpc/api/jobs", json=SUBMIT, headers=AUTH | alice)
        assert created.status_code == 201, created.text
        job = created.json()
        # Let in by the host, a request is still judged by metis-stream's own keys.
        assert client.get("/hpc/api/jobs", headers={"Authorization": "Bearer x"} | alice
                          ).status_code == 401
        assert client.get("/hpc/", headers=alice).status_code == 200
        with connect(f"{ws_url}/hpc/ws/jobs/{job['id']}", additional_headers=AUTH | alice,
                     open_timeout=10) as ws:
            assert json.loads(ws.recv(10))["type"] == "starting"

        token = {"Authorization": f"Bearer {job_token(SECRET, job['id'])}"}
        assert client.get(f"/hpc/api/jobs/{job['id']}/spec", headers=token).status_code == 200
        posted = client.post(f"/hpc/api/jobs/{job['id']}/events", headers=token,
                             json={"type": "step", "data": "no session needed"})
        assert posted.status_code == 200, posted.text
        # Its events are a client's route: guarded.
        assert client.get(f"/hpc/api/jobs/{job['id']}/events", headers=AUTH).status_code == 403


def test_a_hook_that_returns_nothing_refuses_and_one_that_raises_picks_the_answer() -> None:
    def forgetful(conn: HTTPConnection) -> bool:
        return None  # type: ignore[return-value]

    def wants_login(conn: HTTPConnection) -> bool:
        raise HTTPException(401, "sign in first", headers={"WWW-Authenticate": "Cookie"})

    hpc, _ = embedded(authorize=forgetful)
    with serving(host(hpc)) as (client, _):
        assert client.get("/hpc/api/templates", headers=AUTH).status_code == 403
    hpc, _ = embedded(authorize=wants_login)
    with serving(host(hpc)) as (client, ws_url):
        for path in ("/hpc/api/templates", "/hpc/"):
            refused = client.get(path, headers=AUTH)
            assert refused.status_code == 401, path
            assert refused.json() == {"error": "sign in first"}
            assert refused.headers["WWW-Authenticate"] == "Cookie"
        denied = refused_handshake(f"{ws_url}/hpc/ws/jobs", **AUTH)
        assert denied.status_code == 401
        assert json.loads(denied.body) == {"error": "sign in first"}


# The lifespan


def running(service: JobService) -> bool:
    return service.running


async def test_the_lifespan_entered_twice_starts_the_service_once() -> None:
    hpc, scheduler = embedded()
    async with metis_stream.lifespan(hpc) as outer:
        async with metis_stream.lifespan(hpc) as inner:
            assert inner is outer is service(hpc)
            assert running(outer)
        assert running(outer)
    assert not running(outer)
    assert scheduler.starts == scheduler.closes == 1


async def test_the_lifespan_takes_only_an_app_of_create_app() -> None:
    with pytest.raises(TypeError, match="create_app"):
        async with metis_stream.lifespan(Starlette()):
            pass


# JobService on its own: the in-process API


def in_process() -> tuple[JobService, Recording]:
    scheduler = Recording()
    return JobService(config(), MemoryBackend(), {"double": scheduler}), scheduler


async def test_a_service_runs_once_at_a_time_and_submits_only_while_it_runs() -> None:
    service, scheduler = in_process()
    with pytest.raises(NotRunning, match="async with service"):
        await service.submit("t")
    assert await service.jobs(seen_by=None) == []  # nothing half made
    async with service as entered:
        assert entered is service and running(service)
        with pytest.raises(EmbeddingError, match="running already"):
            async with service:
                pass
        assert running(service)
    assert not running(service)
    assert scheduler.starts == scheduler.closes == 1
    with pytest.raises(NotRunning):
        await service.submit("t")


async def test_submit_and_follow_from_the_programs_own_code_with_typed_results() -> None:
    service, scheduler = in_process()
    async with service:
        job = await service.submit("t", {}, user="u-7", owner="webapp")
        assert isinstance(job, Job)
        assert (job.template, job.user, job.owner) == ("t", "u-7", "webapp")
        with anyio.fail_after(5):
            while not scheduler.submitted:
                await anyio.sleep(0.01)
        # What the job itself would post, as the HTTP route hands it on.
        await service.ingest(job.id, [NewEvent("token", "hello"), NewEvent("completed", 42)])
        events = [event async for event in service.follow(job.id)]
        assert all(isinstance(event, Event) for event in events)
        assert [(e.seq, e.type) for e in events] == [
            (1, "starting"), (2, "submitted"), (3, "token"), (4, "completed")]
        assert events[2].data == "hello" and events[2].job == job.id
        ended = await service.get(job.id, seen_by=None)
        assert ended.state is JobState.COMPLETED and ended.result == 42
        assert [listed.id for listed in await service.jobs(seen_by=None)] == [job.id]
        with pytest.raises(UnknownTemplate):
            await service.submit("no-such-template")
        with pytest.raises(InvalidParams):
            await service.submit("t", {"surplus": 1})


async def test_a_service_from_a_config_runs_a_real_job_without_http(tmp_path: Path) -> None:
    """The embedded defaults' ``tokens-spool``: a local job whose events come through its
    spool, so not one request is made."""
    config = load_config(None, environ={"METIS_STATE_DIR": str(tmp_path)})
    async with JobService.from_config(config) as service:
        job = await service.submit("tokens-spool", {"text": "one two three", "delay": 0})
        with anyio.fail_after(30):
            events = [event async for event in service.follow(job.id)]
        done = await service.get(job.id, seen_by=None)
        # Its launcher may still be on its way out: wait until the scheduler has reaped it
        # (and forgotten it), so that nothing outlives the test.
        assert done.scheduler_id is not None
        scheduler = service.schedulers[done.cluster]
        with anyio.fail_after(10):
            while (await scheduler.poll([done.scheduler_id])).get(
                    done.scheduler_id, SchedulerStatus("ended")).state == "running":
                await anyio.sleep(0.05)
    words = "".join(str(event.data) for event in events if event.type == "token")
    assert words == "one two three"
    assert events[-1].type == "completed"
    assert done.state is JobState.COMPLETED
    assert done.result == {"text": "one two three", "tokens": 3}
