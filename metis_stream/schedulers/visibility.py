"""How long a cluster's scheduler keeps a finished job where its status commands see it.
Pure code: the command that tells, per flavour, and how to read its output.

The monitor learns that a job ended by seeing it finished (``qstat -x``, ``scontrol``);
a job that has already vanished when it looks is judged from its folder's ``exit`` file
instead (metis_stream.launcher), without the scheduler's words (walltime, node failure).
``metis-stream doctor`` reads these settings to warn when the window is short.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from metis_stream.schedulers.flavour import Flavour
from metis_stream.shells.base import CommandResult

MIN_VISIBLE_SECONDS = 60.0
"""Below this, the monitor (polling every ``poll_interval``, 10 s by default, slower while
a cluster is unreachable) may look only after a finished job has gone."""


@dataclass(frozen=True, slots=True)
class FinishedJobs:
    """What the scheduler's configuration says about finished jobs."""

    seconds: float | None
    """How long a finished job stays visible; 0: not at all; None: the output did not
    say (a setting left at a default that depends on the version)."""
    found: str
    """The setting as the scheduler printed it (``MinJobAge = 300 sec``)."""
    setting: str
    """What an administrator changes to keep them longer, and where."""


_SLURM_SETTING = "MinJobAge in slurm.conf (then `scontrol reconfigure`)"
_PBS_PRO_SETTING = ('job_history_enable (`qmgr -c "set server job_history_enable = True"`, '
                    "as a PBS manager)")
_TORQUE_SETTING = ('keep_completed (`qmgr -c "set server keep_completed = 300"`, as a '
                   "PBS manager)")


def visibility_argv(flavour: Flavour) -> list[str]:
    """The command that prints the setting: every user may run it."""
    if flavour == "slurm":
        return ["scontrol", "show", "config"]
    return ["qmgr", "-c", "print server"]


def parse_visibility(flavour: Flavour, result: CommandResult) -> FinishedJobs | None:
    """The setting in ``result``, the output of :func:`visibility_argv`; None when the
    command failed."""
    if result.exit_status != 0:
        return None
    if flavour == "slurm":
        return _slurm(result.stdout)
    if flavour == "pbspro":
        return _pbs_pro(result.stdout)
    return _torque(result.stdout)


# `scontrol show config`: one `Name = value` line per setting, padded, such as
# "MinJobAge               = 300 sec" (Slurm 22.05's own output on the test cluster;
# slurm.conf(5): "MinJobAge: The minimum age of a completed job before its record is
# cleared from the active database ... The default value is 300 seconds").
_MIN_JOB_AGE = re.compile(r"^MinJobAge\s*=\s*(\d+)\s*(?:sec)?\s*$", re.MULTILINE)


def _slurm(text: str) -> FinishedJobs | None:
    found = _MIN_JOB_AGE.search(text)
    if found is None:
        return None
    seconds = int(found.group(1))
    return FinishedJobs(float(seconds), f"MinJobAge = {seconds} sec", _SLURM_SETTING)


# `qmgr -c "print server"` writes the server's settings back as qmgr commands, one
# `set server NAME = VALUE` a line (PBS Pro's qmgr(8B), "print server"; Torque's
# qmgr(1B) and its Administrator Guide, appendix B). Only settings that are set are
# printed: one left at its default is absent.
_SET_SERVER = re.compile(r"^\s*set server (\w+)\s*=\s*(.*?)\s*$", re.MULTILINE)
_TRUE = {"true", "t", "y", "1"}


def _server_settings(text: str) -> dict[str, str]:
    return {name: value for name, value in _SET_SERVER.findall(text)}


def _pbs_pro(text: str) -> FinishedJobs:
    """PBS Pro keeps no finished job unless ``job_history_enable`` is True (its default
    is False); then for ``job_history_duration``, two weeks by default (PBS Professional
    Administrator's Guide, "Job History")."""
    settings = _server_settings(text)
    enabled = settings.get("job_history_enable", "")
    if enabled.lower() not in _TRUE:
        found = f"job_history_enable = {enabled}" if enabled else "job_history_enable unset"
        return FinishedJobs(0.0, f"{found} (finished jobs are not kept)", _PBS_PRO_SETTING)
    duration = settings.get("job_history_duration", "")
    seconds = _duration(duration) if duration else 14 * 24 * 3600.0
    found = "job_history_enable = True, job_history_duration = " + (duration or
                                                                      "336:00:00 (default)")
    return FinishedJobs(seconds, found, _PBS_PRO_SETTING)


def _torque(text: str) -> FinishedJobs:
    """Torque keeps a finished job (state C) for ``keep_completed`` seconds; unset, how long
    depends on the version, so it is reported as unknown."""
    value = _server_settings(text).get("keep_completed", "")
    if not value:
        return FinishedJobs(None, "keep_completed unset", _TORQUE_SETTING)
    seconds = _duration(value)
    return FinishedJobs(seconds, f"keep_completed = {value}", _TORQUE_SETTING)


def _duration(text: str) -> float | None:
    """Seconds, or ``[[HH:]MM:]SS`` as PBS writes durations; None when it is neither."""
    parts = text.strip().split(":")
    if len(parts) > 3 or not all(part.isdigit() for part in parts):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds)
