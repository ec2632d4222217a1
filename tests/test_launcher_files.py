"""metis_stream.launcher: the generated launcher and the job folder's files (pure)."""

from __future__ import annotations

import pytest

from metis_stream.launcher import ExitRecord, directives, launcher_env, parse_exit, tail_lines
from metis_stream.templates import Template


def test_directives_are_the_scheduler_lines_of_the_scripts_head():
    script = (b"#!/bin/bash -l\n\n# Train the model\n#PBS -N train\n#PBS  -l select=1:ngpus=1\n"
              b"#SBATCH --gres=gpu:1\n##PBS -q commented-out\n#PBSX no\n"
              b"module load python\n#PBS -q too-late\n")
    assert directives(script) == ["#PBS -N train", "#PBS  -l select=1:ngpus=1",
                                  "#SBATCH --gres=gpu:1"]
    assert directives(b"") == []
    assert directives(b"\xff\xfe#PBS -l mem=1gb\n") == []


@pytest.mark.parametrize(("text", "record"), [
    (b"0\n", ExitRecord(0)),
    (b"3\n", ExitRecord(3)),
    (b"143 SIGTERM\n", ExitRecord(143, "SIGTERM")),
    (b"137", ExitRecord(137, "SIGKILL")),  # a launcher that could not name it
    (b"255\n", ExitRecord(255)),
    (b"200\n", ExitRecord(200)),
])
def test_parse_exit(text, record):
    assert parse_exit(text) == record


@pytest.mark.parametrize("text", [None, b"", b"\n", b"x\n", b"-1\n", b"1 2 3\n", b"1234\n",
                                  b"143 TERM; rm -rf /\n"])
def test_parse_exit_refuses_anything_else(text):
    assert parse_exit(text) is None


def test_exit_record_words():
    assert ExitRecord(3).describe() == "the script exited with status 3"
    assert ExitRecord(143, "SIGTERM").describe() == "the script was killed by signal 15 (SIGTERM)"
    assert ExitRecord(143, "SIGTERM").as_data() == {"exit_status": 143, "signal": "SIGTERM"}


def test_tail_lines_as_the_launcher_shows_them():
    data = b"cut-off start\nfirst\n\rprogress 1\rprogress 2\r\nnul\0here\nbad \xff\n" + b"y" * 3000
    assert tail_lines(data, 10, cut=True) == [
        "first", "progress 2", "nul\ufffdhere", "bad \ufffd", "y" * 2000 + "..."]
    assert tail_lines(data, 2)[0] == "bad \ufffd"
    assert tail_lines(b"only line", 5, cut=True) == ["only line"]
    assert tail_lines(b"a\nb\n", 0) == []
    assert tail_lines(None, 5) == []


def test_launcher_env_carries_the_templates_settings():
    template = Template(name="t", cluster="c", capture=False, log_max_events=10,
                        log_max_bytes=2000, stderr_tail_lines=5)
    assert launcher_env(template, "/home/u/ms/jobs/j_1") == {
        "METIS_JOB_DIR": "/home/u/ms/jobs/j_1",
        "METIS_INPUTS_DIR": "/home/u/ms/jobs/j_1/inputs", "METIS_CAPTURE": "0",
        "METIS_LOG_MAX_EVENTS": "10", "METIS_LOG_MAX_BYTES": "2000",
        "METIS_STDERR_TAIL_LINES": "5"}
