"""A batch system (PBS Pro, Torque, Slurm) driven through a shell: the adapter.

The dialects (``pbs``, ``slurm``) are pure: they build argv lists and parse
output. This module holds the contract they fill in (``Dialect``) and
``BatchScheduler``, which stages files, runs the dialect's commands through a
``Shell`` and keeps what it learns about the cluster (which status commands
exist there) for the life of the process.
"""

from __future__ import annotations

import hashlib
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson

from metis_stream.schedulers.base import (
    SchedulerError,
    SchedulerStatus,
    Submission,
    SubmitOutcomeUnknown,
)
from metis_stream.shells.base import CommandResult, Shell, ShellError

# What survives `qsub -v` (Slurm's wrapper pastes it into a `sh -c` string, real PBS
# splits on commas and eats quotes) and `sbatch --export` (splits on commas).
SAFE_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
SAFE_ENV_VALUE = re.compile(r"[A-Za-z0-9_./:@%+=-]*\Z")
# Paths that we put on a command line and in -v: absolute, no spaces, no shell syntax.
SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+@-]*\Z")
JOB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}\Z")
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}\Z")
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
STAGED_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
WORKDIR = re.compile(r"(?!/)(?!.*(?:^|/)\.\.(?:/|\Z))[A-Za-z0-9_./-]{1,200}\Z")
FILE_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")

COMMAND_NOT_FOUND = 127

# Messages that mean "this id is not (or no longer) known" rather than "the command failed":
# PBS Pro, Torque, and Slurm (directly or behind the PBS wrappers).
GONE = re.compile(
    r"unknown job id|job has finished|invalid job id|already completing or completed"
    r"|job is in (a )?complet|request invalid for state of job",
    re.IGNORECASE,
)


class UnsafeValue(SchedulerError, ValueError):
    """A value that would reach the cluster's command line fails its pattern."""


def check(pattern: re.Pattern[str], value: str, what: str) -> str:
    """``value`` if it matches ``pattern`` in full; otherwise UnsafeValue naming ``what``."""
    if not pattern.match(value):
        raise UnsafeValue(f"{what} {value!r} is not allowed (must match {pattern.pattern})")
    return value


def split_env(env: Mapping[str, str]) -> tuple[dict[str, str], tuple[str, ...]]:
    """The variables that can travel on a scheduler's command line, and the names of the
    ones that cannot (the job reads those from its spec)."""
    safe: dict[str, str] = {}
    left_out: list[str] = []
    for name, value in env.items():
        if SAFE_ENV_NAME.match(name) and SAFE_ENV_VALUE.match(value):
            safe[name] = value
        else:
            left_out.append(name)
    return safe, tuple(left_out)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One submission, as a dialect turns it into a command line."""

    name: str
    script: str
    """Absolute path of the batch script on the cluster."""
    stdout: str
    stderr: str
    queue: str | None = None
    account: str | None = None
    resources: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Every variable the job should get; unsafe ones are left out of the command."""
    join_output: bool = False
    """Write stderr into ``stdout`` (``-j oe``); ``stderr`` is then ignored."""
    depend: str | None = None
    """A dependency list such as ``afterok:123.server`` (PBS ``-W depend=``, Slurm ``-d``)."""
    array: str | None = None
    """An array range such as ``1-10`` or ``1-10%2`` (PBS ``-J``, Slurm ``--array``)."""


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    argv: list[str]
    left_out: tuple[str, ...] = ()
    """Names of ``env`` variables whose values could not travel on the command line."""


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """What one status command told us."""

    statuses: Mapping[str, SchedulerStatus] = field(default_factory=dict)
    follow_up: tuple[str, ...] = ()
    """Ids to ask the next probe about (ended without an exit status, or missing where
    they should not be); the statuses found here stand if no later probe knows better."""
    supported: bool = True
    """False: this cluster does not have the command (or the option); never ask again."""


@dataclass(frozen=True, slots=True)
class StatusProbe:
    """One way to ask for the status of many jobs in one command."""

    name: str
    argv: Callable[[Sequence[str]], list[str]]
    parse: Callable[[CommandResult, Sequence[str]], ProbeOutcome]


@dataclass(frozen=True, slots=True)
class LookupProbe:
    """One way to find a job by its unique name (after an interrupted submission)."""

    name: str
    argv: Callable[[str], list[str]]
    parse: Callable[[CommandResult], list[str] | None]
    """The ids found; None when the command is not available on this cluster."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """A batch system's commands and output formats: pure functions only."""

    name: str
    submit: Callable[[JobRequest], SubmitCommand]
    parse_submit: Callable[[CommandResult], str]
    cancel: Callable[[str], list[str]]
    check_cancel: Callable[[CommandResult], None]
    """Raise SchedulerError unless the job is gone (cancelled now or ended before)."""
    status_probes: Sequence[StatusProbe]
    """Tried in order: the first for all ids, each later one for the previous one's
    ``follow_up`` (or for all ids when the previous one is not supported here)."""
    lookup_probes: Sequence[LookupProbe]
    scheduler_id: re.Pattern[str]
    """What a job id of this scheduler looks like; nothing else reaches the shell."""


