"""Schedulers: how a job reaches a cluster's batch system and how its status is read back.

``base`` is the contract the server uses; ``dialect`` is the contract of a batch
system's commands, and ``pbs`` and ``slurm`` fill it in: pure command building and
output parsing; ``batch`` runs those commands through a shell;
``local`` runs the batch script as a child process (the embedded default).
"""

from metis_stream.schedulers.base import (
    JobFiles,
    Scheduler,
    SchedulerState,
    SchedulerStatus,
    Submission,
)
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.schedulers.dialect import Dialect
from metis_stream.schedulers.dialects import DIALECTS, SCHEDULERS
from metis_stream.schedulers.local import LocalScheduler

__all__ = [
    "DIALECTS",
    "SCHEDULERS",
    "BatchScheduler",
    "Dialect",
    "JobFiles",
    "LocalScheduler",
    "Scheduler",
    "SchedulerState",
    "SchedulerStatus",
    "Submission",
]
