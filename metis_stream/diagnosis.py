"""What ``metis-stream doctor`` found out about a cluster, and how it says so (docs/doctor.md).

Pure code: the findings, the judgement of the probe job's report, the choice of a
``delivery``, and the two renderings (lines for a person, JSON for a script). The checks
themselves run in metis_stream.doctor.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from metis_stream.errors import EXIT_FAILED

Status = Literal["ok", "warning", "problem"]
"""``problem``: real jobs fail until it is changed; ``warning``: they run, with a risk
or a cost worth changing."""

MARKS: dict[Status, str] = {"ok": "✓", "warning": "!", "problem": "✗"}
ASCII_MARKS: dict[Status, str] = {"ok": "ok", "warning": "!", "problem": "X"}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    """What was checked, in a few words (``connection``, ``route``)."""
    status: Status
    found: str
    """What was found, in plain words."""
    change: str = ""
    """For a warning or a problem: what to change, naming the config key or the
    scheduler's setting."""

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "found": self.found,
                "change": self.change}


@dataclass(slots=True)
class Diagnosis:
    cluster: str
    findings: list[Finding] = field(default_factory=list)
    recommended_delivery: str | None = None
    """What the probe job showed to work (:func:`recommend_delivery`); None when it could
    not tell."""

    def add(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        return finding

    @property
    def blocked(self) -> bool:
        return any(finding.status == "problem" for finding in self.findings)

    @property
    def exit_status(self) -> int:
        """0 when jobs can run (warnings allowed), 1 when something blocks them."""
        return EXIT_FAILED if self.blocked else 0


# ---------------------------------------------------------------------------- the probe


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What the probe job (jobscripts/doctor-probe) wrote in its folder's ``doctor`` file."""

    host: str = ""
    value: str | None = None
    """METIS_DOCTOR_VALUE as the job received it; None when it did not."""
    curl: bool = False
    http_status: str = ""
    """curl's ``%{http_code}``: ``000`` when no answer came."""
    curl_error: str = ""


def parse_probe_report(data: bytes) -> ProbeReport:
    values: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name] = value
    value = values.get("value", "unset")
    return ProbeReport(host=values.get("host", ""),
                       value=None if value == "unset" else value,
                       curl=values.get("curl") == "yes",
                       http_status=values.get("http_status", ""),
                       curl_error=values.get("curl_error", ""))


@dataclass(frozen=True, slots=True)
class Route:
    """Whether a compute node reaches the server at the URL jobs are given."""

    works: bool
    finding: Finding


def judge_route(report: ProbeReport, url: str, cluster: str) -> Route:
    """The route from the probe's node to ``url`` (the server's ``public_url``): a server
    of this configuration answers the probe's request 404 (its token is good, the probe
    is no job of the server's)."""
    node = f"the compute node ({report.host})" if report.host else "the compute node"
    if not report.curl:
        return Route(False, Finding(
            "route", "problem", f"{node} has no curl: jobs cannot post events over HTTP",
            f'install curl on the compute nodes, or set delivery = "spool" in '
            f"[clusters.{cluster}]"))
    status = report.http_status
    if status == "404":
        return Route(True, Finding("route", "ok", f"{node} reaches {url}"))
    if status == "401":
        return Route(False, Finding(
            "route", "problem",
            f"{node} reaches {url}, but the server there refuses this configuration's job "
            "tokens: it runs with another secret",
            "give the server and this command the same [server] secret (or METIS_SECRET, "
            "or the same state_dir), or point public_url at this configuration's server"))
    if status in ("", "000"):
        why = f" ({report.curl_error})" if report.curl_error else ""
        return Route(False, Finding(
            "route", "problem", f"{node} cannot reach {url}{why}",
            f'set delivery = "spool" in [clusters.{cluster}] (events then travel through '
            "the shared filesystem), or open the network from the compute nodes to the "
            "server, or set [server] public_url to an address they reach"))
    return Route(False, Finding(
        "route", "problem",
        f"{node} reaches {url}, but what answers is not this metis-stream server "
        f"(HTTP {status})",
        "set [server] public_url to the address where the compute nodes reach this "
        "server (through a proxy, it must pass /api/jobs/... on unchanged)"))


# ---------------------------------------------------------------------------- delivery


def as_needed(finding: Finding, delivery: str, path: Literal["http", "spool"],
              other_works: bool) -> Finding:
    """A broken path (the route: ``http``; the spool) as it matters to the configured
    ``delivery``: it blocks jobs only when they have no other path (``http`` needs the
    route, ``spool`` the spool, ``both`` either); otherwise it is a warning."""
    if finding.status != "problem":
        return finding
    needed = delivery == path or (delivery == "both" and not other_works)
    if needed:
        return finding
    return replace(finding, status="warning",
                   change=f'jobs do without it while delivery = "{delivery}" (see delivery)')


def recommend_delivery(route: bool, spool: bool) -> str | None:
    """The ``delivery`` for what works: both paths, the one that works, or none."""
    if route and spool:
        return "both"
    if spool:
        return "spool"
    if route:
        return "http"
    return None


def delivery_finding(cluster: str, configured: str, route: bool, spool: bool) -> Finding:
    """Whether the configured ``delivery`` works, given what the probe found."""
    recommended = recommend_delivery(route, spool)
    key = f"[clusters.{cluster}] delivery"
    if recommended is None:
        return Finding("delivery", "problem",
                       "neither path works: jobs can post no event at all",
                       "fix the route or the spool (see above), then run doctor again")
    if recommended == configured:
        return Finding("delivery", "ok", f'delivery = "{configured}" is the right one here')
    works = {"http": route, "spool": spool, "both": route or spool}[configured]
    change = f'set {key} = "{recommended}"'
    if not works:
        return Finding("delivery", "problem",
                       f'delivery = "{configured}" needs a path that does not work here',
                       change)
    if configured == "both":
        broken = "the route" if not route else "the spool"
        return Finding("delivery", "warning",
                       f'delivery = "both" works, but {broken} does not: each job first '
                       "waits for metis-emit's retries before it falls back",
                       change)
    return Finding("delivery", "warning",
                   f'delivery = "{configured}" works; "{recommended}" would also work, '
                   "with a second path as a safety net", change)


# ---------------------------------------------------------------------------- rendering


def render_text(diagnosis: Diagnosis, *, utf8: bool) -> str:
    """One line per finding, with what to change on the next for warnings and problems;
    then the recommendation and the verdict."""
    marks = MARKS if utf8 else ASCII_MARKS
    arrow = "→" if utf8 else "->"
    lines = []
    for finding in diagnosis.findings:
        lines.append(f"{marks[finding.status]} {finding.check}: {finding.found}")
        if finding.change and finding.status != "ok":
            lines.append(f"    {arrow} {finding.change}")
    if diagnosis.recommended_delivery is not None:
        lines.append(f'recommended: delivery = "{diagnosis.recommended_delivery}" in '
                     f"[clusters.{diagnosis.cluster}]")
    if diagnosis.blocked:
        lines.append(f"{diagnosis.cluster}: something above blocks real jobs")
    else:
        warned = any(finding.status == "warning" for finding in diagnosis.findings)
        lines.append(f"{diagnosis.cluster}: jobs can run" +
                     (" (see the warnings)" if warned else ""))
    return "\n".join(lines) + "\n"


def render_json(diagnosis: Diagnosis) -> dict[str, Any]:
    return {"cluster": diagnosis.cluster, "ok": not diagnosis.blocked,
            "exit_status": diagnosis.exit_status,
            "recommended_delivery": diagnosis.recommended_delivery,
            "checks": [finding.as_json() for finding in diagnosis.findings]}