def command_output(result: CommandResult) -> str:
    """The scheduler's own words: the PBS wrappers print errors on stdout, others on stderr."""
    text = "\n".join(part.strip() for part in (result.stderr, result.stdout) if part.strip())
    return text or f"exit status {result.exit_status}"


def signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"signal {number}"


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

    async def start(self) -> None:
        """Nothing to prepare: a cluster that is down at start-up must not stop the
        server; the first submission stages what it needs."""

    async def close(self) -> None:
        await self._shell.close()

    async def submit(self, submission: Submission) -> str:
        job_id = check(STAGED_JOB_ID, submission.job_id, "job id")
        job_dir = f"{self._workdir}/jobs/{job_id}"
        try:
            script = await self._script(submission)
            emit = await self._stage(self._emit_script, "bin", "metis-emit")
            root = await self._root_dir()
            command = self.dialect.submit(self._request(submission, root, script, emit))
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

    def _request(self, submission: Submission, root: str, script: str, emit: str) -> JobRequest:
        job_dir = f"{root}/jobs/{submission.job_id}"
        template = submission.template
        return JobRequest(
            name=submission.name,
            script=script if script.startswith("/") else f"{root}/{script}",
            stdout=f"{job_dir}/stdout",
            stderr=f"{job_dir}/stderr",
            queue=template.queue,
            account=template.account,
            resources=template.resources,
            env={
                **submission.env,
                "METIS_TOKEN_FILE": f"{job_dir}/token",
                "METIS_SPEC_FILE": f"{job_dir}/spec.json",
                "METIS_EMIT": f"{root}/{emit}",
            },
        )

    async def _write_job_files(
        self, submission: Submission, job_dir: str, left_out: Sequence[str]
    ) -> None:
        """The token and the spec, both readable only by the cluster user; the spec
        carries the values that could not travel on the command line."""
        if {"METIS_TOKEN_FILE", "METIS_SPEC_FILE", "METIS_EMIT"} & set(left_out):
            raise UnsafeValue(f"the workdir path on {self.name} cannot travel in the job's env")
        spec = {**submission.spec, "env": {name: submission.env[name] for name in left_out}}
        await self._shell.write_file(f"{job_dir}/token", submission.token.encode(), mode=0o600)
        await self._shell.write_file(f"{job_dir}/spec.json", orjson.dumps(spec), mode=0o600)

    async def _script(self, submission: Submission) -> str:
        """The batch script: absolute when it already lives on the cluster, otherwise
        relative to the workdir, where it was staged."""
        template = submission.template
        if template.remote_script:
            return check(SAFE_PATH, template.remote_script, "remote script")
        if template.script is None:
            raise SchedulerError(f"template {template.name!r} has no script")
        return await self._stage(template.script, "scripts", None)

    async def _stage(self, local: Path, folder: str, prefix: str | None) -> str:
        """Upload ``local`` under a name made from its content's hash, once per process
        (uploading the same content again is harmless: the write is atomic)."""
        try:
            data = await anyio.Path(local).read_bytes()
        except OSError as exc:
            raise SchedulerError(f"cannot read {local}: {exc}") from exc
        digest = hashlib.sha256(data).hexdigest()[:16]
        safe_name = FILE_NAME_UNSAFE.sub("_", local.name)
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
        return probe.parse(result, ids)

    async def cancel(self, scheduler_id: str) -> None:
        argv = self.dialect.cancel(scheduler_id)
        try:
            result = await self._shell.run(argv, timeout=self._timeout)
        except ShellError as exc:
            raise SchedulerError(f"could not cancel {scheduler_id} on {self.name}: {exc}") from exc
        self.dialect.check_cancel(result)

    async def release(self, job_id: str) -> None:
        """Remove the job's secrets; its output stays for whoever debugs it."""
        job_dir = f"{self._workdir}/jobs/{check(STAGED_JOB_ID, job_id, 'job id')}"
        try:
            await self._shell.remove_file(f"{job_dir}/token")
            await self._shell.remove_file(f"{job_dir}/spec.json")
        except ShellError as exc:
            raise SchedulerError(f"could not release {job_id} on {self.name}: {exc}") from exc
