"""The local scheduler: runs a template's batch script as a child process of the server.

The embedded default, for the demo and for development without a cluster. Each
job gets a folder under the server's state directory holding its token file
(mode 0600), its spec and its stdout/stderr; the script runs there in its own
process group, so cancelling kills everything it started.

Its jobs are children of one server process: with several server processes on
one Redis, each watches only its own children, and a job whose server process
restarted runs on but is no longer watched for a silent death. Use a cluster
scheduler for anything that must survive a restart. A server that stops leaves its
jobs running, as a cluster's scheduler would, unless the cluster says
``stop_jobs_on_exit`` (the demo does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from metis_stream.environment import inherited
from metis_stream.errors import SchedulerError
from metis_stream.files import make_private_dirs, write_private
from metis_stream.job_folder import JobFolder
from metis_stream.launcher import EXIT_FILE, LAUNCHER_ERR, LAUNCHER_OUT, STDERR_FILE, launcher_env
from metis_stream.schedulers.base import (
    EXIT_FILE_BYTES,
    STDERR_TAIL_BYTES,
    JobFiles,
    SchedulerStatus,
    Submission,
    job_files,
    read_element_exits_with,
    read_spools_with,
    remove_old_spools_with,
)
from metis_stream.schedulers.dialect import STAGED_JOB_ID, check
from metis_stream.schedulers.flavour import SchedulerFlavour
from metis_stream.shells.local import LocalShell, read_part
from metis_stream.spool import SPOOL_FILE, Frames, SpoolRead

KILL_GRACE = 5.0
SPOOL_COMMAND_TIMEOUT = 30.0


class LocalScheduler:
    shared = False
    flavour: SchedulerFlavour | None = None
    """Not a batch system: no flavour, and no exit code but the script's own."""

    def __init__(self, name: str, *, jobs_dir: Path, emit_script: Path,
                 poll_interval: float = 0.5, stop_jobs_on_close: bool = False) -> None:
        self.name = name
        self.poll_interval = poll_interval
        self._jobs_dir = jobs_dir
        self._emit_script = emit_script
        self._stop_jobs_on_close = stop_jobs_on_close
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._shell = LocalShell(home=jobs_dir)  # for the spool reader, as on a cluster

    async def start(self) -> None:
        make_private_dirs(self._jobs_dir)

    async def close(self) -> None:
        """Leave running jobs alone, as a cluster's scheduler would: they outlive the
        server. Unless told to stop them (the demo): a job of a server that is gone
        would retry each of its events against it for minutes."""
        if self._stop_jobs_on_close:
            async with anyio.create_task_group() as tasks:
                for process in self._processes.values():
                    tasks.start_soon(_stop, process)
        else:
            for process in self._processes.values():
                # Reaped when it ends, so that it is no zombie of a process that goes on
                # (an app that closes a service and runs on, a test).
                threading.Thread(target=process.wait, daemon=True,
                                 name=f"reap-{process.pid}").start()
        self._processes.clear()

    async def submit(self, submission: Submission) -> str:
        template = submission.template
        if template.script is None:
            raise SchedulerError(f"template {template.name!r}: the local scheduler needs a "
                                 "local script, not remote_script")
        job_dir = self._jobs_dir / submission.job_id
        token_file = job_dir / "token"
        spec_file = job_dir / "spec.json"
        write_private(token_file, submission.token.encode())
        for name, data in job_files(submission).items():
            write_private(job_dir / name, data)
        env = inherited()  # never the server's own secrets
        env.update(submission.env)
        env.update({
            "METIS_TOKEN_FILE": str(token_file),
            "METIS_SPEC_FILE": str(spec_file),
            "METIS_EMIT": str(self._emit_script),
            "PBS_O_WORKDIR": str(job_dir),
            "PBS_JOBNAME": submission.name,
            **launcher_env(template, str(job_dir)),
        })
        # The launcher runs the script (no scheduler here to read #PBS lines).
        argv = ["/bin/sh", str(self._emit_script), "run", str(template.script)]
        process = await anyio.to_thread.run_sync(self._spawn, argv, job_dir, env)
        scheduler_id = f"{process.pid}.local"
        self._processes[scheduler_id] = process
        return scheduler_id

    @staticmethod
    def _spawn(argv: list[str], job_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(job_dir / LAUNCHER_OUT, "wb") as out, open(job_dir / LAUNCHER_ERR, "wb") as err:
            return subprocess.Popen(
                argv, cwd=job_dir, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
            )

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        statuses = {}
        for scheduler_id in scheduler_ids:
            process = self._processes.get(scheduler_id)
            if process is None:
                continue  # not started by this process: unknown, as a purged job would be
            code = process.poll()
            if code is None:
                statuses[scheduler_id] = SchedulerStatus("running")
            else:
                statuses[scheduler_id] = _ended(code)
                del self._processes[scheduler_id]
        return statuses

    async def cancel(self, scheduler_id: str) -> None:
        process = self._processes.get(scheduler_id)
        if process is not None:
            await _stop(process)

    async def read_job_files(self, job_id: str) -> JobFiles:
        job_dir = self._jobs_dir / job_id

        def read() -> JobFiles:
            return JobFiles.as_read(read_part(job_dir / EXIT_FILE, EXIT_FILE_BYTES, False),
                                    read_part(job_dir / STDERR_FILE, STDERR_TAIL_BYTES, True))

        try:
            return await anyio.to_thread.run_sync(read)
        except OSError as exc:
            raise SchedulerError(f"cannot read the files of job {job_id}: {exc}") from exc

    async def read_element_exits(self, job_id: str) -> Mapping[int, bytes | None]:
        """Never an array here (config refuses them): the same reader all the same."""
        elements = self._jobs_dir / check(STAGED_JOB_ID, job_id, "job id") / "elements"
        return await read_element_exits_with(self._shell, str(elements),
                                             SPOOL_COMMAND_TIMEOUT, self.name)

    async def read_spools(self, reads: Sequence[SpoolRead]) -> Frames:
        return await read_spools_with(self._shell, str(self._jobs_dir), reads,
                                      SPOOL_COMMAND_TIMEOUT, self.name)

    async def remove_old_spools(self, keep_seconds: float) -> None:
        await remove_old_spools_with(self._shell, str(self._jobs_dir), keep_seconds,
                                     SPOOL_COMMAND_TIMEOUT, self.name)

    def job_folder(self, job_id: str) -> JobFolder:
        # The shell's home is the jobs folder: a job's folder is its id there.
        return JobFolder(self._shell, check(STAGED_JOB_ID, job_id, "job id"))

    async def release(self, job_id: str, *, keep_spool: bool = False) -> None:
        (self._jobs_dir / job_id / "token").unlink(missing_ok=True)
        if not keep_spool:
            (self._jobs_dir / job_id / SPOOL_FILE).unlink(missing_ok=True)


async def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the job's process group, SIGKILL if the script outlives KILL_GRACE."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        await anyio.to_thread.run_sync(process.wait, KILL_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it ended in the meantime
            os.killpg(process.pid, signal.SIGKILL)


def _ended(returncode: int) -> SchedulerStatus:
    if returncode < 0:
        signum = -returncode
        reason = signal.strsignal(signum) or f"signal {signum}"
        return SchedulerStatus("ended", 128 + signum, f"killed: {reason}")
    return SchedulerStatus("ended", returncode, f"exited with status {returncode}")

