"""Counters for operators, rendered in the Prometheus text format. Pure code.

Each server process counts what it did itself; Prometheus sums the processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

Labels = tuple[tuple[str, str], ...]

HELP = {
    "metis_jobs_created_total": ("counter", "Jobs created by this process."),
    "metis_jobs_ended_total": ("counter", "Jobs that reached a terminal event here, by type."),
    "metis_submissions_failed_total": ("counter", "Submissions the scheduler refused."),
    "metis_events_appended_total": ("counter", "Events appended, by who posted them and, "
                                    "for a job's own, the path they came by (http, spool)."),
    "metis_events_delivered_total": ("counter", "Event frames sent to watchers."),
    "metis_http_errors_total": ("counter", "Error responses, by HTTP status."),
    "metis_open_streams": ("gauge", "Websockets and Server-Sent Events streams open now."),
    "metis_cluster_state": ("gauge", "1 for the state each cluster is in, as this process's "
                            "monitor saw it last (ok, degraded, unreachable, "
                            "login_needed)."),
    "metis_spool_reads_total": ("counter", "Spool reads (one command each), by cluster."),
    "metis_spool_bytes_total": ("counter", "Bytes read from spools, by cluster."),
    "metis_spool_damage_total": ("counter", "Spool reads that skipped damage, by cluster."),
    "metis_spool_lag_seconds": ("gauge", "Seconds since the spool reader was last caught up "
                                "with every live job of the cluster."),
    "metis_webhook_delivered_total": ("counter", "Events a webhook's receiver took, by "
                                      "webhook."),
    "metis_webhook_failed_total": ("counter", "Events that became dead letters, by webhook."),
    "metis_webhook_retrying": ("gauge", "Jobs whose next event waits to be tried again, by "
                               "webhook (0 but in the process that sends it)."),
    "metis_webhook_lag_seconds": ("gauge", "Seconds since the oldest event that a webhook has "
                                  "yet to send happened (0 but in the process that sends it)."),
}


class Metrics:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, Labels]] = Counter()
        self._gauges: dict[tuple[str, Labels], Callable[[], float]] = {}

    def count(self, name: str, amount: int = 1, **labels: str) -> None:
        self._counts[name, tuple(sorted(labels.items()))] += amount

    def gauge(self, name: str, read: Callable[[], float], **labels: str) -> None:
        """A value read when the metrics are rendered."""
        self._gauges[name, tuple(sorted(labels.items()))] = read

    def render(self) -> str:
        values: dict[str, dict[Labels, float]] = {name: {} for name in HELP}
        for (name, labels), amount in self._counts.items():
            values.setdefault(name, {})[labels] = amount
        for (name, labels), read in self._gauges.items():
            values.setdefault(name, {})[labels] = read()
        lines = []
        for name, samples in values.items():
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(samples.items()) or [((), 0.0)]:
                lines.append(f"{name}{_labels(dict(labels))} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A count exactly (``:g`` keeps 6 digits: 1234567 bytes would be 1.23457e+06, and a
    rate over it would move in steps), a gauge's float as Python writes it."""
    return str(value) if isinstance(value, int) else repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
