"""Unit tests of the pure parts of ``metis-stream doctor``: how long each batch system keeps
finished jobs (schedulers/visibility.py), the probe's report and the route it shows, the
choice of a delivery, the renderings (diagnosis.py), and the status line (terminal.py).
The checks themselves run against the real test cluster in tests/test_doctor_cluster.py."""

from __future__ import annotations

import io
import json

import pytest

from metis_stream.diagnosis import (
    Diagnosis,
    Finding,
    ProbeReport,
    as_needed,
    delivery_finding,
    judge_route,
    parse_probe_report,
    recommend_delivery,
    render_json,
    render_text,
)
from metis_stream.schedulers.visibility import parse_visibility, visibility_argv
from metis_stream.shells.base import CommandResult
from metis_stream.terminal import StatusLine, writes_utf8

# ---------------------------------------------------------------------------- visibility

# `scontrol show config` of Slurm 22.05 (the test cluster's), cut to the lines around it.
SCONTROL_CONFIG = """\
Configuration data as of 2025-11-30T12:00:00
AccountingStorageBackupHost = (null)
MaxStepCount            = 40000
MCSPlugin               = mcs/none
MinJobAge               = {age} sec
MpiDefault              = none
"""

# PBS Pro's `qmgr -c "print server"`: its settings written back as qmgr commands, the
# format of qmgr(8B) in the openpbs sources (doc/man8/qmgr.8B, "print server"); these
# are the settings of a fresh OpenPBS server with history enabled for a day, as the
# dask-gateway CI image sets it (`set server job_history_duration = 24:00:00`).
PBS_PRO_PRINT_SERVER = """\
#
# Create queues and set their attributes.
#
#
# Create and define queue workq
#
create queue workq
set queue workq queue_type = Execution
set queue workq enabled = True
set queue workq started = True
#
# Set server attributes.
#
set server scheduling = True
set server default_queue = workq
set server log_events = 511
set server mail_from = adm
set server query_other_jobs = True
set server resources_default.ncpus = 1
set server default_chunk.ncpus = 1
set server scheduler_iteration = 600
set server flatuid = True
{history}set server max_concurrent_provision = 5
"""

# Torque's `qmgr -c 'p s'` (qmgr(1B); the Torque Administrator Guide, appendix B, names
# keep_completed in seconds): queues, then `set server` lines, as a Torque 4 server
# printed them in a public install script (keep_completed = 300 there).
TORQUE_PRINT_SERVER = """\
#
# Create queues and set their attributes.
#
#
# Create and define queue batch
#
create queue batch
set queue batch queue_type = Execution
set queue batch resources_default.walltime = 24:00:00
set queue batch enabled = True
set queue batch started = True
#
# Set server attributes.
#
set server scheduling = True
set server acl_hosts = login1
set server default_queue = batch
set server log_events = 255
set server mail_from = adm
set server scheduler_iteration = 600
set server node_check_rate = 150
set server tcp_timeout = 90
set server mom_job_sync = True
{keep}set server next_job_number = 7
"""


def ok(stdout: str) -> CommandResult:
    return CommandResult(0, stdout, "")


def test_the_command_per_flavour():
    assert visibility_argv("slurm") == ["scontrol", "show", "config"]
    assert visibility_argv("pbspro") == visibility_argv("torque") == [
        "qmgr", "-c", "print server"]


@pytest.mark.parametrize(("age", "seconds"), [(300, 300.0), (30, 30.0), (0, 0.0)])
def test_slurm_min_job_age(age, seconds):
    kept = parse_visibility("slurm", ok(SCONTROL_CONFIG.format(age=age)))
    assert kept is not None
    assert kept.seconds == seconds
    assert kept.found == f"MinJobAge = {age} sec"
    assert "MinJobAge in slurm.conf" in kept.setting


def test_a_failed_command_or_a_missing_line_tells_nothing():
    assert parse_visibility("slurm", CommandResult(1, "", "scontrol: error")) is None
    assert parse_visibility("slurm", ok("MaxStepCount = 40000\n")) is None


