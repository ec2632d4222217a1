"""The spool on the local scheduler, against a real server: events that a job writes to
its spool arrive, in order, once, marked as arrived by the spool; damage is reported
and nothing is invented. The job side (metis-emit writing the spool) is tested in
test_metis_emit; here the scripts write their spool lines themselves, so that the
server's reader is tested alone. The real cluster's tests are in test_spool_cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    ServerProcess,
    history,
    running,
    script_templates,
    submit,
)

SPOOL_CLUSTER = LOCAL_CLUSTER.replace("poll_interval = 0.3",
                                      'poll_interval = 0.3\ndelivery = "spool"\n'
                                      "spool_interval = 0.2")
# Spool lines written by the script itself: "spool N TYPE DATA" appends one event.
SPOOL_FUNCTION = (
    'spool() { printf \'{"type":"%s","data":%s,"id":"%s"}\\n\' "$2" "$3" "$1" '
    '>> "$METIS_JOB_DIR/events.ndjson"; }\n')
SCRIPTS = {
    "steps": SPOOL_FUNCTION + 'i=1; while [ $i -le 40 ]; do spool "s$i" step "\\"step $i\\""; '
             'sleep 0.02; i=$((i + 1)); done\n',
    # Two events, then (once the server has taken them) the spool cut to nothing and
    # rewritten with a line that is no event and two more events.
    "truncated": SPOOL_FUNCTION + 'spool a1 step \'"one"\'; spool a2 step \'"two"\'\n'
                 'while [ ! -e "$METIS_JOB_DIR/go" ]; do sleep 0.05; done\n'
                 ': > "$METIS_JOB_DIR/events.ndjson"\n'
                 'echo "not an event" >> "$METIS_JOB_DIR/events.ndjson"\n'
                 'spool a1 step \'"one"\'; spool a3 step \'"three"\'\n'
                 'sleep 1\n',
}


@pytest.fixture
def server(tmp_path: Path) -> ServerProcess:
    # The example templates too: tokens, whose script calls metis-emit as any job does.
    return ServerProcess(state_dir=tmp_path / "server", extra_config=SPOOL_CLUSTER
                         + EXAMPLE_TEMPLATES + script_templates(tmp_path / "scripts", SCRIPTS))


def wait_for(server: ServerProcess, job_id: str, check: Any, timeout: float = 30
             ) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = history(server, job_id)
        if check(events):
            return events
        time.sleep(0.1)
    raise AssertionError(f"job {job_id}: {history(server, job_id)}")


def ended(events: list[dict[str, Any]]) -> bool:
    return bool(events) and events[-1]["type"] in ("completed", "fatal", "cancelled")


def test_spooled_events_arrive_in_order_once_and_say_how(server: ServerProcess) -> None:
    with running(server):
        job_id = submit(server, "steps")
        events = wait_for(server, job_id, ended)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    steps = [event for event in events if event["type"] == "step"]
    assert [event["data"] for event in steps] == [f"step {i}" for i in range(1, 41)]
    assert all(event["via"] == "spool" for event in steps)
    assert events[-1]["type"] == "completed"
    assert 'metis_events_appended_total{by="job",path="spool"}' in metrics
    assert 'metis_spool_lag_seconds{cluster="local"}' in metrics
    # Removed with the token once the job ended (spool_keep = 0).
    job_dir = server.state_dir / "jobs" / "local" / job_id
    assert not (job_dir / "events.ndjson").exists()


def test_a_job_that_uses_metis_emit_sends_nothing_over_the_network(
        server: ServerProcess) -> None:
    text = "every word through the spool, none over HTTP"
    with running(server):
        job_id = submit(server, "tokens", text=text, delay=0.01)
        events = wait_for(server, job_id, ended)
        log = server.log()
    assert events[-1]["type"] == "completed"
    assert "".join(e["data"] for e in events if e["type"] == "token") == text
    from_job = [e for e in events if e["type"] not in ("starting", "submitted", "running")]
    assert from_job and all(e.get("via") == "spool" for e in from_job), from_job
    assert f"POST /api/jobs/{job_id}/events" not in log


def test_a_truncated_spool_is_reported_and_nothing_is_invented(server: ServerProcess) -> None:
    with running(server):
        job_id = submit(server, "truncated")
        job_dir = server.state_dir / "jobs" / "local" / job_id
        wait_for(server, job_id, lambda events: [e["data"] for e in events
                                                 if e["type"] == "step"] == ["one", "two"])
        (job_dir / "go").touch()
        events = wait_for(server, job_id, ended)
    steps = [event["data"] for event in events if event["type"] == "step"]
    assert steps == ["one", "two", "three"], "a1 came again and was dropped by its id"
    notices = [line for event in events if event["type"] == "log"
               and event["data"].get("stream") == "notice" for line in event["data"]["lines"]]
    # Read before or after it grew again: shrunk, or changed under the cursor.
    assert any("the spool shrank" in line or "(rewritten in place)" in line
               for line in notices), notices
    assert any("the line at byte 0 is not an event" in line for line in notices), notices
    assert all(event["data"].get("source") == "spool" for event in events
               if event["type"] == "log" and event["data"].get("stream") == "notice")
