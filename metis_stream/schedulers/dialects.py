"""The batch systems metis-stream speaks: the one list of them. Pure code."""

from __future__ import annotations

from collections.abc import Mapping

from metis_stream.schedulers import pbs, slurm
from metis_stream.schedulers.dialect import Dialect

DIALECTS: Mapping[str, Dialect] = {"pbs": pbs.DIALECT, "slurm": slurm.DIALECT}
"""Batch systems reached through a shell, by the name a cluster's ``scheduler`` gives."""

SCHEDULERS: tuple[str, ...] = ("local", *DIALECTS)
"""Every value a cluster's ``scheduler`` may take: ``local`` runs jobs on this machine."""