@pytest.mark.parametrize(("history", "seconds", "found"), [
    ("set server job_history_enable = True\nset server job_history_duration = 24:00:00\n",
     86400.0, "job_history_enable = True, job_history_duration = 24:00:00"),
    ("set server job_history_enable = True\n", 14 * 86400.0,
     "job_history_enable = True, job_history_duration = 336:00:00 (default)"),
    ("set server job_history_enable = False\n", 0.0,
     "job_history_enable = False (finished jobs are not kept)"),
    ("", 0.0, "job_history_enable unset (finished jobs are not kept)"),
])
def test_pbs_pro_job_history(history, seconds, found):
    kept = parse_visibility("pbspro", ok(PBS_PRO_PRINT_SERVER.format(history=history)))
    assert kept is not None
    assert (kept.seconds, kept.found) == (seconds, found)
    assert "job_history_enable" in kept.setting


@pytest.mark.parametrize(("keep", "seconds", "found"), [
    ("set server keep_completed = 300\n", 300.0, "keep_completed = 300"),
    ("set server keep_completed = 10\n", 10.0, "keep_completed = 10"),
    ("", None, "keep_completed unset"),
])
def test_torque_keep_completed(keep, seconds, found):
    kept = parse_visibility("torque", ok(TORQUE_PRINT_SERVER.format(keep=keep)))
    assert kept is not None
    assert (kept.seconds, kept.found) == (seconds, found)
    assert "keep_completed" in kept.setting


# ---------------------------------------------------------------------------- the probe


def test_the_probe_report():
    report = parse_probe_report(b"host=node7\nvalue=a/b:c=d\ncurl=yes\nhttp_status=404\n"
                                b"curl_error=\n")
    assert report == ProbeReport(host="node7", value="a/b:c=d", curl=True, http_status="404")
    assert parse_probe_report(b"host=n\nvalue=unset\ncurl=no\n").value is None
    assert parse_probe_report(b"").value is None


def test_a_404_is_this_server_answering():
    route = judge_route(ProbeReport(host="n1", curl=True, http_status="404"), "http://s:8000",
                        "metis")
    assert route.works
    assert route.finding == Finding("route", "ok", "the compute node (n1) reaches http://s:8000")


def test_no_answer_is_a_blocked_route_and_says_to_spool():
    route = judge_route(ProbeReport(curl=True, http_status="000",
                                    curl_error="curl: (7) Failed to connect"),
                        "http://s:8000", "metis")
    assert not route.works
    assert route.finding.status == "problem"
    assert route.finding.found == ("the compute node cannot reach http://s:8000 "
                                   "(curl: (7) Failed to connect)")
    assert 'delivery = "spool" in [clusters.metis]' in route.finding.change


def test_another_secret_and_another_server_and_no_curl():
    other = judge_route(ProbeReport(curl=True, http_status="401"), "http://s", "c")
    assert not other.works
    assert "another secret" in other.finding.found
    assert "[server] secret" in other.finding.change
    stranger = judge_route(ProbeReport(curl=True, http_status="502"), "http://s", "c")
    assert not stranger.works
    assert "(HTTP 502)" in stranger.finding.found
    no_curl = judge_route(ProbeReport(curl=False), "http://s", "c")
    assert not no_curl.works
    assert "no curl" in no_curl.finding.found


# ---------------------------------------------------------------------------- delivery


@pytest.mark.parametrize(("route", "spool", "delivery"), [
    (True, True, "both"), (False, True, "spool"), (True, False, "http"), (False, False, None)])
def test_the_recommendation(route, spool, delivery):
    assert recommend_delivery(route, spool) == delivery


def test_a_configured_delivery_that_needs_a_broken_path_blocks_jobs():
    finding = delivery_finding("metis", "http", route=False, spool=True)
    assert finding.status == "problem"
    assert finding.change == 'set [clusters.metis] delivery = "spool"'
    assert delivery_finding("metis", "spool", route=True, spool=False).status == "problem"
    assert delivery_finding("metis", "both", route=False, spool=False).status == "problem"


def test_a_configured_delivery_that_works_is_at_most_a_warning():
    assert delivery_finding("m", "both", route=True, spool=True).status == "ok"
    assert delivery_finding("m", "spool", route=False, spool=True).status == "ok"
    both_blocked = delivery_finding("m", "both", route=False, spool=True)
    assert both_blocked.status == "warning"
    assert "the route does not" in both_blocked.found
    assert both_blocked.change == 'set [clusters.m] delivery = "spool"'
    only_spool = delivery_finding("m", "spool", route=True, spool=True)
    assert only_spool.status == "warning"
    assert only_spool.change == 'set [clusters.m] delivery = "both"'


