"""metis_stream.metrics: the Prometheus text format, counts exact at any size."""

from __future__ import annotations

from metis_stream.metrics import Metrics


def samples(metrics: Metrics) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in metrics.render().splitlines()
                if line and not line.startswith("#"))


def test_a_count_is_written_whole_however_large() -> None:
    metrics = Metrics()
    metrics.count("metis_spool_bytes_total", 1_234_567, cluster="c")
    metrics.count("metis_spool_bytes_total", 10**12, cluster="c")
    metrics.count("metis_spool_reads_total", cluster="c")
    found = samples(metrics)
    assert found['metis_spool_bytes_total{cluster="c"}'] == "1000001234567"
    assert found['metis_spool_reads_total{cluster="c"}'] == "1"


def test_a_gauge_keeps_its_digits_and_a_metric_without_samples_is_zero() -> None:
    metrics = Metrics()
    metrics.gauge("metis_spool_lag_seconds", lambda: 1234.56789, cluster="c")
    metrics.gauge("metis_open_streams", lambda: 3)
    found = samples(metrics)
    assert float(found['metis_spool_lag_seconds{cluster="c"}']) == 1234.56789
    assert found["metis_open_streams"] == "3"
    assert float(found["metis_jobs_created_total"]) == 0
