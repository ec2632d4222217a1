"""A job's media chunks saved as files: what ``metis-stream tail --save DIR`` writes.

Each stream's chunks, in index order, make one file, ``DIR/<stream>.<ext>``: an
``audio/pcm`` stream becomes a WAV (a header before its samples), and a WAV whose sizes
were left unknown (ffmpeg writing to a pipe cannot go back to fill them in) has them set
when the stream ends, so that the file plays. An image chunk is a whole image of its
own: ``DIR/<stream>-<index>.<ext>``. docs/media.md describes the chunks themselves.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

from metis_stream.errors import BadInput
from metis_stream.events import Chunk
from metis_stream.terminal import LiveLine

PCM_SAMPLE_BYTES = 2
"""``audio/pcm`` is signed 16-bit little-endian samples, channels interleaved."""
DEFAULT_PCM_RATE = 16_000
DEFAULT_PCM_CHANNELS = 1

EXTENSIONS = {
    "audio/wav": "wav", "audio/wave": "wav", "audio/x-wav": "wav", "audio/pcm": "wav",
    "audio/ogg": "ogg", "audio/mpeg": "mp3", "audio/flac": "flac", "audio/webm": "webm",
    "image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp",
    "image/svg+xml": "svg", "video/mp4": "mp4", "video/webm": "webm", "text/plain": "txt",
}
WAV_TYPES = frozenset({"audio/wav", "audio/wave", "audio/x-wav"})
_RIFF_HEADER = struct.Struct("<4sI4s")
_CHUNK_HEADER = struct.Struct("<4sI")


def pcm_format(chunk: Chunk) -> tuple[int, int]:
    """The sample rate and channel count of an ``audio/pcm`` chunk's media type."""
    params = chunk.params
    try:
        rate = int(params.get("rate", DEFAULT_PCM_RATE))
        channels = int(params.get("channels", DEFAULT_PCM_CHANNELS))
    except ValueError:
        raise BadInput(f"{chunk.media_type!r}: rate and channels must be whole numbers") from None
    if not (1 <= rate <= 1_000_000 and 1 <= channels <= 64):
        raise BadInput(f"{chunk.media_type!r}: no such rate or channel count")
    return rate, channels


def wav_header(rate: int, channels: int, data_bytes: int) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV with ``data_bytes`` of samples."""
    block = channels * PCM_SAMPLE_BYTES
    return (_RIFF_HEADER.pack(b"RIFF", 36 + data_bytes, b"WAVE")
            + _CHUNK_HEADER.pack(b"fmt ", 16)
            + struct.pack("<HHIIHH", 1, channels, rate, rate * block, block,
                          PCM_SAMPLE_BYTES * 8)
            + _CHUNK_HEADER.pack(b"data", data_bytes))


def set_wav_sizes(file: BinaryIO) -> None:
    """Make the RIFF and ``data`` sizes of the WAV in ``file`` match its length (a streamed
    WAV may say 0 or 0xFFFFFFFF); a file that is not a WAV is left as it is."""
    file.seek(0, 2)
    length = file.tell()
    file.seek(0)
    head = file.read(_RIFF_HEADER.size)
    if len(head) < _RIFF_HEADER.size or head[:4] != b"RIFF" or head[8:] != b"WAVE":
        return
    offset = _RIFF_HEADER.size
    while offset + _CHUNK_HEADER.size <= length:
        file.seek(offset)
        kind, size = _CHUNK_HEADER.unpack(file.read(_CHUNK_HEADER.size))
        if kind == b"data":
            file.seek(offset + 4)
            file.write(struct.pack("<I", min(length - offset - 8, 0xFFFFFFFF)))
            break
        offset += _CHUNK_HEADER.size + size + size % 2
    file.seek(4)
    file.write(struct.pack("<I", min(length - 8, 0xFFFFFFFF)))


@dataclass
class _Stream:
    name: str
    media_type: str
    path: Path
    file: BinaryIO | None
    pcm: tuple[int, int] | None
    next_index: int = 0
    chunks: int = 0
    bytes: int = 0


class MediaSaver:
    """Writes each stream's chunks to its file in ``folder`` as they arrive, with a progress
    line on ``progress`` (redrawn in place on a terminal)."""

    def __init__(self, folder: Path, progress: TextIO) -> None:
        self._folder = folder
        self._line = LiveLine(progress)
        self._streams: dict[str, _Stream] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, chunk: Chunk) -> None:
        stream = self._streams.get(chunk.stream) or self._open(chunk)
        if chunk.index < stream.next_index:
            self._warn(f"{chunk.stream}: chunk {chunk.index} again: skipped")
            return
        if chunk.index > stream.next_index:
            self._warn(f"{chunk.stream}: chunks {stream.next_index} to {chunk.index - 1} "
                       "never came")
        payload = chunk.payload()
        if stream.file is None:
            path = self._folder / f"{chunk.stream}-{chunk.index:05d}.{_extension(chunk)}"
            path.write_bytes(payload)
        else:
            stream.file.write(payload)
        stream.next_index = chunk.index + 1
        stream.chunks += 1
        stream.bytes += len(payload)
        self._line.draw(self._summary())

    def close(self) -> None:
        """Finish every file (a WAV's sizes) and say what was saved."""
        for stream in self._streams.values():
            if stream.file is None:
                continue
            if stream.pcm is not None:
                stream.file.seek(0)
                stream.file.write(wav_header(*stream.pcm, stream.bytes))
            elif stream.media_type in WAV_TYPES:
                set_wav_sizes(stream.file)
            stream.file.close()
        for stream in self._streams.values():
            where = stream.path if stream.file is not None else f"{stream.path}-*"
            self._line.print(f"saved {where}: {stream.chunks} chunks, {stream.bytes} bytes")

    def _open(self, chunk: Chunk) -> _Stream:
        essence = chunk.essence
        pcm = pcm_format(chunk) if essence == "audio/pcm" else None
        if essence.startswith("image/"):
            stream = _Stream(chunk.stream, essence, self._folder / chunk.stream, None, None)
        else:
            path = self._folder / f"{chunk.stream}.{_extension(chunk)}"
            file = path.open("w+b")
            if pcm is not None:
                file.write(wav_header(*pcm, 0))
            stream = _Stream(chunk.stream, essence, path, file, pcm)
        self._streams[chunk.stream] = stream
        return stream

    def _summary(self) -> str:
        return "saving " + ", ".join(f"{s.name}: {s.chunks} chunks, {s.bytes} bytes"
                                     for s in self._streams.values())

    def _warn(self, message: str) -> None:
        self._line.print(f"warning: {message}")


def _extension(chunk: Chunk) -> str:
    return EXTENSIONS.get(chunk.essence, "bin")
