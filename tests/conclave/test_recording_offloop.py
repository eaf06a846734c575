"""A recording encodes and writes on a thread of its own, not on the event loop that runs the
call's media (an H.264 frame takes milliseconds to encode): frames stay in order, at most
`QUEUE_BYTES` of them wait for the encoder (the rest are left out, counted, and the user told),
and the call's end waits for the files to be finished, within `FINISH_WAIT`, leaving no thread
behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from av import AudioFrame, VideoFrame

from conclave import media
from conclave.errors import ConclaveError
from conclave.media import RecordingIncomplete, record_track

from .conftest import WAIT, until
from .test_first_user_run import _Frames, _frames_in, _recorder

FULL_DISK = Path("/dev/full")  # every write fails with ENOSPC
HOLD = WAIT  # an encode is held this long at most: a loop it blocks fails a test, not hangs it
# A frame of `_Frames`' video (yuv420p) as the queue counts it: its planes and what it takes
# besides them.
FRAME_BYTES = 64 * 48 * 3 // 2 + media.FRAME_OVERHEAD


class _Held:
    """A test's hand on the encoder: the first `encode` waits for `go` (for `HOLD` at most)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.inside = False  # in that first encode, now

    def stream(self, stream: Any) -> Any:
        held = self

        class Stream:
            def __getattr__(self, name: str) -> Any:
                return getattr(stream, name)

            def __setattr__(self, name: str, value: Any) -> None:
                setattr(stream, name, value)

            def encode(self, frame: Any = None) -> Any:
                if not held.entered.is_set():
                    held.inside = True
                    held.entered.set()
                    held.go.wait(HOLD)
                    held.inside = False
                return stream.encode(frame)

        return Stream()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Held]:
    hand = _Held()
    opened = media._open_recording

    def open_recording(path: Path, kind: str) -> Any:
        container, stream = opened(path, kind)
        return container, hand.stream(stream)

    monkeypatch.setattr(media, "_open_recording", open_recording)
    yield hand
    hand.go.set()  # (a test that failed leaves no thread held)


def _recording_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("conclave-record")]


class _AfterTheFirst(_Frames):
    """`count` frames, the second once the encoder has the first; then the track's end, or
    nothing more (`endless`: a peer still in the call)."""

    def __init__(self, kind: str, count: int, held: _Held, endless: bool = False) -> None:
        super().__init__(kind, count)
        self.held = held
        self.endless = endless

    async def recv(self) -> AudioFrame | VideoFrame:
        if self.n == 1:
            await until(self.held.entered.is_set)
        if self.endless and self.n >= self.count:
            await asyncio.Event().wait()
        return await super().recv()


async def test_the_event_loop_runs_on_while_a_frame_is_encoded(tmp_path: Path, held: _Held) -> None:
    # Before: the frame was encoded on the loop, which ran again only once the encode was
    # over: the call's own media (RTP, SFrame, sending) stalled meanwhile.
    path = tmp_path / "dave-video.mp4"
    recording = asyncio.ensure_future(record_track(_Frames("video", 5), lambda: path))
    await until(held.entered.is_set)
    assert held.inside  # the loop ran this while the encoder held the frame
    held.go.set()
    assert await asyncio.wait_for(recording, WAIT) == path
    assert _frames_in(path) == 5
    assert _recording_threads() == []


async def test_frames_beyond_the_queue_are_left_out_counted_and_told(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "QUEUE_BYTES", 10 * FRAME_BYTES)
    track = _AfterTheFirst("video", 50, held)
    path = tmp_path / "dave-video.mp4"
    recording = asyncio.ensure_future(record_track(track, lambda: path))
    await until(lambda: track.readyState == "ended")  # read to its end, the encoder held
    held.go.set()
    with pytest.raises(RecordingIncomplete, match="39 of its 50 frames left out") as told:
        await asyncio.wait_for(recording, WAIT)
    assert (told.value.path, told.value.dropped, told.value.frames) == (path, 39, 50)
    # The first (encoding when the rest came) and the ten that fit, in order, and playable.
    assert _frames_in(path) == 11


