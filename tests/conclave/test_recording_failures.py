"""A recording that fails (its file cannot be opened, the disk fills up mid-call) or is cut short
ends there: its error is told, what it wrote stays, and it lets go of its share of the track. A
relay subscription no one reads any more would keep every decoded frame of the track for the
rest of the call (MediaRelay buffers without bound), and a recording waiting for a track end
that its dead recorder never reads would hold its file open until the run ends."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from conclave.errors import ConclaveError
from conclave.media import record_track

from .conftest import WAIT, until
from .test_first_user_run import _Frames, _frames_in, _recorder

FULL_DISK = Path("/dev/full")  # every write fails with ENOSPC


async def _drain(track: MediaStreamTrack) -> int:
    """Read `track` to its end: the frames read."""
    n = 0
    with pytest.raises(MediaStreamError):
        while True:
            await track.recv()
            n += 1
    return n


@pytest.mark.skipif(not FULL_DISK.exists(), reason="no /dev/full")
@pytest.mark.parametrize("kind", ["video", "audio"])
async def test_a_recording_whose_disk_fills_up_ends_with_the_reason_and_lets_go(
    tmp_path: Path, kind: str
) -> None:
    source = _Frames(kind, 120)  # enough for the encoder to hand packets to the full disk
    relay = MediaRelay()
    recorded, played = relay.subscribe(source), relay.subscribe(source)
    path = tmp_path / ("dave-video.mp4" if kind == "video" else "dave-audio.wav")
    path.symlink_to(FULL_DISK)
    playing = asyncio.ensure_future(_drain(played))  # (subscribed from the start)
    recording = asyncio.ensure_future(record_track(recorded, lambda: path))
    assert await asyncio.wait_for(playing, WAIT) == 120  # the call's own consumer reads on, to the end
    # Before: the recorder's task died of the write error, unseen; the recording waited for
    # ever for a track end no one read, and the relay kept queueing frames for it.
    with pytest.raises(ConclaveError, match="No space left on device"):
        await asyncio.wait_for(recording, WAIT)
    assert recorded.readyState == "ended"


async def test_a_recording_whose_file_cannot_be_opened_lets_go_of_the_track(
    tmp_path: Path,
) -> None:
    source = _Frames("video", 30)
    relay = MediaRelay()
    recorded, played = relay.subscribe(source), relay.subscribe(source)
    gone = tmp_path / "gone" / "dave-video.mp4"  # its directory was removed meanwhile
    playing = asyncio.ensure_future(_drain(played))  # (subscribed from the start)
    with pytest.raises(ConclaveError, match="dave-video.mp4"):
        await asyncio.wait_for(record_track(recorded, lambda: gone), WAIT)
    # Before: still subscribed, unread: every frame the call received was queued for it.
    assert recorded.readyState == "ended"
    assert await asyncio.wait_for(playing, WAIT) == 30


async def test_a_recording_cancelled_before_its_first_frame_lets_go_and_makes_no_file(
    tmp_path: Path,
) -> None:
    class _Silent(_Frames):
        async def recv(self):  # type: ignore[no-untyped-def]
            await asyncio.Event().wait()  # a publisher that sends nothing yet

    relay = MediaRelay()
    recorded = relay.subscribe(_Silent("video", 0))
    made: list[Path] = []
    recording = asyncio.ensure_future(
        record_track(recorded, lambda: made.append(tmp_path / "x.mp4") or made[-1])
    )
    await asyncio.sleep(0)
    recording.cancel()
    with pytest.raises(asyncio.CancelledError):
        await recording
    assert recorded.readyState == "ended" and made == []


@pytest.mark.skipif(not FULL_DISK.exists(), reason="no /dev/full")
async def test_a_participant_told_of_a_failed_recording_goes_on_receiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _recorder(tmp_path, monkeypatch)
    notices: list[str] = []
    p.on_notice = notices.append  # a line of the call (`join` prints it), not a --debug note
    full = tmp_path / "dave-video.mp4"
    full.symlink_to(FULL_DISK)
    monkeypatch.setattr(p, "_recording_path", lambda publisher, kind: full)
    try:
        p._on_track(_Frames("video", 120), SimpleNamespace(receiver=None),
                    {"identity": "dave", "kind": "video"})
        await until(lambda: p.remote[("dave", "video")].decoded == 120)
        await until(lambda: any("No space left on device" in n for n in notices))
    finally:
        await p.close()


async def test_a_finished_recording_plays_and_its_track_is_let_go(tmp_path: Path) -> None:
    source = _Frames("video", 20)
    relay = MediaRelay()
    recorded = relay.subscribe(source)
    path = tmp_path / "dave-video.mp4"
    assert await asyncio.wait_for(record_track(recorded, lambda: path), WAIT) == path
    assert _frames_in(path) == 20 and recorded.readyState == "ended"
