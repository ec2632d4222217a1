"""Webhooks: which events a webhook wants, what it sends, and how it is signed. Pure code.

A ``[webhooks.NAME]`` table (docs/webhooks.md) becomes a :class:`Webhook`. Deliveries
follow the Standard Webhooks specification (https://www.standardwebhooks.com): the
headers ``webhook-id`` (stable per event: the job's id and the event's seq, the same on
every retry), ``webhook-timestamp`` (the attempt's, in seconds) and ``webhook-signature``
(``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret), so that a
receiver verifies them with the ``standardwebhooks`` library. The body is the job's
record and the event, never a token.

The deliverer (metis_stream.deliverer) does the I/O; the backend keeps what these records
describe (:class:`HookProgress`, :class:`DeadLetter`, :class:`Change`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from metis_stream.backoff import Backoff
from metis_stream.errors import ConfigError
from metis_stream.events import Event, JsonValue
from metis_stream.jobs import Job, JobState, state_after
from metis_stream.keys import ApiKey

__all__ = [
    "DeadLetter",
    "Webhook",
    "new_secret",
    "sign",
]

SECRET_PREFIX = "whsec_"  # noqa: S105 (the form's prefix, not a secret)
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
"""The specification's bounds for a secret, decoded."""
WEBHOOK_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
EVENT_CLASSES = ("state", "terminal", "all")
"""What ``events`` may name: events that change the job's state, terminal events, every
event. Chosen event types go in ``types``, a list of their own, so that no job's own
type can be mistaken for one of these words."""
DEFAULT_EVENTS = ("state",)
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRY_PERIOD = 24 * 3600.0
DEFAULT_RETRY_BASE = 1.0
DEFAULT_RETRY_CAP = 600.0


@dataclass(frozen=True, slots=True)
class Webhook:
    """One ``[webhooks.NAME]`` table."""

    name: str
    url: str
    secret: bytes
    """Decoded from the ``whsec_`` base64 form the configuration gives."""
    events: frozenset[str] = frozenset(DEFAULT_EVENTS)
    """Of :data:`EVENT_CLASSES`."""
    types: frozenset[str] = frozenset()
    """Event types sent whatever ``events`` says."""
    templates: frozenset[str] = frozenset()
    """Only jobs of these templates; empty: every template."""
    owner: ApiKey | None = None
    """Only jobs this key sees (``ApiKey.sees``, the one rule): a client key's own."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds one attempt may take."""
    retry_period: float = DEFAULT_RETRY_PERIOD
    """Seconds a job's deliveries may keep failing before its undelivered events go to the
    dead letters."""
    retry_base: float = DEFAULT_RETRY_BASE
    retry_cap: float = DEFAULT_RETRY_CAP

    def wants_job(self, job: Job) -> bool:
        return ((not self.templates or job.template in self.templates)
                and (self.owner is None or self.owner.sees(job.owner)))

    def wants_event(self, event: Event, state_before: JobState) -> bool:
        """Whether to send ``event``, which found its job in ``state_before``."""
        return ("all" in self.events or event.type in self.types
                or ("terminal" in self.events and event.terminal)
                or ("state" in self.events
                    and state_after(state_before, event.type) != state_before))

    def backoff(self, attempts: int = 0) -> Backoff:
        """The waits between attempts, after ``attempts`` failed ones."""
        return Backoff(base=self.retry_base, cap=self.retry_cap, attempt=attempts)

    def gives_up(self, failing_since: float, now: float) -> bool:
        """Whether deliveries that have failed since ``failing_since`` go to dead letters."""
        return now - failing_since >= self.retry_period

    def request(self, job: Job, event: Event, timestamp: int) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one attempt to send ``event`` of ``job``."""
        body = payload(self.name, job, event)
        msg_id = message_id(event.job, event.seq)
        return body, {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, msg_id, timestamp, body),
        }


@dataclass(frozen=True, slots=True)
class Change:
    """An append, as the backend's journal of changes keeps it: which job, which seqs."""

    id: str
    """Its place in the journal; opaque, in the backend's order."""
    job: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class HookProgress:
    """How far one webhook has sent one job's events, kept so that a restart resumes."""

    delivered: int
    """The last seq that was sent or skipped; the next one is sent next."""
    state: JobState | None = None
    """The job's state after ``delivered``; None: not known yet (found by reading the log
    from its start)."""
    failing_since: float | None = None
    """When the first of the attempts that have failed in a row failed."""
    attempts: int = 0
    """Attempts that have failed in a row."""

    def as_json(self) -> dict[str, JsonValue]:
        return {"delivered": self.delivered,
                "state": None if self.state is None else self.state.value,
                "failing_since": self.failing_since, "attempts": self.attempts}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HookProgress:
        state = raw.get("state")
        return cls(delivered=int(raw["delivered"]),
                   state=None if state is None else JobState(state),
                   failing_since=raw.get("failing_since"), attempts=int(raw.get("attempts", 0)))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a webhook gave up sending, kept until it is replayed."""

    webhook: str
    job: str
    seq: int
    type: str
    attempts: int
    error: str
    failed: float

    @property
    def id(self) -> str:
        return f"{self.webhook}:{message_id(self.job, self.seq)}"

    def as_json(self) -> dict[str, JsonValue]:
        return {"id": self.id, "webhook": self.webhook, "job": self.job, "seq": self.seq,
                "type": self.type, "attempts": self.attempts, "error": self.error,
                "failed": self.failed}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DeadLetter:
        return cls(webhook=raw["webhook"], job=raw["job"], seq=int(raw["seq"]),
                   type=raw["type"], attempts=int(raw["attempts"]), error=raw["error"],
                   failed=float(raw["failed"]))


def message_id(job_id: str, seq: int) -> str:
    """``webhook-id``: the same for every attempt to send one event, so that a receiver
    drops the duplicates that at-least-once delivery sends."""
    return f"{job_id}.{seq}"


def payload(webhook: str, job: Job, event: Event) -> bytes:
    """The body: ``type`` (``job.`` and the event's type), ``timestamp`` (the event's) and
    ``data`` with the webhook's name, the job's record as it is when sent, and the event.
    The record holds no token: a watch or job token is derived from the server's secret,
    never kept."""
    return orjson.dumps({
        "type": f"job.{event.type}",
        "timestamp": datetime.fromtimestamp(event.time, UTC).isoformat(),
        "data": {"webhook": webhook, "job": job.as_dict(), "event": event.as_dict()},
    })


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,`` and the base64 HMAC-SHA256 of ``id.timestamp.body``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def new_secret() -> str:
    """A new secret in the ``whsec_`` form, for a ``[webhooks.NAME]`` table and its
    receiver."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_secret(text: object, where: str) -> bytes:
    """A ``whsec_`` secret, decoded; ConfigError says how to make a good one."""
    remedy = "`metis-stream webhooks new-secret` prints a new one"
    if not isinstance(text, str) or not text.startswith(SECRET_PREFIX):
        raise ConfigError(f"{where} secret must be whsec_ and base64 (the Standard Webhooks "
                          f"form that receivers give their library): {remedy}")
    try:
        secret = base64.b64decode(text.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where} secret is not valid base64 after whsec_: {remedy}") from None
    if not MIN_SECRET_BYTES <= len(secret) <= MAX_SECRET_BYTES:
        raise ConfigError(f"{where} secret is {len(secret)} bytes decoded; it must be "
                          f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}: {remedy}")
    return secret
