"""A recorded audio track keeps its sounds in time across frames that never came (lost on the
network, or that failed to decrypt or decode): PCM in a WAV has no timestamps, so a hole in the
frames' timestamps is filled with silence as long, within bounds (`media.SILENCE_MOST` a hole,
and never past the time the track has been received plus `media.SILENCE_SLACK`). A video's
MP4 keeps its frames' timestamps (holes included), and timestamps that go back or that are
closer than 1/30 s do not end it."""

from __future__ import annotations

import fractions
import sys
import wave
from array import array
from pathlib import Path

import av
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from conclave import media
from conclave.media import record_track

RATE = 48000
SAMPLES = 960  # 20 ms, as aiortc's Opus decoder gives them
LOUD = 1000  # every sample of a received frame: silence (0) is told apart


class _Audio(MediaStreamTrack):
    """A received audio track: stereo s16 frames at the given pts (in samples), each arriving
    at the given time (seconds, on the recording's clock: `media._clock`)."""

    kind = "audio"

    def __init__(self, frames: list[tuple[int, float]], clock: list[float]) -> None:
        super().__init__()
        self.frames = list(frames)
        self.clock = clock

    async def recv(self) -> AudioFrame:
        if not self.frames:
            self.stop()
            raise MediaStreamError
        pts, came = self.frames.pop(0)
        frame = AudioFrame(format="s16", layout="stereo", samples=SAMPLES)
        frame.planes[0].update(array("h", [LOUD] * (2 * SAMPLES)).tobytes())
        frame.sample_rate = RATE
        frame.pts, frame.time_base = pts, fractions.Fraction(1, RATE)
        self.clock[0] = came
        return frame


async def _record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frames: list[tuple[int, float]]
) -> array:
    """The recording of `frames`: its samples, one per sample time (the left channel)."""
    clock = [0.0]
    monkeypatch.setattr(media, "_clock", lambda: clock[0])
    path = await record_track(_Audio(frames, clock), lambda: tmp_path / "bob-audio.wav")
    assert path is not None
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        pcm = array("h", wav.readframes(wav.getnframes()))
    if sys.byteorder == "big":  # (WAV is little-endian)
        pcm.byteswap()
    return pcm[::2]


def _in_time(*pts: int) -> list[tuple[int, float]]:
    """Frames at `pts`, each arriving when it was due."""
    return [(p, p / RATE) for p in pts]


async def test_a_hole_is_filled_with_silence_as_long_where_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: 4 frames' samples, the last two right after the first two (40 ms early).
    got = await _record(tmp_path, monkeypatch, _in_time(0, 960, 3840, 4800))  # 1920, 2880 lost
    assert len(got) == 6 * SAMPLES
    assert set(got[: 2 * SAMPLES]) == {LOUD}
    assert set(got[2 * SAMPLES : 4 * SAMPLES]) == {0}
    assert set(got[4 * SAMPLES :]) == {LOUD}


async def test_frames_without_a_hole_get_no_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Late frames (a burst after a stall) are not a hole: their timestamps follow on.
    frames = [(0, 0.0), (960, 0.5), (1920, 0.5), (2880, 0.5)]
    got = await _record(tmp_path, monkeypatch, frames)
    assert len(got) == 4 * SAMPLES and set(got) == {LOUD}


async def test_a_jump_backwards_starts_afresh_with_no_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a sender's timestamps started again: no hole to measure, none made up). Before: FFmpeg
    # refused the frame ("Invalid argument"), which ended the recording.
    frames = [(0, 0.0), (960, 0.02), (0, 0.04), (960, 0.06), (3840, 0.08)]
    got = await _record(tmp_path, monkeypatch, frames)
    # The last frame follows the frame at 960 of the fresh start: a hole of two frames.
    assert len(got) == 7 * SAMPLES
    assert set(got[4 * SAMPLES : 6 * SAMPLES]) == {0}
    assert set(got[: 4 * SAMPLES]) == set(got[6 * SAMPLES :]) == {LOUD}


