"""Unit tests of metis_stream.webhooks: signing, event selection, the retry schedule, the
payload. Pure code; the receiver's side is the ``standardwebhooks`` library itself."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import orjson
import pytest
from standardwebhooks import Webhook as Receiver
from standardwebhooks.webhooks import WebhookVerificationError

from metis_stream.errors import ConfigError
from metis_stream.events import Event
from metis_stream.jobs import Job, JobState
from metis_stream.keys import ApiKey, Role
from metis_stream.webhooks import (
    DeadLetter,
    HookProgress,
    Webhook,
    message_id,
    new_secret,
    parse_secret,
    sign,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def hook(**options: object) -> Webhook:
    return Webhook(name="app", url="http://127.0.0.1:9/hook", secret=parse_secret(SECRET, "x"),
                   **options)  # type: ignore[arg-type]


def job(**fields: object) -> Job:
    return Job(**{"id": "j_1", "template": "tokens", "cluster": "local", "owner": "alice",
                  **fields})  # type: ignore[arg-type]


def event(event_type: str, seq: int = 3) -> Event:
    return Event(job="j_1", seq=seq, type=event_type, data={"n": seq}, time=1_700_000_000.5)


def test_the_signature_is_the_specifications_own_example():
    """The example of the Standard Webhooks reference libraries' tests."""
    secret = parse_secret(SECRET, "x")
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_request_verifies_with_standardwebhooks_and_a_changed_one_does_not():
    now = int(time.time())
    body, headers = hook().request(job(), event("step"), now)
    assert orjson.loads(body) == Receiver(SECRET).verify(body, headers)
    assert headers["webhook-id"] == "j_1.3" == message_id("j_1", 3)
    assert headers["webhook-timestamp"] == str(now)
    with pytest.raises(WebhookVerificationError):
        Receiver(SECRET).verify(body.replace(b"step", b"stop"), headers)
    with pytest.raises(WebhookVerificationError):
        Receiver(new_secret()).verify(body, headers)


def test_the_id_is_the_same_on_every_attempt_and_the_timestamp_is_the_attempts():
    first = hook().request(job(), event("step"), 1000)[1]
    again = hook().request(job(), event("step"), 2000)[1]
    assert first["webhook-id"] == again["webhook-id"]
    assert first["webhook-signature"] != again["webhook-signature"]


def test_the_payload_is_the_job_and_the_event_and_no_token():
    record = job(state=JobState.RUNNING, last_seq=3)
    body = orjson.loads(hook().request(record, event("step"), 0)[0])
    assert body["type"] == "job.step"
    assert datetime.fromisoformat(body["timestamp"]) == datetime.fromtimestamp(1_700_000_000.5,
                                                                               UTC)
    assert body["data"] == {"webhook": "app", "job": record.as_dict(),
                            "event": event("step").as_dict()}
    assert not [key for key in body["data"]["job"] if "token" in key]


@pytest.mark.parametrize(("events", "types", "sent"), [
    # (type, state before): starting moves created on, a step moves queued to running, a
    # second step and stale/recovered on a running job move nothing.
    (["state"], [], {"starting", "submitted", "step@queued", "completed", "fatal"}),
    (["terminal"], [], {"completed", "fatal"}),
    (["all"], [], {"starting", "submitted", "step@queued", "step@running", "stale",
                   "completed", "fatal"}),
    ([], ["step"], {"step@queued", "step@running"}),
    (["terminal"], ["stale"], {"stale", "completed", "fatal"}),
])
def test_which_events_a_webhook_sends(events, types, sent):
    cases = {"starting": ("starting", JobState.CREATED),
             "submitted": ("submitted", JobState.SUBMITTING),
             "step@queued": ("step", JobState.QUEUED),
             "step@running": ("step", JobState.RUNNING),
             "stale": ("stale", JobState.RUNNING),
             "completed": ("completed", JobState.RUNNING),
             "fatal": ("fatal", JobState.QUEUED)}
    webhook = hook(events=frozenset(events), types=frozenset(types))
    assert {name for name, (kind, state) in cases.items()
            if webhook.wants_event(event(kind), state)} == sent


def test_which_jobs_a_webhook_sends():
    alice = ApiKey(name="alice", key="k1", role=Role.CLIENT)
    admin = ApiKey(name="root", key="k2", role=Role.ADMIN)
    assert hook().wants_job(job())
    assert hook(templates=frozenset({"tokens"})).wants_job(job())
    assert not hook(templates=frozenset({"download"})).wants_job(job())
    assert hook(owner=alice).wants_job(job())
    assert not hook(owner=alice).wants_job(job(owner="bob"))
    assert not hook(owner=alice).wants_job(job(owner=""))
    assert hook(owner=admin).wants_job(job(owner="bob"))


def test_the_retry_schedule_doubles_with_jitter_up_to_its_cap():
    webhook = hook(retry_base=1.0, retry_cap=8.0)
    for _ in range(50):
        backoff = webhook.backoff()
        delays = [backoff.next_delay() for _ in range(6)]
        for n, delay in enumerate(delays):
            ceiling = min(8.0, 2.0 ** n)
            assert ceiling / 2 <= delay <= ceiling
    # A restart resumes the schedule where the kept attempts left it.
    assert 4.0 <= webhook.backoff(attempts=3).next_delay() <= 8.0


def test_a_webhook_gives_up_after_its_retry_period():
    webhook = hook(retry_period=60.0)
    assert not webhook.gives_up(failing_since=1000.0, now=1059.9)
    assert webhook.gives_up(failing_since=1000.0, now=1060.0)


def test_progress_and_dead_letters_round_trip_through_json():
    progress = HookProgress(delivered=4, state=JobState.RUNNING, failing_since=12.5, attempts=3)
    assert HookProgress.from_json(orjson.loads(orjson.dumps(progress.as_json()))) == progress
    assert HookProgress.from_json(HookProgress(0).as_json()) == HookProgress(0)
    letter = DeadLetter(webhook="app", job="j_1", seq=4, type="step", attempts=9,
                        error="timed out", failed=99.5)
    assert letter.id == "app:j_1.4"
    assert DeadLetter.from_json(orjson.loads(orjson.dumps(letter.as_json()))) == letter


def test_new_secrets_parse_and_bad_ones_say_what_to_do():
    assert len(parse_secret(new_secret(), "x")) == 32
    short = "whsec_" + base64.b64encode(b"x" * 10).decode()
    for bad, words in [("hunter2", "whsec_"), ("whsec_not*base64", "base64"),
                       (short, "10 bytes"), (None, "whsec_")]:
        with pytest.raises(ConfigError, match=words) as error:
            parse_secret(bad, "[webhooks.app]")
        assert "metis-stream webhooks new-secret" in str(error.value)
