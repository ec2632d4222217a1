"""How long scheduler commands take over SSHShell: a kept connection against a new
connection per command, and qsub/qstat themselves. Builds its own test cluster (root).

    sudo .venv/bin/python -m bench.ssh_submit [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable

import anyio

from metis_stream.shells.ssh import SSHShell
from tests.support.cluster import TestCluster, build_cluster


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


async def bench(cluster: TestCluster, runs: int) -> None:
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
    await kept.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    cluster = build_cluster()
    try:
        anyio.run(bench, cluster, args.runs)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
