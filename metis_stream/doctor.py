"""``metis-stream doctor CLUSTER``: checks a cluster as the server would use it, and says
what works and what to change (docs/doctor.md).

It runs here, in-process, from the server's configuration file: it opens the cluster's
shell itself, and submits a probe job (jobscripts/doctor-probe) that tests, from a compute
node, the two paths a job's events take: the route to ``public_url`` (what jobs are
given; the server running there answers) and the spool (read back with the server's own
reader). The pure judgements and renderings live in metis_stream.diagnosis.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable

import anyio
import httpx

from metis_stream import tokens
from metis_stream.config import JOBSCRIPTS_DIR, ClusterConfig, Config
from metis_stream.diagnosis import (
    Diagnosis,
    Finding,
    ProbeReport,
    as_needed,
    delivery_finding,
    judge_route,
    parse_probe_report,
    recommend_delivery,
)
from metis_stream.errors import HostKeyRefused, MetisError, ShellError
from metis_stream.factory import build_scheduler, build_shell
from metis_stream.launcher import LAUNCHER_ERR, parse_exit
from metis_stream.schedulers.base import Submission
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.schedulers.dialect import job_name
from metis_stream.schedulers.flavour import FLAVOUR_NAMES, SchedulerFlavour
from metis_stream.schedulers.visibility import (
    MIN_VISIBLE_SECONDS,
    parse_visibility,
    visibility_argv,
)
from metis_stream.shells.base import Shell
from metis_stream.spool import SpoolCursor, SpoolRead, take
from metis_stream.templates import Template

PROBE_SCRIPT = JOBSCRIPTS_DIR / "doctor-probe"
PROBE_REPORT = "doctor"
"""The file the probe writes in its job folder."""
PROBE_EVENT = "doctor"
"""The event the probe sends through the spool."""
PROBE_VALUE = "a/b:c@d%e+f=g.h-i_j"
"""Every kind of character a job's environment may carry on ``qsub -v`` (SAFE_ENV_VALUE):
the probe reports how it arrived."""
PROBE_SPOOL_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 300.0
POLL_SECONDS = 1.0
REPORT_LOOKS = 5

Progress = Callable[[str, float], None]
"""Told what the probe job is doing (``probe job 42 is queued``) and for how many seconds
doctor has waited on it."""


async def diagnose(config: Config, cluster_name: str, *, timeout: float = DEFAULT_TIMEOUT,
                   progress: Progress) -> Diagnosis:
    """Every check, in order; a check that makes the rest pointless (no connection)
    ends the list. ``cluster_name`` must be configured."""
    cluster = config.clusters[cluster_name]
    diagnosis = Diagnosis(cluster_name)
    if cluster.scheduler == "local":
        diagnosis.add(Finding("scheduler", "ok", "the local scheduler: jobs run on this "
                              "machine and post to the server over loopback; nothing to probe"))
        return diagnosis
    shell = build_shell(cluster)
    scheduler = build_scheduler(config, cluster, shell)
    assert isinstance(scheduler, BatchScheduler)
    try:
        await _examine(config, cluster, shell, scheduler, diagnosis, timeout, progress)
    except MetisError as exc:
        # The connection broke or the scheduler stopped answering half-way: what was
        # found so far still stands.
        diagnosis.add(Finding("cluster", "problem", f"stopped answering during the checks: "
                              f"{exc.message}", "run doctor again once it answers"))
    finally:
        with anyio.CancelScope(shield=True):
            await scheduler.close()
    return diagnosis


async def _examine(config: Config, cluster: ClusterConfig, shell: Shell,
                   scheduler: BatchScheduler, diagnosis: Diagnosis, timeout: float,
                   progress: Progress) -> None:
    if not await _connection(shell, cluster, diagnosis):
        return
    flavour = await scheduler.detect_flavour()
    diagnosis.add(_flavour_finding(flavour, cluster))
    if flavour is not None:
        diagnosis.add(await _finished_jobs(shell, flavour, cluster))
    if not await _workdir(shell, cluster, diagnosis):
        return
    diagnosis.add(await _server(config))
    await _probe(config, cluster, shell, scheduler, diagnosis, timeout, progress)


# ---------------------------------------------------------------------------- the login node


async def _connection(shell: Shell, cluster: ClusterConfig, diagnosis: Diagnosis) -> bool:
    where = f"[clusters.{cluster.name}]"
    try:
        await shell.run(["true"], timeout=cluster.command_timeout)
    except HostKeyRefused as exc:
        diagnosis.add(Finding("connection", "problem", str(exc),
                              f"{where} known_hosts ({cluster.known_hosts}) must list the "
                              "cluster's host key"))
        return False
    except ShellError as exc:
        diagnosis.add(Finding("connection", "problem", f"cannot run commands there: {exc}",
                              "check host, port, user, key_file, known_hosts (key_passphrase, "
                              f"use_agent) in {where}"))
        return False
    if cluster.host:
        found = (f"{cluster.user}@{cluster.host} port {cluster.port}: logged in; its host key "
                 f"is the one in {cluster.known_hosts}")
    else:
        found = "no host: the scheduler's commands run on this machine"
    diagnosis.add(Finding("connection", "ok", found))
    return True


def _flavour_finding(flavour: SchedulerFlavour | None, cluster: ClusterConfig) -> Finding:
    if flavour is None:
        return Finding("scheduler", "problem",
                       f"no batch system answers (scheduler = \"{cluster.scheduler}\": "
                       "qstat --version and sinfo --version)",
                       "install the scheduler's commands where a login without a terminal "
                       "finds them (the PATH of a non-interactive shell), or correct "
                       f"[clusters.{cluster.name}] scheduler")
    name = FLAVOUR_NAMES[flavour.flavour]
    behind = (" behind its PBS wrappers" if flavour.flavour == "slurm"
              and cluster.scheduler == "pbs" else "")
    return Finding("scheduler", "ok", f"{name} {flavour.version}{behind}")


async def _finished_jobs(shell: Shell, flavour: SchedulerFlavour, cluster: ClusterConfig
                         ) -> Finding:
    argv = visibility_argv(flavour.flavour)
    command = " ".join(argv[:2]) + (f' "{argv[2]}"' if len(argv) > 2 else "")
    try:
        result = await shell.run(argv, timeout=cluster.command_timeout)
    except ShellError as exc:
        return Finding("finished jobs", "warning", f"could not run {command}: {exc}")
    kept = parse_visibility(flavour.flavour, result)
    if kept is None:
        return Finding("finished jobs", "warning",
                       f"{command} did not say how long finished jobs stay visible "
                       f"({(result.stderr or result.stdout).strip()[:200]})")
    if kept.seconds is not None and kept.seconds >= MIN_VISIBLE_SECONDS:
        return Finding("finished jobs", "ok",
                       f"stay visible {kept.seconds:.0f} s ({kept.found})")
    how_long = ("for a time this version decides" if kept.seconds is None
                else f"only {kept.seconds:.0f} s")
    return Finding(
        "finished jobs", "warning",
        f"stay visible {how_long} ({kept.found}): the monitor, which looks every "
        f"{cluster.poll_interval:g} s (longer while the cluster is unreachable), may find a "
        "job already gone and then judges it from the exit file the launcher leaves in its "
        "folder: the script's exit status, without the scheduler's reason (a walltime or a "
        "node failure reads as a plain failure)",
        f"ask the cluster's admins to keep finished jobs {MIN_VISIBLE_SECONDS:.0f} s or "
        f"more (300 s is usual): {kept.setting}")


async def _workdir(shell: Shell, cluster: ClusterConfig, diagnosis: Diagnosis) -> bool:
    where = f"[clusters.{cluster.name}] workdir"
    scratch = f"{cluster.workdir.rstrip('/')}/.doctor-{secrets.token_hex(4)}"
    try:
        await shell.write_file(scratch, b"", mode=0o600)
        await shell.remove_file(scratch)
        root = await shell.realpath(cluster.workdir)
        listing = await shell.run(["ls", "-ld", "--", root], timeout=cluster.command_timeout)
    except ShellError as exc:
        diagnosis.add(Finding("workdir", "problem",
                              f"cannot write in {cluster.workdir}: {exc}",
                              f"set {where} to a folder the user may write, on a filesystem "
                              "the compute nodes share"))
        return False
    mode = listing.stdout.split()[0] if listing.stdout.split() else ""
    if len(mode) >= 10 and "w" in (mode[5], mode[8]):
        diagnosis.add(Finding("workdir", "warning",
                              f"{root} ({mode}) is writable by other users: they could "
                              "replace the staged metis-emit and launcher that jobs run",
                              f"chmod go-w {root}"))
    else:
        diagnosis.add(Finding("workdir", "ok", f"{root} ({mode or 'mode unknown'}): writable"))
    return True


async def _server(config: Config) -> Finding:
    """Whether this configuration's server answers at the URL jobs are given, from here:
    only a hint (this machine is not a compute node); the probe job decides."""
    server = config.server
    url = server.events_base_url
    probe_id = f"doctor-{secrets.token_hex(6)}"
    if not server.public_url:
        return Finding("server", "warning",
                       f"[server] public_url is not set: jobs are given {url}",
                       "set [server] public_url to the URL where the compute nodes reach "
                       "this server")
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = await client.get(
                f"{url}/api/jobs/{probe_id}/spec",
                headers={"Authorization": f"Bearer {tokens.job_token(server.secret, probe_id)}"})
    except httpx.HTTPError as exc:
        return Finding("server", "warning",
                       f"no server answers at public_url {url} from this machine "
                       f"({type(exc).__name__}: {exc or 'no answer'}): is it running "
                       "(`metis-stream serve`)? The probe job tests the route all the same",
                       "start the server, or set [server] public_url to where it listens")
    if answer.status_code == 404:
        return Finding("server", "ok", f"this configuration's server answers at {url}")
    if answer.status_code == 401:
        return Finding("server", "problem",
                       f"the server at {url} refuses this configuration's job tokens: it "
                       "runs with another secret",
                       "give the server and this command the same [server] secret (or "
                       "METIS_SECRET, or the same state_dir)")
    return Finding("server", "warning",
                   f"what answers at {url} is not this metis-stream server "
                   f"(HTTP {answer.status_code})",
                   "set [server] public_url to the address of this server")


# ---------------------------------------------------------------------------- the probe job


async def _probe(config: Config, cluster: ClusterConfig, shell: Shell,
                 scheduler: BatchScheduler, diagnosis: Diagnosis, timeout: float,
                 progress: Progress) -> None:
    job_id = f"doctor-{secrets.token_hex(6)}"
    job_dir = f"{cluster.workdir.rstrip('/')}/jobs/{job_id}"
    env = {"METIS_JOB_ID": job_id, "METIS_EVENTS_URL": config.server.events_url(job_id),
           "METIS_DELIVERY": "spool", "METIS_DOCTOR_VALUE": PROBE_VALUE}
    template = Template(name="doctor", cluster=cluster.name, script=PROBE_SCRIPT,
                        capture=False)
    submission_spec = {"job": job_id, "template": template.name, "params": {}, "inputs": []}
    # Named so that the cluster's admins can tell it in qstat: ms-...-doctor
    submission = Submission(job_id=job_id, name=job_name(job_id[-12:], "doctor"),
                            template=template, env=env,
                            token=tokens.job_token(config.server.secret, job_id),
                            spec=submission_spec)
    try:
        scheduler_id = await scheduler.submit(submission)
    except MetisError as exc:
        diagnosis.add(Finding("probe job", "problem", f"could not be submitted: {exc}",
                              "fix what the scheduler says: real jobs are submitted the "
                              "same way"))
        await _remove(shell, job_dir, cluster)
        return
    ended = False
    try:
        ended = await _wait(scheduler, scheduler_id, timeout, progress)
        if ended:
            await _judge_probe(config, cluster, shell, scheduler, diagnosis, job_id, job_dir,
                               scheduler_id)
        else:
            diagnosis.add(Finding("probe job", "warning",
                                  f"job {scheduler_id} did not end within {timeout:g} s "
                                  "(cancelled): the route and the spool are untested",
                                  "run doctor again when the queue is shorter, or with a "
                                  "longer --timeout"))
    finally:
        with anyio.CancelScope(shield=True):
            if not ended:
                with contextlib.suppress(MetisError):  # it may have ended meanwhile
                    await scheduler.cancel(scheduler_id)
            await _remove(shell, job_dir, cluster)


async def _wait(scheduler: BatchScheduler, scheduler_id: str, timeout: float,
                progress: Progress) -> bool:
    """Until the scheduler says the probe ended (or has forgotten it); False on timeout."""
    started = time.monotonic()
    with anyio.move_on_after(timeout):
        while True:
            try:
                status = (await scheduler.poll([scheduler_id])).get(scheduler_id)
            except MetisError:
                # A failed look (a slow controller) is not the job's end: look again.
                await anyio.sleep(POLL_SECONDS)
                continue
            if status is None or status.state == "ended":
                progress("", time.monotonic() - started)
                return True
            progress(f"probe job {scheduler_id} is {status.state}",
                     time.monotonic() - started)
            await anyio.sleep(POLL_SECONDS)
    progress("", time.monotonic() - started)
    return False


async def _judge_probe(config: Config, cluster: ClusterConfig, shell: Shell,
                       scheduler: BatchScheduler, diagnosis: Diagnosis, job_id: str,
                       job_dir: str, scheduler_id: str) -> None:
    raw = await _report(shell, f"{job_dir}/{PROBE_REPORT}")
    if raw is None:
        diagnosis.add(Finding("probe job", "problem", await _why_no_report(
            shell, scheduler, job_id, job_dir, scheduler_id),
            f"[clusters.{cluster.name}] workdir must be on a filesystem that the compute "
            "nodes share with the login node; the scheduler's own words are in "
            f"{job_dir}/{LAUNCHER_ERR}"))
        return
    report = parse_probe_report(raw)
    diagnosis.add(Finding("probe job", "ok", f"job {scheduler_id} ran on "
                          f"{report.host or 'a compute node'}"))
    diagnosis.add(_environment_finding(report, cluster))
    route = judge_route(report, config.server.events_base_url, cluster.name)
    spool = await _spool_finding(scheduler, job_id, job_dir)
    spool_works = spool.status == "ok"
    diagnosis.add(as_needed(route.finding, cluster.delivery, "http", spool_works))
    diagnosis.add(as_needed(spool, cluster.delivery, "spool", route.works))
    diagnosis.add(delivery_finding(cluster.name, cluster.delivery, route.works, spool_works))
    diagnosis.recommended_delivery = recommend_delivery(route.works, spool_works)


async def _report(shell: Shell, path: str) -> bytes | None:
    """The probe's report, waiting a little for it: an NFS client on the login node may
    show a file that a compute node wrote only seconds later (its attribute cache)."""
    for _ in range(REPORT_LOOKS - 1):
        raw = await shell.read_file(path, max_bytes=4096)
        if raw is not None:
            return raw
        await anyio.sleep(POLL_SECONDS)
    return await shell.read_file(path, max_bytes=4096)


def _environment_finding(report: ProbeReport, cluster: ClusterConfig) -> Finding:
    flag = "sbatch --export" if cluster.scheduler == "slurm" else "qsub -v"
    if report.value == PROBE_VALUE:
        return Finding(flag, "ok", "the job's variables arrive intact")
    arrived = "did not arrive" if report.value is None else f"arrived as {report.value!r}"
    return Finding(flag, "problem",
                   f"a variable sent as {PROBE_VALUE!r} {arrived}: jobs would get wrong paths",
                   f"the scheduler changes what {flag} passes: ask its admins (a submit "
                   "filter or wrapper), and report it to metis-stream")


async def _spool_finding(scheduler: BatchScheduler, job_id: str, job_dir: str) -> Finding:
    """Read the probe's spool as the server reads every job's: one reader command over
    the kept connection, frames, then events."""
    for look in range(REPORT_LOOKS):
        if look:
            await anyio.sleep(POLL_SECONDS)  # as for the report: a file seen late
        try:
            frames = await scheduler.read_spools([SpoolRead(job_id, 0, -1,
                                                            PROBE_SPOOL_BYTES)])
        except MetisError as exc:
            return Finding("spool", "problem",
                           f"the spool reader failed on the login node: {exc}",
                           "the reader needs sh, wc, awk, tail and head -c there "
                           "(docs/spool.md)")
        chunks = [chunk for chunk in frames.chunks if chunk.job_id == job_id]
        if chunks:
            break
    else:
        trouble = "; ".join(frames.problems) or "the job left no spool"
        return Finding("spool", "problem", f"no spool read back from {job_dir} ({trouble})",
                       "the job's metis-emit writes it with dd: check that the compute "
                       "nodes have dd and may write in workdir")
    taken = take(chunks[0], SpoolCursor())
    if any(event.type == PROBE_EVENT for event in taken.events):
        return Finding("spool", "ok", "the job's events come back through the shared "
                       "filesystem")
    damage = "; ".join(taken.damage) or "no probe event in it"
    return Finding("spool", "problem", f"the spool read back is not right ({damage})",
                   "report it with the file's content to metis-stream")


async def _why_no_report(shell: Shell, scheduler: BatchScheduler, job_id: str, job_dir: str,
                         scheduler_id: str) -> str:
    files = await scheduler.read_job_files(job_id)
    record = parse_exit(files.exit)
    said = await shell.read_file(f"{job_dir}/{LAUNCHER_ERR}", max_bytes=400)
    words = said.decode(errors="replace").strip() if said else ""
    ran = record.describe() if record else "it left no exit file: its launcher never ran"
    return (f"job {scheduler_id} ended without its report ({ran})"
            + (f"; it said: {words}" if words else ""))


async def _remove(shell: Shell, job_dir: str, cluster: ClusterConfig) -> None:
    """The probe's folder, all of it: nobody debugs a probe later. A cluster gone away
    meanwhile leaves it behind, which harms nothing."""
    with contextlib.suppress(ShellError):
        await shell.run(["rm", "-rf", "--", job_dir], timeout=cluster.command_timeout)
