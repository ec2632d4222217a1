"""The launcher: what the scheduler runs in place of a template's script, and the job
folder it leaves. Pure code, no I/O.

Every job runs ``metis-emit run SCRIPT`` (the shell side of it lives in
``jobscripts/metis-emit``; docs/launcher.md tells the whole story). On a cluster the
scheduler is handed a small generated ``sh`` script that does only that, carrying the
``#PBS``/``#SBATCH`` lines of the template's script, which the scheduler reads from
the script it is given. The launcher leaves in the job's folder:

- ``stdout``, ``stderr``: what the script printed, byte for byte;
- ``exit``: the script's exit status, one line: ``STATUS`` or ``STATUS SIGNAL``
  (``143 SIGTERM``: killed by signal 15, reported as 128 + 15 as a shell does);
- ``terminal``: the script's own ``completed``/``fatal``, kept until its output is out.

The monitor reads ``exit`` and the end of ``stderr`` when a job ends without having
reported it (:func:`parse_exit`, :func:`tail_lines`).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from metis_stream.job_folder import INPUTS_FOLDER
from metis_stream.templates import Template

STDOUT_FILE = "stdout"
STDERR_FILE = "stderr"
EXIT_FILE = "exit"
LAUNCHER_OUT = "launcher.out"
LAUNCHER_ERR = "launcher.err"
"""Where the scheduler puts the launcher's own output (metis-emit's warnings), apart
from the script's."""

SCRIPT_HEAD_BYTES = 64 * 1024
"""How much of a script is read for its directives: they must come before its first
command, so they are at its head."""

_DIRECTIVE = re.compile(r"#(PBS|SBATCH)\s")

_BODY = """\
# metis-stream's launcher, generated: it runs the template's script ($METIS_SCRIPT)
# unchanged, with its output captured (`metis-emit run`; see docs/launcher.md).
if [ -x "$METIS_EMIT" ]; then
    exec "$METIS_EMIT" run "$METIS_SCRIPT"
fi
exec /bin/sh "$METIS_EMIT" run "$METIS_SCRIPT"
"""


def directives(script: bytes) -> list[str]:
    """The ``#PBS`` and ``#SBATCH`` lines at the head of a batch script: the comment
    block before its first command, where qsub and sbatch look for them."""
    found = []
    for raw in script.decode(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        if _DIRECTIVE.match(line):
            found.append(line)
    return found


def launcher_script(script_head: bytes | None) -> bytes:
    """The launcher handed to the scheduler for a script whose first bytes are
    ``script_head`` (None: unknown, no directives)."""
    lines = ["#!/bin/sh", *directives(script_head or b""), _BODY]
    return "\n".join(lines).encode()


def launcher_env(template: Template, job_dir: str) -> dict[str, str]:
    """What ``metis-emit run`` reads from the environment, for ``template``'s jobs.
    Every value is a path or a number: they travel on ``qsub -v`` intact."""
    return {
        "METIS_JOB_DIR": job_dir,
        # Where a submission's uploaded files are (docs/files.md); absent without uploads.
        "METIS_INPUTS_DIR": f"{job_dir}/{INPUTS_FOLDER}",
        "METIS_CAPTURE": "1" if template.capture else "0",
        "METIS_LOG_MAX_EVENTS": str(template.log_max_events),
        "METIS_LOG_MAX_BYTES": str(template.log_max_bytes),
        "METIS_STDERR_TAIL_LINES": str(template.stderr_tail_lines),
    }


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """What the ``exit`` file says."""

    status: int
    signal: str | None = None
    """``SIGTERM`` when a signal killed the script (then ``status`` is 128 + its number)."""

    def describe(self) -> str:
        if self.signal:
            return f"the script was killed by signal {self.status - 128} ({self.signal})"
        return f"the script exited with status {self.status}"

    def as_data(self) -> dict[str, object]:
        data: dict[str, object] = {"exit_status": self.status}
        if self.signal:
            data["signal"] = self.signal
        return data


_EXIT_LINE = re.compile(r"\s*([0-9]{1,3})(?:\s+(SIG[A-Z0-9]{1,10}))?\s*\Z")


def parse_exit(data: bytes | None) -> ExitRecord | None:
    """The ``exit`` file's record; None when it is missing or not what the launcher
    writes (a job still running, or one that ran without the launcher)."""
    if data is None:
        return None
    match = _EXIT_LINE.match(data.decode(errors="replace"))
    if match is None:
        return None
    status = int(match.group(1))
    name = match.group(2)
    if name is None and 128 < status < 128 + 65:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = None
    return ExitRecord(status, name)


MAX_TAIL_LINE = 2000
"""A longer stderr line is cut (as the launcher cuts it)."""


def tail_lines(data: bytes | None, count: int, *, cut: bool = False) -> list[str]:
    """The last ``count`` lines of ``data``, a file's end (``cut``: it may begin in the
    middle of a line, which is then left out), as the launcher shows them: a carriage
    return keeps what follows it; invalid UTF-8 and NUL become U+FFFD."""
    if not data or count <= 0:
        return []
    lines = data.decode(errors="replace").replace("\0", "\ufffd").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if cut and len(lines) > 1:
        lines.pop(0)
    lines = lines[-count:]
    out = []
    for line in lines:
        line = line.removesuffix("\r").rsplit("\r", 1)[-1]
        out.append(line if len(line) <= MAX_TAIL_LINE else line[:MAX_TAIL_LINE] + "...")
    return out
