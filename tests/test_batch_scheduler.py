"""BatchScheduler over a fake shell: staging, submission, interrupted submits, polling."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from metis_stream.errors import SchedulerError, ShellError, SubmitOutcomeUnknown, UnsafeValue
from metis_stream.launcher import launcher_script
from metis_stream.schedulers import pbs, slurm
from metis_stream.schedulers.base import JobFiles, Submission
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.schedulers.dialect import Dialect
from metis_stream.schedulers.flavour import SchedulerFlavour
from metis_stream.templates import Template
from tests.support.samples import ok
from tests.support.shells import HOME, FakeShell

# What each flavour answers when asked which it is (metis_stream.schedulers.flavour).
PBS_PRO = (ok("pbs_version = 2022.1.3\n"),)
TORQUE = (ok("", "Version: 6.1.3\nCommit: 7f0b0d4\n"),)
WRAPPERS = (ok("", "Unknown option: version\nUsage: qstat [-f]\n", 2), ok("slurm 22.05.8\n"))
SLURM = (ok("slurm 22.05.8\n"),)
ASKED_PBS = [["qstat", "--version"], ["sinfo", "--version"]]


def broken() -> ShellError:
    return ShellError("connection reset by peer")


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "tokens.pbs"
    script.write_text("#!/bin/sh\n$METIS_EMIT step hello\n")
    emit = tmp_path / "metis-emit"
    emit.write_text("#!/bin/sh\ncurl ...\n")
    return script, emit


def make(shell: FakeShell, emit: Path, dialect: Dialect = pbs.DIALECT) -> BatchScheduler:
    return BatchScheduler("metis", dialect, shell, workdir="metis-stream", poll_interval=5,
                          emit_script=emit)


def submission(script: Path | None, job_id: str = "j_1", **env: str) -> Submission:
    template = Template(name="tokens", cluster="metis", script=script, queue="short",
                        resources={"select": "1:ncpus=1", "walltime": "00:05:00"})
    return Submission(
        job_id=job_id, name=f"{job_id}-x", template=template,
        env={"METIS_JOB_ID": job_id, "METIS_EVENTS_URL": f"http://10.0.0.5:8000/api/jobs/{job_id}/events",
             **env},
        token="s3cret-token", spec={"params": {"text": "hi, there"}},
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


async def test_submit_stages_files_and_passes_only_paths(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(ok("42.pbs01\n"))
    scheduler = make(shell, emit)
    job = await scheduler.submit(submission(script, TEXT="hi, there", DELAY="0.5"))
    assert job == "42.pbs01"

    root = f"{HOME}/metis-stream"
    script_path = f"metis-stream/scripts/{digest(script)}-tokens.pbs"
    emit_path = f"metis-stream/bin/metis-emit-{digest(emit)}"
    assert shell.files[script_path] == (script.read_bytes(), 0o700)
    assert shell.files[emit_path][1] == 0o700
    assert shell.files["metis-stream/jobs/j_1/token"] == (b"s3cret-token", 0o600)
    spec_data, spec_mode = shell.files["metis-stream/jobs/j_1/spec.json"]
    assert spec_mode == 0o600
    assert orjson.loads(spec_data) == {"params": {"text": "hi, there"}}
    # What could not travel in -v goes to a file of its own, which the launcher exports.
    assert shell.files["metis-stream/jobs/j_1/env/TEXT"] == (b"hi, there", 0o600)
    assert "metis-stream/jobs/j_1/env/DELAY" not in shell.files

    # The scheduler runs the launcher, which runs the script (by METIS_SCRIPT).
    launcher = launcher_script(script.read_bytes())
    launcher_path = f"metis-stream/bin/launch-{hashlib.sha256(launcher).hexdigest()[:16]}"
    assert shell.files[launcher_path] == (launcher, 0o700)
    [argv] = shell.commands
    assert argv[:3] == ["qsub", "-N", "j_1-x"]
    assert argv[-1] == f"{HOME}/{launcher_path}"
    assert argv[argv.index("-o") + 1] == f"{root}/jobs/j_1/launcher.out"
    assert argv[argv.index("-e") + 1] == f"{root}/jobs/j_1/launcher.err"
    env = argv[argv.index("-v") + 1]
    assert env == (
        "METIS_JOB_ID=j_1,METIS_EVENTS_URL=http://10.0.0.5:8000/api/jobs/j_1/events,"
        f"DELAY=0.5,METIS_TOKEN_FILE={root}/jobs/j_1/token,"
        f"METIS_SPEC_FILE={root}/jobs/j_1/spec.json,METIS_EMIT={HOME}/{emit_path},"
        f"METIS_SCRIPT={HOME}/{script_path},METIS_JOB_DIR={root}/jobs/j_1,"
        f"METIS_INPUTS_DIR={root}/jobs/j_1/inputs,METIS_CAPTURE=1,"
        "METIS_LOG_MAX_EVENTS=5000,METIS_LOG_MAX_BYTES=1048576,METIS_STDERR_TAIL_LINES=20"
    )
    assert all("s3cret-token" not in arg for arg in argv)


async def test_the_launcher_carries_the_scripts_directives(files: tuple[Path, Path]) -> None:
    script, emit = files
    script.write_text("#!/bin/bash\n# a comment\n#PBS -l walltime=1:00:00\n\n"
                      "#SBATCH --gres=gpu:1\necho hi\n#PBS -q late\n")
    shell = FakeShell(ok("1\n"))
    await make(shell, emit).submit(submission(script))
    [launcher] = [data for path, (data, _) in shell.files.items() if "/bin/launch-" in path]
    lines = launcher.decode().splitlines()
    assert lines[:3] == ["#!/bin/sh", "#PBS -l walltime=1:00:00", "#SBATCH --gres=gpu:1"]
    assert "#PBS -q late" not in lines
    assert '    exec "$METIS_EMIT" run "$METIS_SCRIPT"' in lines


async def test_read_job_files_reads_exit_and_the_end_of_stderr(
        files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell()
    shell.files["metis-stream/jobs/j_1/exit"] = (b"143 SIGTERM\n", 0o600)
    shell.files["metis-stream/jobs/j_1/stderr"] = (b"x" * 70000 + b"\nlast\n", 0o600)
    found = await make(shell, emit).read_job_files("j_1")
    assert found.exit == b"143 SIGTERM\n"
    assert found.stderr_tail is not None and found.stderr_tail.endswith(b"x\nlast\n")
    assert found.stderr_cut
    assert await make(FakeShell(), emit).read_job_files("j_2") == JobFiles()


async def test_unchanged_files_are_uploaded_once(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(ok("1\n"), ok("2\n"), ok("3\n"))
    scheduler = make(shell, emit)
    await scheduler.submit(submission(script, "j_1"))
    await scheduler.submit(submission(script, "j_2"))
    staged = [p for p in shell.writes if "/jobs/" not in p]
    assert len(staged) == 3  # the script, metis-emit, the launcher
    script.write_text("#!/bin/sh\necho changed\n")
    await scheduler.submit(submission(script, "j_3"))
    staged = [p for p in shell.writes if "/jobs/" not in p]
    assert len(staged) == 4  # the same launcher: the new script has no directives either
    assert staged[-1].endswith(f"{digest(script)}-tokens.pbs")


async def test_remote_script_is_used_as_is(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(ok("7\n"))
    shell.files["/opt/jobs/run.pbs"] = (b"#!/bin/sh\n#PBS -l mem=1gb\necho hi\n", 0o700)
    scheduler = make(shell, emit)
    template = Template(name="t", cluster="metis", remote_script="/opt/jobs/run.pbs")
    sub = Submission(job_id="j_9", name="j_9", template=template, env={}, token="t")
    await scheduler.submit(sub)
    assert "METIS_SCRIPT=/opt/jobs/run.pbs" in shell.commands[0][-2]
    assert not any("/scripts/" in p for p in shell.writes)
    # Its directives were read from the cluster, for the launcher.
    assert shell.reads == ["/opt/jobs/run.pbs"]
    [launcher] = [data for path, (data, _) in shell.files.items() if "/bin/launch-" in path]
    assert b"\n#PBS -l mem=1gb\n" in launcher


async def test_qsub_failure_raises_the_schedulers_words(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(ok("qsub: Unknown queue\n", exit_status=1))
    with pytest.raises(SchedulerError, match="Unknown queue"):
        await make(shell, emit).submit(submission(script))


async def test_interrupted_submit_finds_the_job_by_name(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(broken(), ok("42.pbs01\n"))
    job = await make(shell, emit).submit(submission(script))
    assert job == "42.pbs01"
    assert shell.commands[1] == ["qselect", "-N", "j_1-x"]
    assert [c[0] for c in shell.commands].count("qsub") == 1  # never submitted twice


async def test_interrupted_submit_on_the_wrappers_falls_back_to_squeue(
    files: tuple[Path, Path],
) -> None:
    script, emit = files
    shell = FakeShell(broken(), ok("", "bash: qselect: command not found", 127), ok("15\n"))
    scheduler = make(shell, emit)
    assert await scheduler.submit(submission(script)) == "15"
    assert shell.commands[2] == ["squeue", "-h", "-t", "all", "-n", "j_1-x", "-o", "%i"]
    # qselect is not asked again
    shell.answers = [ok("16\n")]
    assert await scheduler.lookup("j_2-x") == ["16"]
    assert shell.commands[-1][0] == "squeue"


async def test_interrupted_submit_without_a_job_is_an_error(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(broken(), ok(""))
    with pytest.raises(SchedulerError, match="no such job") as info:
        await make(shell, emit).submit(submission(script))
    assert not isinstance(info.value, SubmitOutcomeUnknown)


async def test_interrupted_submit_and_lookup_means_unknown(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(broken(), broken())
    with pytest.raises(SubmitOutcomeUnknown):
        await make(shell, emit).submit(submission(script))


async def test_staging_failure_is_a_scheduler_error(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell()

    async def fail(path: str, data: bytes, *, mode: int = 0o600) -> None:
        raise ShellError("sftp failed")

    shell.write_file = fail  # type: ignore[method-assign]
    with pytest.raises(SchedulerError, match="could not stage"):
        await make(shell, emit).submit(submission(script))
    assert shell.commands == []


async def test_unsafe_workdir_and_job_id_are_refused(files: tuple[Path, Path]) -> None:
    script, emit = files
    for workdir in ("/abs", "../up", "a b", "x;y"):
        with pytest.raises(UnsafeValue):
            BatchScheduler("m", pbs.DIALECT, FakeShell(), workdir=workdir, poll_interval=1,
                           emit_script=emit)
    with pytest.raises(UnsafeValue):
        await make(FakeShell(), emit).submit(submission(script, job_id="../../x"))


async def test_poll_falls_back_to_text_once_and_follows_up_with_scontrol(
    files: tuple[Path, Path],
) -> None:
    _, emit = files
    text = "Job Id:\t15\n\tjob_state = R\n\nJob Id:\t16\n\tjob_state = C\n"
    show = "JobId=16 JobName=x JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n"
    shell = FakeShell(*WRAPPERS, ok("", "Unknown option: F\n", 2), ok(text), ok(show))
    scheduler = make(shell, emit)
    statuses = await scheduler.poll(["15", "16", "17"])
    assert statuses["15"].state == "running"
    assert (statuses["16"].state, statuses["16"].exit_status) == ("ended", 143)
    assert statuses["16"].outcome == "killed: ran past its walltime"
    assert "17" not in statuses
    assert shell.commands == [
        *ASKED_PBS,
        ["qstat", "-f", "-F", "json", "-x", "15", "16", "17"],
        ["qstat", "-f", "15", "16", "17"],
        ["scontrol", "-o", "show", "job", "16"],
    ]
    shell.answers = [ok("Job Id:\t15\n\tjob_state = R\n")]
    await scheduler.poll(["15"])
    assert shell.commands[-1] == ["qstat", "-f", "15"]  # JSON is not tried again


async def test_poll_pbs_pro_json_is_one_command(files: tuple[Path, Path]) -> None:
    _, emit = files
    json_out = ('{"Jobs": {"1.s": {"job_state": "F", "Exit_status": -29},'
                ' "2.s": {"job_state": "Q"}}}')
    shell = FakeShell(*PBS_PRO, ok(json_out))
    scheduler = make(shell, emit)
    statuses = await scheduler.poll(["1.s", "2.s", "2.s"])
    assert shell.commands[0] == ["qstat", "--version"]
    assert len(shell.commands) == 2
    assert statuses["1.s"].outcome == "killed: ran past its walltime"
    assert statuses["2.s"].state == "queued"
    assert scheduler.flavour == SchedulerFlavour("pbspro", "2022.1.3")


async def test_the_flavour_is_asked_once_and_picks_the_table(files: tuple[Path, Path]) -> None:
    """-11 is a walltime kill on Torque (a rerun on PBS Pro)."""
    _, emit = files
    text = "Job Id: 1.t\n    job_state = C\n    exit_status = -11\n"
    no_json = ok("", "qstat: invalid option -- 'F'\n", 2)
    shell = FakeShell(*TORQUE, no_json, ok(text), ok(text))
    scheduler = make(shell, emit)
    first = await scheduler.poll(["1.t"])
    assert first["1.t"].outcome == "killed: ran past its walltime"
    assert scheduler.flavour == SchedulerFlavour("torque", "6.1.3")
    await scheduler.poll(["1.t"])
    assert shell.commands[0] == ["qstat", "--version"]
    assert shell.commands[1:] == [["qstat", "-f", "-F", "json", "-x", "1.t"],
                                  ["qstat", "-f", "1.t"], ["qstat", "-f", "1.t"]]


async def test_a_flavour_no_probe_tells_is_not_asked_again(files: tuple[Path, Path]) -> None:
    _, emit = files
    text = "Job Id: 1.t\n    job_state = C\n    exit_status = -11\n"
    shell = FakeShell(ok("", "qstat: no such option\n", 2), ok("", "not found\n", 127),
                      ok("", "x", 2), ok(text), ok(text))
    scheduler = make(shell, emit)
    statuses = await scheduler.poll(["1.t"])
    assert scheduler.flavour is None
    assert statuses["1.t"].outcome == "the cluster could not run the job (code -11)"
    await scheduler.poll(["1.t"])
    assert shell.commands[-1] == ["qstat", "-f", "1.t"]


async def test_a_connection_that_fails_leaves_the_flavour_for_the_next_poll(
        files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(broken(), broken())
    scheduler = make(shell, emit)
    with pytest.raises(SchedulerError):
        await scheduler.poll(["1.s"])
    shell.answers = [*PBS_PRO, ok('{"Jobs": {"1.s": {"job_state": "R"}}}')]
    assert (await scheduler.poll(["1.s"]))["1.s"].state == "running"
    assert scheduler.flavour == SchedulerFlavour("pbspro", "2022.1.3")


async def test_poll_keeps_what_it_knows_when_a_follow_up_fails(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(*WRAPPERS, ok("", "x", 2), ok("Job Id:\t16\n\tjob_state = C\n"),
                      broken())
    statuses = await make(shell, emit).poll(["16"])
    assert (statuses["16"].state, statuses["16"].exit_status) == ("ended", None)


async def test_poll_never_drops_jobs_because_a_command_failed(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(*PBS_PRO, ok("", "qstat: cannot connect to server\n", 1))
    with pytest.raises(SchedulerError, match="cannot connect"):
        await make(shell, emit).poll(["1.s"])
    with pytest.raises(SchedulerError):
        await make(FakeShell(broken(), broken()), emit).poll(["1.s"])


async def test_poll_ignores_ids_that_are_not_job_ids(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell()
    assert await make(shell, emit).poll(["1;rm -rf ~", ""]) == {}
    assert shell.commands == []


async def test_slurm_poll_without_accounting_storage(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(
        *SLURM,
        ok("101|RUNNING|None\n102|TIMEOUT|TimeLimit\n"),
        ok("", "Slurm accounting storage is disabled\n", 1),
        ok("JobId=102 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n"),
        ok("101|RUNNING|None\n102|TIMEOUT|TimeLimit\n"),
        ok("JobId=102 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n"),
    )
    scheduler = make(shell, emit, slurm.DIALECT)
    first = await scheduler.poll(["101", "102"])
    assert first["101"].state == "running"
    assert first["102"].exit_status == 143
    second = await scheduler.poll(["101", "102"])
    assert second == first
    assert [c[0] for c in shell.commands] == [
        "sinfo", "squeue", "sacct", "scontrol", "squeue", "scontrol"]


async def test_slurm_submit(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(ok("77;cluster\n"))
    assert await make(shell, emit, slurm.DIALECT).submit(submission(script)) == "77"
    argv = shell.commands[0]
    assert argv[:3] == ["sbatch", "--parsable", "--job-name=j_1-x"]
    assert "--ntasks=1" in argv
    assert "--time=0-00:05:00" in argv


async def test_the_end_user_reaches_sbatch_as_its_comment(files: tuple[Path, Path]) -> None:
    script, emit = files
    shell = FakeShell(ok("78\n"))
    with_user = replace(submission(script), name="ms-1-u42", user="u42")
    assert await make(shell, emit, slurm.DIALECT).submit(with_user) == "78"
    argv = shell.commands[0]
    assert argv[2] == "--job-name=ms-1-u42" and "--comment=u42" in argv


async def test_cancel(files: tuple[Path, Path]) -> None:
    _, emit = files
    shell = FakeShell(ok(), ok("", "", 1),
                      ok("", "qdel: Unauthorized Request 5.s\n", 159), broken())
    scheduler = make(shell, emit)
    await scheduler.cancel("5.s")
    await scheduler.cancel("5.s")  # the wrappers: an ended job, silently
    with pytest.raises(SchedulerError, match="Unauthorized"):
        await scheduler.cancel("5.s")
    with pytest.raises(SchedulerError, match="could not cancel"):
        await scheduler.cancel("5.s")
    with pytest.raises(UnsafeValue):
        await scheduler.cancel("5.s; id")


async def test_release_removes_the_secrets_and_close_closes_the_shell(
    files: tuple[Path, Path],
) -> None:
    _, emit = files
    shell = FakeShell()
    scheduler = make(shell, emit)
    await scheduler.start()
    await scheduler.release("j_1")
    assert shell.removed == ["metis-stream/jobs/j_1/token", "metis-stream/jobs/j_1/spec.json",
                             "metis-stream/jobs/j_1/events.ndjson"]
    # spool_keep: the spool stays, for the sweeper to remove later.
    await scheduler.release("j_2", keep_spool=True)
    assert shell.removed[3:] == ["metis-stream/jobs/j_2/token",
                                 "metis-stream/jobs/j_2/spec.json"]
    await scheduler.close()
    assert shell.closed