async def test_a_jump_of_hours_gets_at_most_silence_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: 3 frames with no silence (the frame after the jump 3 hours early). Without the
    # bound: 3 hours of silence, 2 GB.
    hours = 3 * 3600 * RATE
    frames = [(0, 0.0), (960, 0.02), (hours, 60.0)]  # (a minute later, on the wall)
    got = await _record(tmp_path, monkeypatch, frames)
    most = int(media.SILENCE_MOST * RATE)
    assert len(got) == 3 * SAMPLES + most
    assert set(got[2 * SAMPLES : 2 * SAMPLES + most]) == {0}
    assert set(got[-SAMPLES:]) == {LOUD}


async def test_silence_never_takes_the_file_past_the_time_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timestamps (the SFU's, which is not trusted) that jump 5 s at every frame, the frames
    # coming every 20 ms: silence up to SILENCE_SLACK ahead of the wall, then none.
    frames = [(i * 5 * RATE, i * 0.02) for i in range(50)]
    got = await _record(tmp_path, monkeypatch, frames)
    slack = int(media.SILENCE_SLACK * RATE)
    assert len(got) == 50 * SAMPLES + slack
    assert set(got[SAMPLES : SAMPLES + slack]) == {0}
    assert set(got[SAMPLES + slack :]) == {LOUD}


class _Video(MediaStreamTrack):
    """A received video track: small frames at the given pts (90 kHz)."""

    kind = "video"

    def __init__(self, pts: list[int]) -> None:
        super().__init__()
        self.pts = list(pts)

    async def recv(self) -> VideoFrame:
        if not self.pts:
            self.stop()
            raise MediaStreamError
        frame = VideoFrame(64, 48, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.pts, frame.time_base = self.pts.pop(0), fractions.Fraction(1, 90000)
        return frame


async def _video_times(tmp_path: Path, pts: list[int]) -> list[float]:
    path = await record_track(_Video(pts), lambda: tmp_path / "bob-video.mp4")
    assert path is not None
    with av.open(str(path)) as container:
        times = [f.time for f in container.decode(container.streams.video[0])]
    assert all(t is not None for t in times)
    return [t - times[0] for t in times]  # (from the first frame)


async def test_a_video_keeps_its_hole(tmp_path: Path) -> None:
    times = await _video_times(tmp_path, [0, 6000, 12000, 3 * 90000, 3 * 90000 + 6000])
    assert times == pytest.approx([0, 1 / 15, 2 / 15, 3.0, 3 + 1 / 15])


async def test_a_video_at_60_fps_is_recorded_whole(tmp_path: Path) -> None:
    # Before: "Invalid argument" at the second frame (both 1/60 s frames at 1/30 s: one
    # timestamp), and the recording ended there.
    times = await _video_times(tmp_path, [i * 1500 for i in range(20)])
    assert times == pytest.approx([i / 60 for i in range(20)])


async def test_a_video_whose_timestamps_go_back_is_recorded_whole(tmp_path: Path) -> None:
    # Before: "Invalid argument" at the frame that went back: the recording ended there.
    times = await _video_times(tmp_path, [0, 6000, 12000, 6000, 12000, 12000])
    assert len(times) == 6
    assert times == sorted(set(times))  # in order, none at the time of another
    assert times[4] - times[3] == pytest.approx(1 / 15)  # (going on from the new start)


async def test_a_video_whose_timestamps_wrap_ahead_is_recorded_whole(tmp_path: Path) -> None:
    # aiortc takes an RTP timestamp one tick lower than the last for a wrap: 2**32 ticks on.
    # Before: the MP4 muxer refused that gap, and the recording ended there.
    jump = 2**32 - 1
    pts = [0, 6000, 12000, 12000 + jump, 18000 + jump]
    times = await _video_times(tmp_path, pts)
    assert times == pytest.approx([0, 1 / 15, 2 / 15, 2 / 15 + media.SILENCE_MOST,
                                   3 / 15 + media.SILENCE_MOST])