def test_a_broken_path_blocks_jobs_only_when_the_delivery_has_no_other():
    broken = Finding("route", "problem", "cannot reach", "spool")
    assert as_needed(broken, "http", "http", other_works=True) == broken
    assert as_needed(broken, "spool", "http", other_works=True) == Finding(
        "route", "warning", "cannot reach",
        'jobs do without it while delivery = "spool" (see delivery)')
    assert as_needed(broken, "both", "http", other_works=True).status == "warning"
    assert as_needed(broken, "both", "http", other_works=False) == broken
    spool = Finding("spool", "problem", "no spool", "dd")
    assert as_needed(spool, "spool", "spool", other_works=True) == spool
    assert as_needed(spool, "http", "spool", other_works=False).status == "warning"
    fine = Finding("route", "ok", "reaches")
    assert as_needed(fine, "http", "http", other_works=False) == fine


# ---------------------------------------------------------------------------- rendering


def diagnosis(*findings: Finding, recommended: str | None = None) -> Diagnosis:
    return Diagnosis("metis", list(findings), recommended)


def test_lines_with_marks_and_what_to_change():
    shown = diagnosis(Finding("connection", "ok", "logged in"),
                      Finding("finished jobs", "warning", "stay 30 s", "raise MinJobAge"),
                      Finding("route", "problem", "cannot reach", 'set delivery = "spool"'),
                      recommended="spool")
    assert render_text(shown, utf8=True) == (
        "✓ connection: logged in\n"
        "! finished jobs: stay 30 s\n"
        "    → raise MinJobAge\n"
        "✗ route: cannot reach\n"
        '    → set delivery = "spool"\n'
        'recommended: delivery = "spool" in [clusters.metis]\n'
        "metis: something above blocks real jobs\n")
    assert shown.exit_status == 1
    ascii_text = render_text(shown, utf8=False)
    assert ascii_text.isascii()
    assert ascii_text.splitlines()[:3] == ["ok connection: logged in",
                                           "! finished jobs: stay 30 s", "    -> raise MinJobAge"]
    assert "X route: cannot reach" in ascii_text


def test_warnings_alone_let_jobs_run():
    shown = diagnosis(Finding("connection", "ok", "logged in"),
                      Finding("finished jobs", "warning", "stay 30 s", "raise MinJobAge"))
    assert shown.exit_status == 0
    assert render_text(shown, utf8=True).endswith("metis: jobs can run (see the warnings)\n")
    assert render_text(diagnosis(Finding("c", "ok", "x")), utf8=True).endswith(
        "metis: jobs can run\n")


def test_json_for_scripts():
    shown = diagnosis(Finding("route", "problem", "cannot reach", "spool"), recommended="spool")
    assert json.loads(json.dumps(render_json(shown))) == {
        "cluster": "metis", "ok": False, "exit_status": 1, "recommended_delivery": "spool",
        "checks": [{"check": "route", "status": "problem", "found": "cannot reach",
                    "change": "spool"}]}


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_status_line_redraws_on_a_terminal_and_logs_changes_elsewhere():
    tty = TTY()
    line = StatusLine(tty)
    line.show("probe job 7 is queued", 1.2)
    line.show("probe job 7 is queued", 2.4)
    line.show("", 3.0)
    assert tty.getvalue() == ("\r\x1b[Kprobe job 7 is queued (1 s)"
                              "\r\x1b[Kprobe job 7 is queued (2 s)\r\x1b[K")
    log = io.StringIO()
    line = StatusLine(log)
    for text in ("probe job 7 is queued", "probe job 7 is queued", "probe job 7 is running",
                 ""):
        line.show(text, 1.0)
    assert log.getvalue() == "probe job 7 is queued\nprobe job 7 is running\n"


def test_utf8_is_told_from_the_stream_encoding():
    assert writes_utf8(io.TextIOWrapper(io.BytesIO(), encoding="utf-8"))
    assert writes_utf8(io.TextIOWrapper(io.BytesIO(), encoding="UTF8"))
    assert not writes_utf8(io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    assert not writes_utf8(io.TextIOWrapper(io.BytesIO(), encoding="ANSI_X3.4-1968"))
