"""Scheduler output samples (tests/samples/) and command results for the parser tests."""

from __future__ import annotations

from pathlib import Path

from metis_stream.shells.base import CommandResult

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def sample(path: str) -> str:
    """A sample under tests/samples/, without its leading ``# source:`` comment lines."""
    lines = (SAMPLES / path).read_text().splitlines(keepends=True)
    while lines and lines[0].startswith("# "):
        lines.pop(0)
    return "".join(lines)


def ok(stdout: str = "", stderr: str = "", exit_status: int = 0) -> CommandResult:
    """What a command printed, as a shell returns it."""
    return CommandResult(exit_status, stdout, stderr)
