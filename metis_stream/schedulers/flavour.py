"""Which batch system answers a cluster's commands: PBS Pro, Torque, or Slurm (directly or
behind its PBS wrappers). Pure code: the commands that tell, and how to read them.

A ``pbs`` cluster may be any of the three, and their exit codes differ
(metis_stream.schedulers.exit_codes); ``BatchScheduler`` asks once per connection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from metis_stream.shells.base import CommandResult

Flavour = Literal["pbspro", "torque", "slurm"]

FLAVOUR_NAMES: dict[Flavour, str] = {"pbspro": "PBS Pro", "torque": "Torque", "slurm": "Slurm"}


@dataclass(frozen=True, slots=True)
class SchedulerFlavour:
    flavour: Flavour
    version: str


@dataclass(frozen=True, slots=True)
class FlavourProbe:
    """One command that may tell the flavour: tried in order until one does."""

    argv: list[str]
    parse: Callable[[CommandResult], SchedulerFlavour | None]


_PBS_PRO_VERSION = re.compile(r"^pbs_version\s*=\s*(\S+)", re.MULTILINE)
_TORQUE_VERSION = re.compile(r"^Version:\s*(\S+)", re.MULTILINE)
_SLURM_VERSION = re.compile(r"^slurm(?:-wlm)?\s+(\S+)", re.MULTILINE)


def parse_qstat_version(result: CommandResult) -> SchedulerFlavour | None:
    """``qstat --version``: PBS Pro prints ``pbs_version = 19.1.3`` on stdout (its
    PRINT_VERSION_AND_EXIT, pbs_version.h), Torque ``Version: 6.1.3`` and ``Commit:``
    on stderr (qstat.c); Slurm's perl wrapper knows no such option (exit 2)."""
    text = f"{result.stdout}\n{result.stderr}"
    pro = _PBS_PRO_VERSION.search(text)
    if pro:
        return SchedulerFlavour("pbspro", pro.group(1))
    torque = _TORQUE_VERSION.search(text)
    if result.exit_status == 0 and torque:
        return SchedulerFlavour("torque", torque.group(1))
    return None


def parse_sinfo_version(result: CommandResult) -> SchedulerFlavour | None:
    """``sinfo --version``: ``slurm 22.05.8`` (older releases: ``slurm-wlm 17.11.2``)."""
    found = _SLURM_VERSION.search(result.stdout)
    if result.exit_status == 0 and found:
        return SchedulerFlavour("slurm", found.group(1))
    return None


QSTAT_VERSION = FlavourProbe(["qstat", "--version"], parse_qstat_version)
SINFO_VERSION = FlavourProbe(["sinfo", "--version"], parse_sinfo_version)

PBS_PROBES: Sequence[FlavourProbe] = (QSTAT_VERSION, SINFO_VERSION)
"""A ``pbs`` cluster: PBS Pro or Torque answer ``qstat --version``; a cluster whose qstat
does not is asked whether Slurm is there (its PBS wrappers)."""
SLURM_PROBES: Sequence[FlavourProbe] = (SINFO_VERSION,)
