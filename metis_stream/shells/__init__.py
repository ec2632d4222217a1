"""Shells: where scheduler commands run. ``ssh`` (paramiko) for a cluster's login node,
``agent`` for a login node whose metis-agent dials out, ``local`` for a scheduler on this
machine."""

from metis_stream.shells.agent import AgentShell
from metis_stream.shells.base import CommandResult, Shell
from metis_stream.shells.local import LocalShell
from metis_stream.shells.ssh import SSHShell

__all__ = [
    "AgentShell",
    "CommandResult",
    "LocalShell",
    "SSHShell",
    "Shell",
]
