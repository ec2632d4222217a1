"""A batch system (PBS Pro, Torque, Slurm) driven through a shell: the adapter.

The dialects (``pbs``, ``slurm``) are pure: they build argv lists and parse
output, filling in ``dialect.Dialect``. ``BatchScheduler`` stages files, runs a
dialect's commands through a ``Shell`` and keeps what it learns about the
cluster (which status commands exist there) for the life of the process.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from metis_stream.errors import (
    Conflict,
    LoginNeeded,
    SchedulerError,
    ShellError,
    SubmitOutcomeUnknown,
    UnsafeValue,
)
from metis_stream.job_folder import JobFolder
from metis_stream.launcher import (
    EXIT_FILE,
    LAUNCHER_ERR,
    LAUNCHER_OUT,
    SCRIPT_HEAD_BYTES,
    STDERR_FILE,
    launcher_env,
    launcher_script,
)
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
    token_file_data,
)
from metis_stream.schedulers.dialect import (
    COMMAND_NOT_FOUND,
    FILE_NAME_UNSAFE,
    SAFE_PATH,
    STAGED_JOB_ID,
    WORKDIR,
    Dialect,
    JobRequest,
    ProbeOutcome,
    StatusProbe,
    check,
)
from metis_stream.schedulers.flavour import FLAVOUR_NAMES, SchedulerFlavour
from metis_stream.shells.base import Shell, TakesLogin
from metis_stream.spool import SPOOL_FILE, Frames, SpoolRead

logger = logging.getLogger(__name__)


class BatchScheduler:
    """The Scheduler of a cluster whose batch system is reached through a Shell.

    Files live under ``workdir`` (relative to the login user's home): scripts and the
    ``metis-emit`` helper, named by the hash of their content so a changed file gets a
    new name and an unchanged one is uploaded once per process; and one folder per job
    (``jobs/<job id>/``) with its token, its spec and its output. The token travels
    only as a file of mode 0600: ``qsub -v`` values are readable by every user.
    The scheduler owns its shell and closes it.
    """

    shared = True

    def __init__(
        self,
        name: str,
        dialect: Dialect,
        shell: Shell,
        *,
        workdir: str,
        poll_interval: float,
        emit_script: Path,
        command_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.poll_interval = poll_interval
        self.dialect = dialect
        self._shell = shell
        self._workdir = check(WORKDIR, workdir.rstrip("/"), "workdir")
        self._emit_script = emit_script
        self._timeout = command_timeout
        self._root: str | None = None
        self._staged: set[str] = set()
        self._unsupported: set[str] = set()
        """Probes this cluster lacks (``qstat -F json`` on Torque, ``sacct`` without
        accounting storage): learned once, never asked again."""
        self.flavour: SchedulerFlavour | None = None
        """Which batch system answers (PBS Pro, Torque, Slurm), found at the first poll;
        None until then, or when no probe could tell."""
        self._flavour_asked = False

    async def start(self) -> None:
        """Nothing to prepare: a cluster that is down at start-up must not stop the
        server; the first submission stages what it needs."""

    async def close(self) -> None:
        await self._shell.close()

    def needs_login(self) -> LoginNeeded | None:
        return self._shell.needs_login() if isinstance(self._shell, TakesLogin) else None

    async def login(self, code: str) -> bool:
        """Log the shell in with an operator's one-time code (TakesLogin)."""
        if not isinstance(self._shell, TakesLogin):
            raise Conflict(f"cluster {self.name} runs its commands on this machine, without "
                           "SSH: there is nothing to log in to")
        return await self._shell.login(code)

    async def submit(self, submission: Submission) -> str:
        job_id = check(STAGED_JOB_ID, submission.job_id, "job id")
        job_dir = f"{self._workdir}/jobs/{job_id}"
        try:
            script, head = await self._script(submission)
            emit = await self._stage(self._emit_script, "bin", "metis-emit")
            launcher = await self._stage_data(launcher_script(head), "bin", "launch")
            root = await self._root_dir()
            command = self.dialect.submit(
                self._request(submission, root, script, emit, launcher))
            await self._write_job_files(submission, job_dir, command.left_out)
        except ShellError as exc:
            raise SchedulerError(f"could not stage the job on {self.name}: {exc}") from exc
        try:
            # Never run twice: a qsub whose connection broke may have queued the job, and
            # a second one would start the same job again (same id, same token).
            result = await self._shell.run(command.argv, timeout=self._timeout,
                                           idempotent=False)
        except ShellError as exc:
            return await self._find_interrupted(submission.name, exc)
        return self.dialect.parse_submit(result)

    def _request(self, submission: Submission, root: str, script: str, emit: str,
                 launcher: str) -> JobRequest:
        """The scheduler runs the launcher, which runs the script (metis_stream.launcher);
        the scheduler's own output files get only what the launcher itself says."""
        job_dir = f"{root}/jobs/{submission.job_id}"
        template = submission.template
        return JobRequest(
            name=submission.name,
            script=f"{root}/{launcher}",
            stdout=f"{job_dir}/{LAUNCHER_OUT}",
            stderr=f"{job_dir}/{LAUNCHER_ERR}",
            queue=template.queue,
            account=template.account,
            resources=template.resources,
            user=submission.user,
            after=submission.after,
            after_any=submission.after_any,
            array=None if submission.array is None else str(submission.array),
            env={
                **submission.env,
                "METIS_TOKEN_FILE": f"{job_dir}/token",
                **({"METIS_ARRAY": str(submission.array)} if submission.array else {}),
                "METIS_SPEC_FILE": f"{job_dir}/spec.json",
                "METIS_EMIT": f"{root}/{emit}",
                "METIS_SCRIPT": script if script.startswith("/") else f"{root}/{script}",
                **launcher_env(template, job_dir),
            },
        )

    async def _write_job_files(
        self, submission: Submission, job_dir: str, left_out: Sequence[str]
    ) -> None:
        """The token, the spec and the values that could not travel on the command line
        (the launcher exports them), all readable only by the cluster user."""
        if {"METIS_TOKEN_FILE", "METIS_SPEC_FILE", "METIS_EMIT", "METIS_SCRIPT",
                "METIS_JOB_DIR"} & set(left_out):
            raise UnsafeValue(f"the workdir path on {self.name} cannot travel in the job's env")
        await self._shell.write_file(f"{job_dir}/token", token_file_data(submission),
                                     mode=0o600)
        for name, data in job_files(submission, left_out).items():
            await self._shell.write_file(f"{job_dir}/{name}", data, mode=0o600)

    async def _script(self, submission: Submission) -> tuple[str, bytes | None]:
        """The batch script: absolute when it already lives on the cluster, otherwise
        relative to the workdir, where it was staged; and its head, for the directives
        that the launcher must carry (None when a remote script cannot be read)."""
        template = submission.template
        if template.remote_script:
            path = check(SAFE_PATH, template.remote_script, "remote script")
            return path, await self._shell.read_file(path, max_bytes=SCRIPT_HEAD_BYTES)
        if template.script is None:
            raise SchedulerError(f"template {template.name!r} has no script")
        data = await _read_local(template.script)
        return await self._stage_data(data, "scripts", None, template.script.name), data

    async def _stage(self, local: Path, folder: str, prefix: str) -> str:
        return await self._stage_data(await _read_local(local), folder, prefix)

    async def _stage_data(self, data: bytes, folder: str, prefix: str | None,
                          file_name: str = "") -> str:
        """Upload ``data`` under a name made from its content's hash, once per process
        (uploading the same content again is harmless: the write is atomic)."""
        digest = hashlib.sha256(data).hexdigest()[:16]
        safe_name = FILE_NAME_UNSAFE.sub("_", file_name)
        name = f"{prefix}-{digest}" if prefix else f"{digest}-{safe_name}"
        relative = f"{folder}/{name}"
        if relative not in self._staged:
            await self._shell.write_file(f"{self._workdir}/{relative}", data, mode=0o700)
            self._staged.add(relative)
        return relative

    async def _root_dir(self) -> str:
        """The workdir's absolute path, resolved once (after staging created it)."""
        if self._root is None:
            root = await self._shell.realpath(self._workdir)
            self._root = check(SAFE_PATH, root.rstrip("/"), f"workdir on {self.name}")
        return self._root

    async def _find_interrupted(self, name: str, cause: ShellError) -> str:
        """The connection broke while the submit command ran: it may have reached the
        scheduler. Never submit again; look the job up by its unique name."""
        try:
            found = await self.lookup(name)
        except (ShellError, SchedulerError) as exc:
            raise SubmitOutcomeUnknown(
                f"connection lost while submitting {name} ({cause}); lookup failed: {exc}"
            ) from cause
        if found is None:
            raise SubmitOutcomeUnknown(
                f"connection lost while submitting {name} ({cause}); no way to look it up"
            ) from cause
        if not found:
            raise SchedulerError(
                f"connection lost while submitting {name} ({cause}); no such job exists"
            ) from cause
        return found[0]

    async def lookup(self, name: str) -> list[str] | None:
        """The ids of the jobs named ``name``; None when no lookup command exists here."""
        for probe in self.dialect.lookup_probes:
            if probe.name in self._unsupported:
                continue
            result = await self._shell.run(probe.argv(name), timeout=self._timeout)
            ids = None if result.exit_status == COMMAND_NOT_FOUND else probe.parse(result)
            if ids is not None:
                return ids
            self._unsupported.add(probe.name)
        return None

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        """One command for all ids, then follow-ups only for the jobs that need them."""
        pattern = self.dialect.scheduler_id
        pending = [i for i in dict.fromkeys(scheduler_ids) if pattern.match(i)]
        if pending:
            await self._detect_flavour()
        statuses: dict[str, SchedulerStatus] = {}
        for probe in self.dialect.status_probes:
            if not pending:
                break
            if probe.name in self._unsupported:
                continue
            try:
                outcome = await self._probe(probe, pending)
            except (ShellError, SchedulerError) as exc:
                # Leaving a job out says "the scheduler forgot it": only safe to stop
                # here when every job still asked about already has a status.
                if any(i not in statuses for i in pending):
                    raise SchedulerError(f"{probe.name} on {self.name}: {exc}") from exc
                break
            if not outcome.supported:
                self._unsupported.add(probe.name)
                continue
            statuses.update(outcome.statuses)
            pending = list(outcome.follow_up)
        return statuses

    async def _probe(self, probe: StatusProbe, ids: Sequence[str]) -> ProbeOutcome:
        result = await self._shell.run(probe.argv(ids), timeout=self._timeout)
        if result.exit_status == COMMAND_NOT_FOUND:
            return ProbeOutcome(supported=False)
        return probe.parse(result, ids, self.flavour.flavour if self.flavour else None)

    async def detect_flavour(self) -> SchedulerFlavour | None:
        """Which batch system answers: asked once (as a poll does), then known."""
        await self._detect_flavour()
        return self.flavour

    async def _detect_flavour(self) -> None:
        """Ask once which batch system answers: exit codes differ between them
        (metis_stream.schedulers.exit_codes). A connection that fails leaves the question
        for the next poll; a cluster that no probe recognises is not asked again."""
        if self._flavour_asked:
            return
        for probe in self.dialect.flavour_probes:
            try:
                result = await self._shell.run(probe.argv, timeout=self._timeout)
            except ShellError:
                return
            found = probe.parse(result)
            if found is not None:
                self.flavour = found
                logger.info("cluster %s: %s %s", self.name, FLAVOUR_NAMES[found.flavour],
                            found.version)
                break
        else:
            logger.warning("cluster %s: could not tell PBS Pro, Torque and Slurm apart "
                           "(%s); exit codes are read without a flavour's table", self.name,
                           ", ".join(" ".join(p.argv) for p in self.dialect.flavour_probes))
        self._flavour_asked = True

    async def cancel(self, scheduler_id: str) -> None:
        argv = self.dialect.cancel(scheduler_id)
        try:
            result = await self._shell.run(argv, timeout=self._timeout)
        except ShellError as exc:
            raise SchedulerError(f"could not cancel {scheduler_id} on {self.name}: {exc}") from exc
        self.dialect.check_cancel(result)

    async def read_job_files(self, job_id: str) -> JobFiles:
        job_dir = f"{self._workdir}/jobs/{check(STAGED_JOB_ID, job_id, 'job id')}"
        try:
            exit_file = await self._shell.read_file(f"{job_dir}/{EXIT_FILE}",
                                                    max_bytes=EXIT_FILE_BYTES)
            tail = await self._shell.read_file(f"{job_dir}/{STDERR_FILE}",
                                               max_bytes=STDERR_TAIL_BYTES, tail=True)
        except ShellError as exc:
            raise SchedulerError(f"could not read the files of {job_id} on {self.name}: "
                                 f"{exc}") from exc
        return JobFiles.as_read(exit_file, tail)

    async def read_element_exits(self, job_id: str) -> Mapping[int, bytes | None]:
        job_dir = f"{self._workdir}/jobs/{check(STAGED_JOB_ID, job_id, 'job id')}"
        return await read_element_exits_with(self._shell, f"{job_dir}/elements",
                                             self._timeout, self.name)

    async def read_spools(self, reads: Sequence[SpoolRead]) -> Frames:
        for read in reads:
            check(STAGED_JOB_ID, read.job_id, "job id")
        return await read_spools_with(self._shell, f"{self._workdir}/jobs", reads,
                                      self._timeout, self.name)

    async def remove_old_spools(self, keep_seconds: float) -> None:
        await remove_old_spools_with(self._shell, f"{self._workdir}/jobs", keep_seconds,
                                     self._timeout, self.name)

    def job_folder(self, job_id: str) -> JobFolder:
        return JobFolder(self._shell,
                         f"{self._workdir}/jobs/{check(STAGED_JOB_ID, job_id, 'job id')}")

    async def release(self, job_id: str, *, keep_spool: bool = False) -> None:
        """Remove the job's secrets, and its spool unless told to keep it; its output
        stays for whoever debugs it."""
        job_dir = f"{self._workdir}/jobs/{check(STAGED_JOB_ID, job_id, 'job id')}"
        try:
            await self._shell.remove_file(f"{job_dir}/token")
            await self._shell.remove_file(f"{job_dir}/spec.json")
            if not keep_spool:
                await self._shell.remove_file(f"{job_dir}/{SPOOL_FILE}")
        except ShellError as exc:
            raise SchedulerError(f"could not release {job_id} on {self.name}: {exc}") from exc


async def _read_local(path: Path) -> bytes:
    try:
        return await anyio.Path(path).read_bytes()
    except OSError as exc:
        raise SchedulerError(f"cannot read {path}: {exc}") from exc
