"""Issue 7, scenario E: submissions over SSH to the real test cluster. How long
scheduler commands take over SSHShell on a kept connection against a new connection
per command, qsub and qstat themselves, and whole submissions through BatchScheduler
(staging the token and spec, then qsub): sequential over the kept connection, with a
new connection each, and 50 at once. Builds its own test cluster (root).

    sudo .venv/bin/python -m bench.ssh_submit [--runs 10] [--concurrent 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio

from metis_stream.config import EMIT_SCRIPT, JOBSCRIPTS_DIR
from metis_stream.jobs import new_job_id
from metis_stream.schedulers import pbs
from metis_stream.schedulers.base import Submission
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.shells.ssh import SSHShell
from metis_stream.templates import Template
from tests.support.cluster import TestCluster, build_cluster

TEMPLATE = Template(name="tokens", cluster="bench", script=JOBSCRIPTS_DIR / "tokens.pbs",
                    resources={"walltime": "00:01:00"})


def new_shell(cluster: TestCluster) -> SSHShell:
    return SSHShell(
        cluster.host,
        port=cluster.port,
        user=cluster.user,
        known_hosts=cluster.known_hosts,
        key_file=cluster.key_file,
        use_agent=False,
    )


async def timed(runs: int, step: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await step()
        times.append((time.perf_counter() - started) * 1000)
    return times


def report(label: str, times: list[float]) -> None:
    print(
        f"{label:<44} median {statistics.median(times):7.1f} ms   "
        f"min {min(times):7.1f}   max {max(times):7.1f}   (n={len(times)})"
    )


def submission() -> Submission:
    job_id = new_job_id()
    # An events URL where nothing listens, and no retries: the job's first post fails and
    # it ends at once; what is timed is the submission.
    return Submission(job_id=job_id, name=f"ms-{job_id[-12:]}", template=TEMPLATE,
                      env={"METIS_JOB_ID": job_id, "METIS_EMIT_RETRIES": "0",
                           "METIS_EVENTS_URL": "http://127.0.0.1:9/unused"},
                      token="bench-token", spec={})


def scheduler(shell: SSHShell) -> BatchScheduler:
    return BatchScheduler("bench", pbs.DIALECT, shell, workdir="metis-stream-bench",
                          poll_interval=60, emit_script=EMIT_SCRIPT)


async def bench(cluster: TestCluster, runs: int, concurrent: int) -> None:
    kept = new_shell(cluster)
    await kept.run(["true"])  # opened once, before timing

    async def fresh() -> None:
        shell = new_shell(cluster)
        await shell.run(["true"])
        await shell.close()

    await kept.write_file("bench.sh", b"#!/bin/sh\ntrue\n", mode=0o700)
    job_ids: list[str] = []

    async def qsub() -> None:
        result = await kept.run(["qsub", "bench.sh"], idempotent=False)
        job_ids.append(result.stdout.strip())

    print(f"cluster mode: {cluster.mode}, sshd at {cluster.host}:{cluster.port}")
    report("`true`, kept connection", await timed(runs, lambda: kept.run(["true"])))
    report("`true`, new connection per command", await timed(runs, fresh))
    report("`qsub` (PBS wrapper), kept connection", await timed(runs, qsub))
    report(
        "`qstat -f` of 10 jobs, kept connection",
        await timed(runs, lambda: kept.run(["qstat", "-f", *job_ids[:10]])),
    )
    report(
        "`squeue` of 10 jobs, kept connection",
        await timed(runs, lambda: kept.run(["squeue", "-h", "-j", ",".join(job_ids[:10])])),
    )
    print(f"connections opened by the kept shell: {kept.connections_opened}")
    await kept.run(["sh", "-c", "rm -f bench.sh bench.sh.[oe]*"])

    kept_scheduler = scheduler(kept)
    await kept_scheduler.submit(submission())  # stages the script and helper once
    submit_times = await timed(runs, lambda: kept_scheduler.submit(submission()))
    report("whole submission, kept connection", submit_times)

    async def fresh_submit() -> None:
        shell = new_shell(cluster)
        await scheduler(shell).submit(submission())
        await shell.close()

    report("whole submission, new connection each", await timed(runs, fresh_submit))
    results: list[str | BaseException] = []

    async def one() -> None:
        try:
            results.append(await kept_scheduler.submit(submission()))
        except Exception as exc:
            results.append(exc)

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for _ in range(concurrent):
            tasks.start_soon(one)
    elapsed = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, BaseException)]
    print(f"{concurrent} submissions at once over the kept connection: "
          f"{len(results) - len(failed)} succeeded, {len(failed)} failed, {elapsed:.2f} s"
          + (f" (first error: {failed[0]!r})" if failed else ""))
    print(f"connections opened by the kept shell in all: {kept.connections_opened}")
    await kept.run(["sh", "-c", "qdel $(qselect 2>/dev/null) 2>/dev/null; "
                                "scancel -u \"$(id -un)\" 2>/dev/null; "
                                "rm -rf metis-stream-bench"])
    await kept.close()


def run(runs: int = 10, concurrent: int = 50) -> None:
    """Build the test cluster, measure, and take the cluster down again."""
    cluster = build_cluster()
    try:
        anyio.run(bench, cluster, runs, concurrent)
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=50)
    args = parser.parse_args()
    run(args.runs, args.concurrent)


if __name__ == "__main__":
    main()