async def test_the_calls_end_waits_for_a_file_within_a_bound_and_says_so(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "FINISH_WAIT", 0.5)
    track = _AfterTheFirst("video", 3, held, endless=True)
    path = tmp_path / "dave-video.mp4"
    recording = asyncio.ensure_future(record_track(track, lambda: path))
    await until(lambda: track.n == 3)
    recording.cancel()  # the call ends, its encoder stuck (a disk that hangs)
    await asyncio.sleep(0.1)
    recording.cancel()  # a second cancel does not cut the wait short
    with pytest.raises(RecordingIncomplete, match="not finished within 0.5 s"):
        await asyncio.wait_for(recording, WAIT)
    assert track.readyState == "ended"
    held.go.set()  # the disk is back: the thread closes the file and ends
    await until(lambda: _recording_threads() == [])
    assert _frames_in(path) >= 1


async def test_a_cancelled_recording_finishes_its_file_first(tmp_path: Path) -> None:
    track = _AfterTheFirst("video", 30, _Held(), endless=True)
    track.held.entered.set()
    path = tmp_path / "dave-video.mp4"
    recording = asyncio.ensure_future(record_track(track, lambda: path))
    await until(lambda: track.n == 30)
    recording.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(recording, WAIT)
    assert _frames_in(path) == 30 and track.readyState == "ended"
    assert _recording_threads() == []


@pytest.mark.skipif(not FULL_DISK.exists(), reason="no /dev/full")
async def test_a_failed_write_ends_the_recording_without_waiting_for_a_next_frame(
    tmp_path: Path,
) -> None:
    class _OneThenSilence(_Frames):
        async def recv(self) -> AudioFrame | VideoFrame:
            if self.n >= 1:
                await asyncio.Event().wait()  # a publisher that sends nothing more for now
            return await super().recv()

    track = _OneThenSilence("audio", 1)
    path = tmp_path / "dave-audio.wav"
    path.symlink_to(FULL_DISK)
    with pytest.raises(ConclaveError, match="No space left on device"):
        await asyncio.wait_for(record_track(track, lambda: path), WAIT)
    assert track.readyState == "ended"
    assert _recording_threads() == []


async def test_frames_left_out_are_told_when_the_call_ends_too(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "QUEUE_BYTES", 10 * FRAME_BYTES)
    track = _AfterTheFirst("video", 50, held, endless=True)
    path = tmp_path / "dave-video.mp4"
    recording = asyncio.ensure_future(record_track(track, lambda: path))
    await until(lambda: track.n == 50)
    held.go.set()
    recording.cancel()  # the call ends with dave still in it
    with pytest.raises(RecordingIncomplete, match="39 of its 50 frames left out"):
        await asyncio.wait_for(recording, WAIT)
    assert _frames_in(path) == 11 and track.readyState == "ended"
    assert _recording_threads() == []


