"""What of the server's own environment reaches the processes it starts: an allowlist.

The server's environment may hold its secret (``METIS_SECRET``), its API keys
(``METIS_API_KEYS``) and whatever its service manager put there. A process the
server starts gets none of that, only who it runs as, where to find programs, and
the locale; a scheduler command also gets the settings that tell the scheduler's
client where its cluster is. Whatever a scheduler command gets may reach the job
(``sbatch --export=ALL``, ``qsub -V``, PBS's ``PBS_O_*`` copies).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

BASE_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ")
BASE_PREFIXES = ("LC_",)
SCHEDULER_CLIENT_NAMES = (
    "SLURM_CONF",  # Slurm: where slurm.conf is, when not in its default place
    "PBS_CONF_FILE",  # PBS Pro: where pbs.conf is
    "PBS_SERVER",  # PBS Pro and Torque: the server, over pbs.conf
    "PBS_DEFAULT",  # Torque: the default server
)


def inherited(extra_names: Iterable[str] = (),
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowed part of ``environ`` (this process's environment by default): the base
    names and prefixes, and ``extra_names``."""
    environ = os.environ if environ is None else environ
    names = {*BASE_NAMES, *extra_names}
    return {name: value for name, value in environ.items()
            if name in names or name.startswith(BASE_PREFIXES)}
