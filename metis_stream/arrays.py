"""Job arrays: an array's tally and its verdict, from its elements' ``exit`` files and
what the scheduler says. Pure code; the monitor reads the files and asks the
scheduler (docs/arrays.md).

An element counts as ``done`` or ``failed`` by its ``exit`` file (the launcher writes
it when the script ends), ``running`` once its folder exists (the launcher made it)
or the scheduler says so, and ``queued`` otherwise. The array ends when the
scheduler says it ended: an element that never wrote its ``exit`` file failed then
(killed, or never started), in the scheduler's words where it listed the element.
"""

from __future__ import annotations

from collections.abc import Mapping

from metis_stream.events import NewEvent
from metis_stream.jobs import TALLY_KEYS, Job
from metis_stream.launcher import parse_exit
from metis_stream.schedulers.base import SchedulerStatus
from metis_stream.templates import parse_array

NAMED_FAILURES = 10
"""How many failed elements the array's ``fatal`` names in its message (all are in its
data)."""


def element_outcomes(job: Job, status: SchedulerStatus | None, ended: bool,
                     exits: Mapping[int, bytes | None]) -> dict[int, tuple[str, str, int | None]]:
    """Each element's (tally key, words of a failure, exit status)."""
    assert job.array is not None
    elements = status.elements if status is not None else {}
    outcomes: dict[int, tuple[str, str, int | None]] = {}
    for index in parse_array(job.array).indices:
        record = parse_exit(exits.get(index))
        listed = elements.get(index)
        if record is not None:
            words = f"signal {record.signal}" if record.signal else f"exit {record.status}"
            outcomes[index] = ("done" if record.status == 0 else "failed", words, record.status)
        elif ended:
            words = (listed.outcome or listed.detail) if listed is not None else (
                "ended without an exit status" if index in exits else "never started")
            outcomes[index] = ("failed", words, listed.exit_status if listed else None)
        elif index in exits or (listed is not None and listed.state == "running"):
            outcomes[index] = ("running", "", None)
        else:
            outcomes[index] = ("queued", "", None)
    return outcomes


def reconcile_array(job: Job, status: SchedulerStatus | None, ended: bool,
                    exits: Mapping[int, bytes | None]) -> list[NewEvent]:
    """The events that bring an array in line with its elements: ``elements`` (the tally)
    when it changed, and once the scheduler says the array ``ended``, its verdict:
    ``completed`` when every element succeeded, else ``fatal`` naming the failed ones."""
    outcomes = element_outcomes(job, status, ended, exits)
    tally = dict.fromkeys(TALLY_KEYS, 0)
    for key, _, _ in outcomes.values():
        tally[key] += 1
    events = [] if tally == job.elements else [NewEvent("elements", tally)]
    if not ended:
        return events
    failed = [(index, words, code) for index, (key, words, code) in outcomes.items()
              if key == "failed"]
    if not failed:
        return [*events, NewEvent("completed", {"elements": tally, "source": "monitor"})]
    named = ", ".join(f"{index} ({words})" for index, words, _ in failed[:NAMED_FAILURES])
    more = ", ..." if len(failed) > NAMED_FAILURES else ""
    return [*events, NewEvent("fatal", {
        "error": f"{len(failed)} of {len(outcomes)} elements failed: {named}{more}",
        "elements": tally,
        "failed": [{"element": index, "error": words, "exit_status": code}
                   for index, words, code in failed],
        "source": "monitor",
    })]
