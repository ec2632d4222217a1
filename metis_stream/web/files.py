"""The files API's downloads (docs/files.md): a job's folder listed, and one of its files
streamed from the cluster with ``Range`` and validators (uploads: web/uploads.py).

Nothing here holds a whole file: a download goes out piece by piece as the client takes
it (``Shell.read_chunks``, each send waiting on the client).
"""

from __future__ import annotations

import contextlib
import mimetypes
import re
from collections.abc import AsyncIterator
from email.utils import formatdate
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from metis_stream.errors import RangeNotSatisfiable, TooLarge
from metis_stream.job_folder import JobFolder, relative_path
from metis_stream.jobs import Job
from metis_stream.shells.base import FileInfo
from metis_stream.web import auth
from metis_stream.web.api import service_of
from metis_stream.web.errors import JSONResponse
from metis_stream.web.mount import root_path
from metis_stream.web.streaming import HeldStream

_RANGE = re.compile(r"bytes=([0-9]{0,18})-([0-9]{0,18})\Z")


async def list_job_files(request: Request) -> Response:
    service = service_of(request)
    job = await _watched_job(request)
    listing = await service.job_folder(job).listing(service.is_output(job))
    base = f"{root_path(request)}/api/jobs/{job.id}/files"
    template = service.config.templates.get(job.template)
    return JSONResponse({
        "job": job.id,
        "outputs": list(template.outputs) if template else [],
        "files": [{**entry.as_json(), "url": f"{base}/{quote(entry.path)}"}
                  for entry in listing.files],
        "truncated": listing.truncated,
    })


async def job_file(request: Request) -> Response:
    """One file, streamed: 200 whole, 206 for a satisfiable single ``Range``, 304 for a
    matching ``If-None-Match``; ``If-Range`` with another validator gets the whole file."""
    service = service_of(request)
    server = service.config.server
    path = relative_path(request.path_params["path"])
    job = await _watched_job(request)
    folder = service.job_folder(job)
    info = await folder.find(path)
    if info.size > server.max_download_bytes:
        raise TooLarge(f"the file is {info.size} bytes; this server serves files of at most "
                       f"{server.max_download_bytes} bytes (max_download_bytes)")
    etag = f'"{info.size:x}-{round(info.modified * 1000):x}"'
    headers = {
        "ETag": etag,
        "Last-Modified": formatdate(info.modified, usegmt=True),
        "Accept-Ranges": "bytes",
        "Cache-Control": "private, no-cache",
        # Never rendered as a page of this server's origin, whatever the job wrote.
        "Content-Disposition": _attachment(path.rsplit("/", 1)[-1]),
    }
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    span = None
    if_range = request.headers.get("if-range")
    if if_range is None or if_range == etag or if_range == headers["Last-Modified"]:
        span = byte_range(request.headers.get("range"), info.size)
    status, offset, length = 200, 0, info.size
    if span is not None:
        status, (offset, length) = 206, span
        headers["Content-Range"] = f"bytes {offset}-{offset + length - 1}/{info.size}"
    headers["Content-Length"] = str(length)
    return HeldStream(_file_body(folder, info, offset, length), contextlib.ExitStack(),
                      send_timeout=server.send_timeout, media_type=_media_type(path),
                      headers=headers, status_code=status)


async def _file_body(folder: JobFolder, info: FileInfo, offset: int,
                     length: int) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(folder.read(info, offset, length)) as chunks:
        async for chunk in chunks:
            yield chunk


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (offset, length) of a ``Range`` header of one byte range; None for no header,
    or one this server ignores (several ranges, another unit, a malformed one: RFC 9110
    lets a server answer those with the whole file). RangeNotSatisfiable when it asks for
    no byte of a file of ``size`` bytes."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"the file has {size} bytes", size)
        return max(0, size - suffix), min(suffix, size)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None  # malformed: ignored
    if start >= size:
        raise RangeNotSatisfiable(f"the range starts at byte {start}; the file has {size} "
                                  "bytes", size)
    return start, end - start + 1


async def _watched_job(request: Request) -> Job:
    """The job of the route, for an API key that sees it or its watch token."""
    service = service_of(request)
    job_id = request.path_params["job_id"]
    key = auth.require_watcher(request, service.config.server, job_id)
    return await service.get(job_id, seen_by=key)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _media_type(path: str) -> str:
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    # A .gz served as its contents' type would be unpacked by a browser, and its hash
    # would no longer match.
    return guessed if guessed and encoding is None else "application/octet-stream"


def _attachment(name: str) -> str:
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
                       for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
