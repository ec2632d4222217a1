"""Webhooks end to end, with real processes: ``metis-stream serve`` on a real
redis-server, and webhook receivers that are processes of their own
(tests/support/webhook_receiver.py). Every delivery is verified with the receivers' own
``standardwebhooks`` library.

One receiver fails its first three requests, then is down for 20 s, then comes back;
meanwhile the server is SIGKILLed mid-retry and started again. Another never answers:
its events end in the dead-letter list, and one is replayed from it with the CLI.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook as Receiver

from metis_stream.jobs import JobState
from metis_stream.tokens import hash_api_key
from tests.support.redis_server import RedisServer
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    ServerProcess,
    free_port,
    history,
    submit,
)

pytestmark = pytest.mark.redis

ROOT = Path(__file__).parent.parent
SECRET = "webhooks-test-secret-of-at-least-32-bytes"
APP_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
DEAD_SECRET = "whsec_wgZo7ZvTi3wTlWeiFs36f4R7nW0dWrSIXdIFB2JY+I0="
DOWN_FOR = 20.0


class ReceiverProcess:
    """tests/support/webhook_receiver.py on its own port; started and stopped at will, each
    run appending to the same record of requests."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / f"receiver-{self.port}.ndjson"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.webhook_receiver", "--port", str(self.port),
             "--log", str(self.log), *options], cwd=ROOT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the receiver exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the receiver did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def requests(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def receivers(tmp_path: Path) -> Iterator[Callable[[], ReceiverProcess]]:
    made: list[ReceiverProcess] = []

    def make() -> ReceiverProcess:
        made.append(ReceiverProcess(tmp_path))
        return made[-1]

    try:
        yield make
    finally:
        for receiver in made:
            receiver.stop()


def webhook_config(app: ReceiverProcess, dead: ReceiverProcess) -> str:
    return f"""
[webhooks.app]
url = "{app.url}"
secret = "{APP_SECRET}"
events = ["all"]
timeout = 2
retry_period = 120
retry_base = 0.2
retry_cap = 1

[webhooks.dead]
url = "{dead.url}"
secret = "{DEAD_SECRET}"
events = ["terminal"]
timeout = 0.5
retry_period = 2
retry_base = 0.2
retry_cap = 0.5
"""


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ended(server: ServerProcess, job_ids: list[str]) -> bool:
    return all(JobState(httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=10).json()["state"]
                        ).terminal for job_id in job_ids)


def delivered(receiver: ReceiverProcess) -> dict[str, set[int]]:
    """The seqs of each job that the receiver took (answered 2xx)."""
    taken: dict[str, set[int]] = {}
    for request in receiver.requests():
        if request["status"] == 204:
            event = json.loads(request["body"])["data"]["event"]
            taken.setdefault(event["job"], set()).add(event["seq"])
    return taken


def dead_letters(server: ServerProcess) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.url}/api/webhooks/failed", timeout=10)
    assert answer.status_code == 200, answer.text
    letters: list[dict[str, Any]] = answer.json()["failed"]
    return letters


