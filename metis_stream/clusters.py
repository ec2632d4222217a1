"""Cluster health: whether the server can reach a cluster and its scheduler now, since
when, and why not (docs/clusters.md).

An unreachable cluster is not a dead job: while a cluster cannot be polled, none of its
jobs is judged, and their watchers are told once that the news is stale (``stale``) and
once that it is fresh again (``recovered``). Pure: the states and their transitions; the
monitor feeds them each poll's outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from metis_stream.errors import LoginNeeded, ShellError

ClusterState = Literal["ok", "degraded", "unreachable", "login_needed"]
CLUSTER_STATES: tuple[ClusterState, ...] = ("ok", "degraded", "unreachable", "login_needed")
"""``ok``: the last poll worked. ``degraded``: the connection works, the scheduler's
commands fail (slurmctld or pbs_server down). ``unreachable``: no connection (sshd down,
the network). ``login_needed``: no connection, and opening one needs an operator's second
factor (``metis-stream login``, docs/login.md)."""

STALE = "stale"
RECOVERED = "recovered"

CAUSES: dict[ClusterState, str] = {
    "degraded": "the cluster's scheduler does not answer",
    "unreachable": "the server cannot reach the cluster",
    "login_needed": "the cluster waits for an operator to log in",
}
"""What a job's watchers are told of an outage: plain words, no host or user names."""


@dataclass(frozen=True, slots=True)
class ClusterHealth:
    name: str
    state: ClusterState = "ok"
    since: float = 0.0
    """When the cluster entered ``state`` (seconds since the epoch)."""
    last_error: str = ""
    """The last failure in the error's own words, which may name hosts, users and paths:
    for API key holders only (empty once it works again). Watchers get plain_cause."""
    checked: float = 0.0
    """When the cluster was last polled: health that is not checked any more (no process
    polls the cluster) shows as old."""
    flavour: str = ""
    """Which batch system answers (``pbspro``, ``torque``, ``slurm``; metis_stream.
    schedulers.flavour), as found when the poller connected; empty while not known."""
    version: str = ""
    """Its version, as it printed it."""

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "since": self.since,
                "last_error": self.last_error, "checked": self.checked,
                "flavour": self.flavour, "version": self.version}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClusterHealth:
        state = raw["state"]
        if state not in CLUSTER_STATES:
            raise ValueError(f"unknown cluster state {state!r}")
        # Health kept by a version before flavours has none.
        return cls(name=str(raw["name"]), state=state, since=float(raw["since"]),
                   last_error=str(raw["last_error"]), checked=float(raw["checked"]),
                   flavour=str(raw.get("flavour", "")), version=str(raw.get("version", "")))


AGENT_AWAY_AFTER = 15.0
"""Seconds without news of an agent (a poll held open tells every few seconds) after which
it counts as disconnected."""


@dataclass(frozen=True, slots=True)
class AgentPresence:
    """What the server knows of a cluster's agent (``link = "agent"``, docs/agent.md)."""

    name: str
    """The cluster's."""
    seen: float = 0.0
    """When a poll of the agent last held the line (seconds since the epoch)."""
    since: float = 0.0
    """When it connected, after it had been away."""
    last_error: str = ""
    """Why its link broke last, in the agent's own words, as it said when it came back."""

    def connected(self, now: float) -> bool:
        return now - self.seen < AGENT_AWAY_AFTER

    def view(self, now: float) -> dict[str, Any]:
        """For the cluster status: connected or not, since when, and the last error."""
        connected = self.connected(now)
        return {"connected": connected, "since": self.since if connected else self.seen,
                "last_error": self.last_error}

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "seen": self.seen, "since": self.since,
                "last_error": self.last_error}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AgentPresence:
        return cls(name=str(raw["name"]), seen=float(raw["seen"]), since=float(raw["since"]),
                   last_error=str(raw["last_error"]))


def state_of_failure(error: BaseException) -> ClusterState:
    """``login_needed`` when the connection waits for an operator's login (LoginNeeded
    anywhere in the chain of causes), ``unreachable`` when it failed otherwise (a
    ShellError), else ``degraded``: the cluster answered, its scheduler did not."""
    chain = _chain(error)
    if any(isinstance(link, LoginNeeded) for link in chain):
        return "login_needed"
    if any(isinstance(link, ShellError) for link in chain):
        return "unreachable"
    return "degraded"


def after_poll(health: ClusterHealth, error: BaseException | None, now: float
               ) -> ClusterHealth:
    """The cluster's health after a poll that worked (``error`` None) or failed."""
    if error is None:
        if health.state == "ok":
            return replace(health, checked=now)
        return replace(health, state="ok", since=now, last_error="", checked=now)
    state = state_of_failure(error)
    words = ""
    for link in _chain(error):
        # A message that already quotes its cause's (as a scheduler's errors do) says it.
        if str(link) not in words:
            words += ("; caused by " if words else "") + _described(link)
    if state == health.state:
        return replace(health, last_error=words, checked=now)
    return replace(health, state=state, since=now, last_error=words, checked=now)


def went_stale(before: ClusterHealth, after: ClusterHealth) -> bool:
    """Whether watchers of the cluster's jobs get ``stale``: once when it stops working
    (degraded to unreachable and back is the same outage)."""
    return before.state == "ok" and after.state != "ok"


def recovered(before: ClusterHealth, after: ClusterHealth) -> bool:
    return before.state != "ok" and after.state == "ok"


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not seen for seen in chain):
        chain.append(link)
        link = link.__cause__
    return chain


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