async def test_cancelled_with_tell_the_line_is_told_and_the_cancellation_goes_on(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The participant's way (`tell`: a line of the call): a cancelled task ends cancelled."""
    monkeypatch.setattr(media, "QUEUE_BYTES", 10 * FRAME_BYTES)
    track = _AfterTheFirst("video", 50, held, endless=True)
    path = tmp_path / "dave-video.mp4"
    told: list[str] = []
    recording = asyncio.ensure_future(record_track(track, lambda: path, told.append))
    await until(lambda: track.n == 50)
    held.go.set()
    recording.cancel()  # the call ends with dave still in it
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(recording, WAIT)
    assert recording.cancelled()
    assert told == [f"recorded {path} with 39 of its 50 frames left out (the encoder fell behind)"]
    assert _frames_in(path) == 11 and track.readyState == "ended"
    assert _recording_threads() == []


async def test_a_participant_is_told_of_frames_left_out(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(media, "QUEUE_BYTES", 10 * FRAME_BYTES)
    p = _recorder(tmp_path, monkeypatch)
    notices: list[str] = []
    p.on_notice = notices.append  # a line of the call
    try:
        p._on_track(
            _AfterTheFirst("video", 50, held),
            SimpleNamespace(receiver=None),
            {"identity": "dave", "kind": "video"},
        )
        await until(lambda: p.remote[("dave", "video")].decoded == 50)  # the call reads on
        held.go.set()
        await until(lambda: any("frames left out" in n for n in notices))
    finally:
        await p.close()
    assert [n for n in notices if "frames left out" in n] == [
        f"recorded {tmp_path / 'rec' / 'dave-video.mp4'} with 39 of its 50 frames left out "
        "(the encoder fell behind)"
    ]
    assert _frames_in(tmp_path / "rec" / "dave-video.mp4") == 11
    assert _recording_threads() == []


async def test_a_track_without_frames_starts_no_thread(tmp_path: Path) -> None:
    track = _Frames("video", 0)
    assert await asyncio.wait_for(record_track(track, lambda: tmp_path / "x.mp4"), WAIT) is None
    assert _recording_threads() == [] and not (tmp_path / "x.mp4").exists()


_HUNG_DISK_RECORDER = """
import asyncio, sys
from pathlib import Path
from conclave import media
from tests.conclave.test_first_user_run import _Frames

media.FINISH_WAIT = 0.5

class Endless(_Frames):
    async def recv(self):
        if self.n >= self.count:
            await asyncio.Event().wait()  # a peer still in the call
        return await super().recv()

async def main():
    recording = asyncio.ensure_future(
        media.record_track(Endless("video", 5), lambda: Path(sys.argv[1]), print)
    )
    await asyncio.sleep(0.5)
    recording.cancel()  # the call ends
    try:
        await recording
    except asyncio.CancelledError:
        print("cancelled")

asyncio.run(main())
"""


def test_a_file_whose_open_hangs_is_given_up_and_the_process_exits(tmp_path: Path) -> None:
    # Before: FFmpeg opened (and wrote the header and trailer of) the file holding the GIL:
    # a file whose open hangs (a FIFO without a reader here; a stalled NFS mount) stopped
    # the event loop too: FINISH_WAIT never came, and the process hung (Ctrl-C included).
    path = tmp_path / "dave-video.mp4"
    os.mkfifo(path)
    done = subprocess.run(
        [sys.executable, "-c", _HUNG_DISK_RECORDER, str(path)],
        cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=WAIT,
    )
    assert (done.returncode, done.stderr) == (0, "")  # the daemon thread, still blocked
    assert done.stdout.splitlines() == [
        f"stopped recording into {path}: the file was not finished within 0.5 s",
        "cancelled",
    ]


async def test_a_recording_whose_file_cannot_be_made_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: the OSError of `_recording_path` ended the task unseen by the user (a note,
    # shown with --debug only), as if the track were recorded.
    p = _recorder(tmp_path, monkeypatch)
    (tmp_path / "rec").write_bytes(b"")  # not a directory: --record cannot make its files
    notices: list[str] = []
    p.on_notice = notices.append
    try:
        p._on_track(_Frames("video", 3), SimpleNamespace(receiver=None),
                    {"identity": "dave", "kind": "video"})
        await until(lambda: len(notices) > 0)
    finally:
        await p.close()
    assert notices == [f"cannot record a video track into {tmp_path / 'rec'}: File exists"]
    assert _recording_threads() == []


async def test_small_frames_are_queued_at_what_they_take_in_memory(
    tmp_path: Path, held: _Held, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a frame counted as its planes' bytes alone: a 16x16 frame as 384 bytes, which
    # takes over 2 KB queued (its AVFrame, buffers and objects): small frames (audio, a tiny
    # video) took several times QUEUE_BYTES.
    class _Tiny(_AfterTheFirst):
        async def recv(self) -> AudioFrame | VideoFrame:
            frame = await super().recv()
            tiny = VideoFrame(16, 16, "yuv420p")
            tiny.pts, tiny.time_base = frame.pts, frame.time_base
            return tiny

    monkeypatch.setattr(media, "QUEUE_BYTES", 64 << 10)
    track = _Tiny("video", 200, held)
    recording = asyncio.ensure_future(record_track(track, lambda: tmp_path / "dave-video.mp4"))
    await until(lambda: track.readyState == "ended")  # read to its end, the encoder held
    held.go.set()
    with pytest.raises(RecordingIncomplete) as told:
        await asyncio.wait_for(recording, WAIT)
    kept = told.value.frames - told.value.dropped
    assert 1 < kept <= 1 + (64 << 10) // 2048  # (the first, being encoded, and the queue's)