def retrying(server: ServerProcess, webhook: str) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    line = f'metis_webhook_retrying{{webhook="{webhook}"}} '
    return float(metrics.split(line)[1].split()[0])


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "metis_stream.cli", *args, "--url",
                           server.url], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_every_webhook_arrives_signed_and_in_order_through_failures_an_outage_and_a_kill(
        private_redis: RedisServer, receivers: Callable[[], ReceiverProcess],
        tmp_path: Path) -> None:
    app, dead = receivers(), receivers()
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"redis_url": private_redis.url, "secret": SECRET},
                           extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES
                           + webhook_config(app, dead))
    app.start("--fail-first", "3", "--exit-after", "3")
    dead.start("--hang")
    server.start()
    try:
        started = time.monotonic()
        jobs = [submit(server, text=f"job {n} says hello", delay=0) for n in range(3)]
        assert app.process is not None
        app.process.wait(15)  # three failures, then down
        down_since = time.monotonic()
        app.stop()
        assert [request["status"] for request in app.requests()] == [500, 500, 500]
        wait_for(lambda: ended(server, jobs), 30, "the jobs to end")
        # Mid-retry: the deliverer backs off from a receiver that refuses connections.
        wait_for(lambda: retrying(server, "app") > 0, 10, "the deliverer to retry")
        server.kill()
        server.start()
        jobs.append(submit(server, text="after the restart", delay=0))
        wait_for(lambda: ended(server, jobs), 30, "the last job to end")
        time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down_since)))
        app.start()
        logs = {job_id: history(server, job_id) for job_id in jobs}
        wanted = {job_id: {event["seq"] for event in events} for job_id, events in logs.items()}
        wait_for(lambda: delivered(app) == wanted, 30, "every event to arrive")
        elapsed = time.monotonic() - started

        requests = app.requests()
        by_message: dict[tuple[str, int], set[str]] = {}
        arrivals: dict[str, list[int]] = {}
        verify = Receiver(APP_SECRET)
        for request in requests:
            body = verify.verify(request["body"], request["headers"])  # raises if unsigned
            event = body["data"]["event"]
            assert event in logs[event["job"]]  # exactly the event in the job's log
            assert body["data"]["job"]["id"] == event["job"]
            assert "watch_token" not in body["data"]["job"]
            by_message.setdefault((event["job"], event["seq"]), set()).add(
                request["headers"]["webhook-id"])
            arrivals.setdefault(event["job"], []).append(event["seq"])
        # A duplicate carries the same webhook-id; each job's deliveries come in order.
        assert all(ids == {f"{job}.{seq}"} for (job, seq), ids in by_message.items())
        assert all(seqs == sorted(seqs) for seqs in arrivals.values()), arrivals
        assert len(requests) > sum(map(len, wanted.values()))  # the failures were retried

        # The receiver that never answers: each job's terminal event is a dead letter.
        wait_for(lambda: len(dead_letters(server)) == len(jobs), 15, "the dead letters")
        letters = dead_letters(server)
        assert {(letter["job"], letter["seq"]) for letter in letters} == {
            (job_id, max(seqs)) for job_id, seqs in wanted.items()}
        assert all(letter["webhook"] == "dead" and letter["attempts"] >= 1
                   and "no answer within 0.5 s" in letter["error"] for letter in letters)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'metis_webhook_delivered_total{webhook="app"}' in metrics
        assert 'metis_webhook_failed_total{webhook="dead"}' in metrics
        assert 'metis_webhook_lag_seconds{webhook="app"} 0.0' in metrics
        assert 'metis_webhook_retrying{webhook="app"} 0.0' in metrics

        # Replayed from the CLI once the receiver answers: it arrives, signed, and leaves
        # the list; a receiver still down leaves the letter there.
        letter = letters[0]
        dead.stop()
        refused = cli(server, "webhooks", "replay", letter["id"])
        assert refused.returncode == 1 and "(502)" in refused.stderr, refused
        dead.start()
        listed = cli(server, "webhooks", "failed")
        assert listed.returncode == 0 and letter["id"] in listed.stdout, listed
        replayed = cli(server, "webhooks", "replay", letter["id"])
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.strip() == f"{letter['id']} delivered"
        taken = [request for request in dead.requests() if request["status"] == 204]
        assert len(taken) == 1
        body = Receiver(DEAD_SECRET).verify(taken[0]["body"], taken[0]["headers"])
        assert (body["data"]["event"]["job"], body["data"]["event"]["seq"]) == (
            letter["job"], letter["seq"])
        assert body["type"] == f"job.{body['data']['event']['type']}"
        assert letter["id"] not in {other["id"] for other in dead_letters(server)}
        assert cli(server, "webhooks", "replay", letter["id"]).returncode == 1  # gone: 404
        assert elapsed < 60
    finally:
        server.stop()


def test_a_webhook_with_an_owner_sends_only_that_keys_jobs_and_letters_need_an_admin(
        receivers: Callable[[], ReceiverProcess], tmp_path: Path) -> None:
    receiver = receivers()
    alice, root = "alice-key-of-the-webhooks-test", "root-key-of-the-webhooks-test"
    server = ServerProcess(
        state_dir=tmp_path / "server",
        server_settings={"keys": {"alice": {"key": hash_api_key(alice), "role": "client"},
                                  "root": {"key": hash_api_key(root), "role": "admin"}}},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + f"""
[webhooks.alice]
url = "{receiver.url}"
secret = "{APP_SECRET}"
events = ["terminal"]
owner = "alice"
""")
    receiver.start()
    server.start()
    try:
        others = submit(server, key=root, text="not alice's", delay=0)
        own = submit(server, key=alice, text="alice's", delay=0)
        admin = {"Authorization": f"Bearer {root}"}
        for job_id in (others, own):
            wait_for(lambda job_id=job_id: JobState(httpx.get(  # type: ignore[misc]
                f"{server.url}/api/jobs/{job_id}", headers=admin, timeout=10).json()["state"]
            ).terminal, 30, "the jobs to end")
        wait_for(lambda: bool(receiver.requests()), 15, "alice's webhook")
        time.sleep(1)  # time enough for the other job's, were it sent
        sent = [Receiver(APP_SECRET).verify(request["body"], request["headers"])
                for request in receiver.requests()]
        assert [(body["data"]["job"]["id"], body["data"]["job"]["owner"]) for body in sent] == [
            (own, "alice")]

        client = {"Authorization": f"Bearer {alice}"}
        for method, path in [("GET", "/api/webhooks/failed"),
                             ("POST", "/api/webhooks/failed/alice:x.1/replay")]:
            refused = httpx.request(method, server.url + path, headers=client, timeout=10)
            assert refused.status_code == 403 and "admin key" in refused.json()["error"]
        assert httpx.get(f"{server.url}/api/webhooks/failed", headers=admin,
                         timeout=10).json() == {"failed": []}
        missing = httpx.post(f"{server.url}/api/webhooks/failed/alice:x.1/replay",
                             headers=admin, timeout=10)
        assert missing.status_code == 404 and "webhooks failed" in missing.json()["error"]
    finally:
        server.stop()
