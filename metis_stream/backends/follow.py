"""``follow``: a job's events as one gapless stream, the log and then live, for every watcher.

No I/O of its own: it reads through the backend it is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from metis_stream.backends.contract import Backend, page_is_full
from metis_stream.errors import LogLost
from metis_stream.events import Event


async def follow(backend: Backend, job_id: str, after: int = 0) -> AsyncIterator[Event]:
    """Every event of a job with seq > ``after``: the log, then live, without gap or duplicate,
    ending after the terminal event.

    It subscribes before it reads the log, so an event appended in between is in
    one or the other (or both: live events at or below the last seq sent are
    dropped). A gap in live delivery is filled from the log.
    """
    async with backend.subscribe(job_id) as live:
        last = after
        async for event in _backfill(backend, job_id, last):
            yield event
            last = event.seq
            if event.terminal:
                return
        job = await backend.get_job(job_id)
        if job.state.terminal and job.last_seq <= last:
            return  # the watcher already has the terminal event: nothing more will come
        while True:
            pushed = await live.next()
            if pushed is not None and pushed.seq <= last:
                continue
            if pushed is None or pushed.seq > last + 1:
                async for missed in _backfill(backend, job_id, last):
                    yield missed
                    last = missed.seq
                    if missed.terminal:
                        return
                continue
            yield pushed
            last = pushed.seq
            if pushed.terminal:
                return


async def _backfill(backend: Backend, job_id: str, after: int) -> AsyncIterator[Event]:
    while True:
        page = await backend.read(job_id, after)
        if page and page[0].seq != after + 1:
            raise LogLost(f"events {after + 1} to {page[0].seq - 1} of job {job_id} are gone")
        for event in page:
            yield event
        if not page_is_full(page):
            return
        after = page[-1].seq
