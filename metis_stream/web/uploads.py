"""Input files uploaded with a submission (docs/files.md): ``POST /api/jobs`` as
``multipart/form-data``, first a part named ``job`` holding the usual JSON request, then
one part named ``file`` per input file, whose ``filename`` is its name in the job's
``inputs/`` folder.

The files go on to the cluster as they arrive (``MultipartReader``,
``Shell.write_chunks``), never whole in the server's memory, and before the job is
recorded: a refused or broken upload leaves no job and removes what it stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio

from metis_stream.config import ServerConfig
from metis_stream.errors import BadInput, ShellError
from metis_stream.job_folder import JobFolder, input_name, limited
from metis_stream.multipart import Data, MultipartReader, PartEnd, PartStart, boundary_of
from metis_stream.service import Uploads

MULTIPART_TYPE = "multipart/form-data"
JOB_FIELD = "job"
"""The field that holds the submission's JSON request; it comes first."""
FILE_FIELD = "file"
"""The field of each input file; its ``filename`` is its name in ``inputs/``."""

Events = AsyncIterator[PartStart | Data | PartEnd]


async def read_with_files(content_type: str, chunks: AsyncIterator[bytes],
                          server: ServerConfig, max_request: int) -> tuple[bytes, Uploads]:
    """The JSON request of a multipart submission (at most ``max_request`` bytes; read
    now), and what stores its files (the rest of the body, read as the service calls it
    with the job's folder)."""
    events = _events(MultipartReader(boundary_of(content_type)), chunks)
    start = await anext(events, None)
    if not isinstance(start, PartStart) or start.name != JOB_FIELD:
        raise BadInput(f"the first part must be the JSON request, named {JOB_FIELD!r}")
    raw = b"".join([chunk async for chunk in limited(_part_body(events), max_request,
                                                     "the JSON request")])

    async def upload(folder: JobFolder) -> None:
        stored: list[str] = []
        total = 0
        try:
            async for event in events:
                if not isinstance(event, PartStart) or event.name != FILE_FIELD:
                    raise BadInput(f"after the JSON request, each part must be a file named "
                                   f"{FILE_FIELD!r}")
                if not event.filename:
                    raise BadInput("each file part needs a filename")
                name = input_name(event.filename)
                if name in stored:
                    raise BadInput(f"two input files are named {name!r}")
                room = server.max_upload_bytes - total
                limit, what = ((server.max_upload_file_bytes, f"input {name!r}")
                               if server.max_upload_file_bytes <= room
                               else (room, "the input files together"))
                stored.append(name)
                total += await folder.store_input(name, limited(_part_body(events), limit,
                                                                what))
        except BaseException:
            # What the client sent is refused whole; a failure to clean up must not hide why.
            with anyio.CancelScope(shield=True), contextlib.suppress(ShellError):
                await folder.remove_inputs(stored)
            raise

    return raw, upload


async def _events(reader: MultipartReader, chunks: AsyncIterator[bytes]) -> Events:
    async for chunk in chunks:
        reader.feed(chunk)
        for event in reader.events_received():
            yield event
        if reader.finished:
            return
    reader.feed_eof()


async def _part_body(events: Events) -> AsyncIterator[bytes]:
    """The current part's data, up to its end."""
    async for event in events:
        if isinstance(event, PartEnd):
            return
        if not isinstance(event, Data):
            raise BadInput("a multipart part ended without its boundary")
        yield event.data
    raise BadInput("the multipart body ended in the middle of a part")
