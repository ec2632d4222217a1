"""A scheduler double for tests of the service and the monitor: the whole Scheduler
contract, doing nothing; a test overrides what it is about (submit, poll, cancel)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from metis_stream.job_folder import JobFolder
from metis_stream.schedulers.base import JobFiles, SchedulerStatus, Submission
from metis_stream.schedulers.flavour import SchedulerFlavour
from metis_stream.spool import Frames, SpoolRead
from tests.support.shells import FakeShell


class SchedulerDouble:
    name = "double"
    poll_interval = 0.01
    shared = True
    flavour: SchedulerFlavour | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def submit(self, submission: Submission) -> str:
        return "1.double"

    async def poll(self, scheduler_ids: Sequence[str]) -> Mapping[str, SchedulerStatus]:
        return {i: SchedulerStatus("running") for i in scheduler_ids}

    async def cancel(self, scheduler_id: str) -> None:
        pass

    async def read_job_files(self, job_id: str) -> JobFiles:
        return JobFiles()

    async def read_element_exits(self, job_id: str) -> Mapping[int, bytes | None]:
        return {}

    async def read_spools(self, reads: Sequence[SpoolRead]) -> Frames:
        return Frames([])

    async def remove_old_spools(self, keep_seconds: float) -> None:
        pass

    async def release(self, job_id: str, *, keep_spool: bool = False) -> None:
        pass

    def job_folder(self, job_id: str) -> JobFolder:
        return JobFolder(FakeShell(), f"jobs/{job_id}")
