"""Media chunks end to end (docs/media.md): the demo's ``audio`` job streams a WAV that
arrives whole and in order, and ``metis-stream tail --save`` writes it back as a WAV that
decodes to the same samples; and metis_stream.media's files, unit by unit."""

from __future__ import annotations

import base64
import hashlib
import io
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream.events import Chunk
from metis_stream.media import MediaSaver, set_wav_sizes, wav_header
from metis_stream.terminal import EventPrinter
from tests.test_cli_e2e import Demo, cli

NOTES = 5


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media") / "state"


@pytest.fixture(scope="module")
def demo(demo_state: Path) -> Iterator[Demo]:
    running = Demo(demo_state)
    try:
        yield running
    finally:
        running.stop()


def demo_get(demo: Demo, path: str, **params: Any) -> Any:
    answer = httpx.get(f"{demo.url}{path}", params=params, timeout=10,
                       headers={"Authorization": f"Bearer {demo.key}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def audio_job(demo: Demo) -> dict[str, Any]:
    """The demo's audio job, submitted and followed to its end by ``tail --save``."""
    created = httpx.post(f"{demo.url}/api/jobs", timeout=10,
                         headers={"Authorization": f"Bearer {demo.key}"},
                         json={"template": "audio", "params": {"notes": NOTES, "delay": 0.2}})
    assert created.status_code == 201, created.text
    return {"id": created.json()["id"]}


def all_events(demo: Demo, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        page = demo_get(demo, f"/api/jobs/{job_id}/events", after=len(events))
        events += page["events"]
        if not page["more"]:
            return events


def test_the_demos_audio_job_streams_its_wav_whole_and_in_order(
        demo: Demo, demo_state: Path, audio_job: dict[str, Any], tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    done = cli("tail", audio_job["id"], "--save", str(saved), "--url", demo.url,
               "--key", demo.key, timeout=120)
    assert done.returncode == 0, done.stderr
    events = all_events(demo, audio_job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    chunks = [e["data"] for e in events if e["type"] == "chunk"]
    result = events[-1]["data"]
    assert events[-1]["type"] == "completed"
    # Every chunk once, in order: header and NOTES half seconds of 16-bit samples at 16 kHz.
    assert [(c["stream"], c["index"], c["media_type"]) for c in chunks] == [
        ("audio", i, "audio/wav") for i in range(result["chunks"])]
    wav = b"".join(base64.b64decode(c["base64"]) for c in chunks)
    assert len(wav) == result["bytes"] == 44 + NOTES * 16_000
    assert hashlib.sha256(wav).hexdigest() == result["sha256"]
    # What the job itself wrote, in its folder.
    written = next(demo_state.rglob(f"{audio_job['id']}/tune.wav"))
    assert written.read_bytes() == wav
    # tail --save: the same samples, as a WAV that Python's wave module reads.
    assert (saved / "audio.wav").read_bytes() == wav
    with wave.open(str(saved / "audio.wav")) as saved_wav, wave.open(io.BytesIO(wav)) as sent:
        assert (saved_wav.getframerate(), saved_wav.getnchannels()) == (16_000, 1)
        assert saved_wav.getnframes() == NOTES * 8_000
        assert saved_wav.readframes(10**6) == sent.readframes(10**6)
    assert f"saved {saved / 'audio.wav'}: {result['chunks']} chunks" in done.stderr
    # The chunks stay out of stdout: its lines are the job's other events.
    assert "base64" not in done.stdout and " chunk " not in done.stdout


# metis_stream.media


def pcm_chunk(samples: bytes, index: int, stream: str = "voice") -> Chunk:
    return Chunk(stream, index, "audio/pcm;rate=8000;channels=2",
                 base64.b64encode(samples).decode())


def test_pcm_chunks_are_saved_as_a_wav_of_the_same_samples(tmp_path: Path) -> None:
    samples = bytes(range(256)) * 30
    progress = io.StringIO()
    saver = MediaSaver(tmp_path, progress)
    for index, start in enumerate(range(0, len(samples), 1000)):
        saver.add(pcm_chunk(samples[start:start + 1000], index))
    saver.close()
    with wave.open(str(tmp_path / "voice.wav")) as saved:
        assert (saved.getframerate(), saved.getnchannels(), saved.getsampwidth()) == (8000, 2, 2)
        assert saved.readframes(10**6) == samples
    assert progress.getvalue() == f"saved {tmp_path / 'voice.wav'}: 8 chunks, 7680 bytes\n"


def test_a_streamed_wav_gets_its_sizes_and_repeats_and_gaps_are_told(tmp_path: Path) -> None:
    samples = b"\x01\x02" * 5000
    streamed = bytearray(wav_header(16_000, 1, 0) + samples)
    streamed[4:8] = streamed[40:44] = b"\xff\xff\xff\xff"  # what ffmpeg writes to a pipe
    progress = io.StringIO()
    saver = MediaSaver(tmp_path, progress)
    for index, piece in [(0, streamed[:3000]), (0, streamed[:3000]), (1, streamed[3000:6000]),
                         (3, streamed[6000:])]:
        saver.add(Chunk("audio", index, "audio/wav", base64.b64encode(piece).decode()))
    saver.close()
    with wave.open(str(tmp_path / "audio.wav")) as saved:
        assert saved.readframes(10**6) == samples
    assert "warning: audio: chunk 0 again: skipped" in progress.getvalue()
    assert "warning: audio: chunks 2 to 2 never came" in progress.getvalue()


def test_each_image_chunk_is_a_file_of_its_own(tmp_path: Path) -> None:
    saver = MediaSaver(tmp_path / "out", io.StringIO())
    for index in range(3):
        saver.add(Chunk("frames", index, "image/png",
                        base64.b64encode(f"png {index}".encode()).decode()))
    saver.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "frames-00000.png", "frames-00001.png", "frames-00002.png"]
    assert (tmp_path / "out" / "frames-00002.png").read_bytes() == b"png 2"


def test_set_wav_sizes_leaves_other_files_alone() -> None:
    other = io.BytesIO(b"OggS" + bytes(100))
    set_wav_sizes(other)
    assert other.getvalue() == b"OggS" + bytes(100)


def test_a_chunk_event_is_one_short_line_on_a_terminal() -> None:
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show({"type": "chunk", "time": 0, "data": {
        "stream": "audio", "index": 3, "media_type": "audio/wav", "base64": "UklGRg=="}})
    assert out.getvalue().endswith(" chunk      audio #3 audio/wav, 4 bytes\n")
