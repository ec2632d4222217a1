"""Capture real outputs of the scheduler commands from a fresh test cluster.

    sudo .venv/bin/python -m tests.samples.wrappers.capture

Builds a test cluster (tests/support/cluster.py), runs the PBS wrappers (qsub, qstat,
qdel) and the Slurm commands on it as the cluster user, and writes each output next to
this file, with a first line ``# $ COMMAND   (exit N)``. Takes about 90 s: a walltime
kill takes at least a minute on Slurm.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.cluster import TestCluster, build_cluster

HERE = Path(__file__).parent


def capture(cluster: TestCluster, name: str, argv: list[str]) -> str:
    """Run ``argv`` on the cluster, save it as ``name.txt``, return its stdout."""
    result = cluster.run_as_user(argv)
    text = f"# $ {shlex.join(argv)}   (exit {result.returncode})\n{result.stdout}"
    if result.stderr:
        text += f"# --- stderr ---\n{result.stderr}"
    (HERE / f"{name}.txt").write_text(text)
    print(f"{name}: exit {result.returncode}")
    return result.stdout


def submit(cluster: TestCluster, argv: list[str]) -> str:
    result = cluster.run_as_user(argv, check=True)
    return result.stdout.strip().splitlines()[-1]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.5)


def slurm_state(cluster: TestCluster, job: str) -> str:
    out = cluster.run_as_user(["squeue", "-h", "-o", "%T", "-j", job]).stdout.strip()
    if out:
        return out
    show = cluster.run_as_user(["scontrol", "show", "job", job]).stdout
    return next((w.split("=")[1] for w in show.split() if w.startswith("JobState=")), "")


def main() -> None:
    cluster = build_cluster()
    try:
        run(cluster)
    finally:
        # The cluster user outlives the cluster: leave its home as it was.
        cluster.run_as_user("rm -f ok.sh sleep.sh fail.sh ./*.[oe][0-9]* slurm-[0-9]*.out")
        cluster.stop()


def run(cluster: TestCluster) -> None:
    scripts = {
        "ok.sh": "#!/bin/sh\necho hello from $PBS_JOBID\n",
        "sleep.sh": "#!/bin/sh\nsleep 120\n",
        "fail.sh": "#!/bin/sh\necho failing >&2\nexit 3\n",
    }
    for name, body in scripts.items():
        cluster.run_as_user(f"printf '%s' {shlex.quote(body)} > {name}", check=True)

    # The node has all its CPUs taken by `blocker`, so `queued` stays queued.
    cpus = cluster.run_as_user(["nproc"]).stdout.strip()
    # One -l: the wrapper keeps only the last -l option it is given.
    blocker = capture(
        cluster,
        "qsub-success",
        ["qsub", "-N", "blocker", "-l", f"nodes=1:ppn={cpus},walltime=00:05:00", "sleep.sh"],
    ).strip()
    capture(cluster, "qsub-failure-too-big", ["qsub", "-l", "nodes=1:ppn=64", "ok.sh"])
    capture(cluster, "qsub-failure-no-script", ["qsub", "missing.sh"])
    capture(cluster, "qsub-pbspro-unsupported-option", ["qsub", "-d", "/tmp", "ok.sh"])
    queued = submit(cluster, ["qsub", "-N", "queued", "ok.sh"])
    wait_until(lambda: slurm_state(cluster, blocker) == "RUNNING", 15, "blocker to run")
    capture(cluster, "qstat-f-running", ["qstat", "-f", blocker])
    capture(cluster, "qstat-f-queued", ["qstat", "-f", queued])
    capture(cluster, "qstat-f-several", ["qstat", "-f", blocker, queued])
    capture(cluster, "qstat-list", ["qstat"])
    capture(
        cluster, "squeue-format", ["squeue", "-h", "-o", "%i|%T|%r", "-j", f"{blocker},{queued}"]
    )
    capture(cluster, "scontrol-show-job-pending", ["scontrol", "show", "job", queued])
    capture(cluster, "scontrol-show-job-running", ["scontrol", "show", "job", blocker])

    capture(cluster, "qdel-running", ["qdel", blocker])
    wait_until(lambda: slurm_state(cluster, blocker) == "CANCELLED", 15, "blocker cancelled")
    capture(cluster, "scontrol-show-job-cancelled", ["scontrol", "show", "job", blocker])
    capture(cluster, "qstat-f-cancelled", ["qstat", "-f", blocker])
    wait_until(lambda: slurm_state(cluster, queued) == "COMPLETED", 15, "queued to complete")
    capture(cluster, "qstat-f-completed", ["qstat", "-f", queued])
    capture(cluster, "scontrol-show-job-completed", ["scontrol", "show", "job", queued])
    capture(cluster, "job-output-file", ["sh", "-c", f"ls *.[oe]{queued}; cat queued.o{queued}"])

    failed = capture(cluster, "sbatch-parsable", ["sbatch", "--parsable", "fail.sh"]).strip()
    wait_until(lambda: slurm_state(cluster, failed) == "FAILED", 15, "the failing job")
    capture(cluster, "scontrol-show-job-failed", ["scontrol", "show", "job", failed])
    capture(cluster, "qstat-f-failed", ["qstat", "-f", failed])

    capture(cluster, "qstat-unknown", ["qstat", "-f", "99999"])
    capture(cluster, "qstat-f-json-unsupported", ["qstat", "-f", "-F", "json", queued])
    capture(cluster, "qstat-x-unsupported", ["qstat", "-x", queued])
    capture(cluster, "qdel-unknown", ["qdel", "99999"])
    capture(cluster, "qdel-ended", ["qdel", queued])
    capture(cluster, "squeue-unknown", ["squeue", "-h", "-o", "%i|%T|%r", "-j", "99999"])
    capture(cluster, "scontrol-show-job-unknown", ["scontrol", "show", "job", "99999"])

    # A walltime kill: Slurm keeps limits in whole minutes (5 s becomes 1 min) and checks
    # them about every 30 s.
    timeout = submit(cluster, ["qsub", "-l", "walltime=00:00:05", "sleep.sh"])
    wait_until(lambda: slurm_state(cluster, timeout) == "TIMEOUT", 90, "the walltime kill")
    capture(cluster, "scontrol-show-job-timeout", ["scontrol", "show", "job", timeout])
    capture(cluster, "qstat-f-timeout", ["qstat", "-f", timeout])
    capture(
        cluster, "squeue-ended", ["squeue", "-h", "-o", "%i|%T|%r", "-j", f"{failed},{timeout}"]
    )
    # Without -t all, squeue leaves out jobs that have ended (even while scontrol knows them).
    capture(
        cluster,
        "squeue-ended-all-states",
        [
            "squeue",
            "-h",
            "-t",
            "all",
            "-o",
            "%i|%T|%r",
            "-j",
            f"{blocker},{queued},{failed},{timeout}",
        ],
    )
    capture(
        cluster,
        "sacct",
        [
            "sacct",
            "-n",
            "-P",
            "-X",
            "-j",
            f"{blocker},{queued},{failed},{timeout}",
            "-o",
            "JobID,State,ExitCode",
        ],
    )


if __name__ == "__main__":
    main()
