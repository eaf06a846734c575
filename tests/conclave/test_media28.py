"""A first-time user's run: a --video clip shorter than the call, and recordings of members
whose names differ only by case."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from fractions import Fraction
from functools import partial
from pathlib import Path

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from conclave.media import MediaSpec, PatternTrack, record_track, recording_path

FPS = 20


def write_clip(path: Path, frames: int = 4, audio: bool = False, format: str | None = None) -> None:
    """A clip of `frames` frames (a fifth of a second), with a silent audio stream as long."""
    container = av.open(str(path), "w", format=format)
    video = container.add_stream("mpeg4", rate=FPS)
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    sound = container.add_stream("aac", rate=48000) if audio else None
    for i in range(frames):
        frame = av.VideoFrame(64, 48, "yuv420p")
        frame.pts = i
        for packet in video.encode(frame):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if sound is not None:
        samples = 0
        while samples < frames * 48000 // FPS:
            chunk = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype="float32"), format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts = 48000, samples
            samples += 1024
            for packet in sound.encode(chunk):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    container.close()


async def _frames(track: MediaStreamTrack, most: int) -> list[av.frame.Frame]:
    """Up to `most` frames of `track`, fewer if it ends."""
    got = []
    try:
        while len(got) < most:
            got.append(await track.recv())
    except MediaStreamError:
        pass
    return got


# -- 1. a --video clip shorter than the call


async def test_a_clip_shorter_than_the_call_plays_again_with_timestamps_going_on(
    tmp_path: Path,
) -> None:
    # Before: the clip's frames, then the track ended (199 audio / 99 video frames in the
    # user's run, then nothing): the others saw a frozen picture for the rest of the call.
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    told: list[str] = []
    tracks, source = MediaSpec(file=str(clip)).tracks(on_end=told.append)
    try:
        audio, video = tracks
        assert (audio.kind, video.kind) == ("audio", "video")
        # Three times round the clip, and more.
        frames = await _frames(video, 14)
        sounds = await _frames(audio, 40)  # 20 ms each, 10 a round
        assert len(frames) == 14 and len(sounds) == 40
        for got in (frames, sounds):
            pts = [f.pts for f in got]
            assert pts == sorted(set(pts)), pts  # on from one round to the next, never back
        assert told == []
    finally:
        for t in tracks:
            t.stop()


async def test_a_clip_is_played_once_when_asked_and_the_user_told_in_one_line(
    tmp_path: Path,
) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    told: list[str] = []
    tracks, _ = MediaSpec(file=str(clip), loop=False).tracks(on_end=told.append)
    # Read together, as the call's senders do: one round exactly (a fifth of a second), no
    # more, none missing.
    played = await asyncio.gather(*(_frames(t, 100) for t in tracks))
    assert {t.kind: len(got) for t, got in zip(tracks, played, strict=True)} == {
        "video": 4, "audio": 10
    }
    for t in tracks:
        assert t.readyState == "ended"  # (a new media session opens the file again)
    assert told == [f"the file {str(clip)!r} ended: nothing more is sent from it (the others "
                    "see its last picture)"]


async def test_a_source_that_is_no_regular_file_is_not_played_again(tmp_path: Path) -> None:
    # A device or a stream (a FIFO here) cannot be played again from its start.
    clip = tmp_path / "clip.ts"
    write_clip(clip, frames=4, format="mpegts")
    fifo = tmp_path / "live"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as out:
            out.write(clip.read_bytes())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    told: list[str] = []
    tracks, _ = await asyncio.to_thread(
        MediaSpec(file=str(fifo), format="mpegts").tracks, told.append
    )
    (video,) = tracks
    assert 0 < len(await _frames(video, 100)) <= 4
    assert len(told) == 1 and "source" in told[0] and "nothing more is sent" in told[0]
    feeder.join(5)
    assert not feeder.is_alive()  # the whole stream was read: the writer is not left blocked


# -- 2. recordings of "Bob" and "bob"


def test_names_differing_only_by_case_make_files_that_differ_whatever_the_case(
    tmp_path: Path,
) -> None:
    # Before: Bob-video.mp4 and bob-video.mp4, one file on a case-insensitive file system.
    first = recording_path(tmp_path, "Bob", "video")
    second = recording_path(tmp_path, "bob", "video")
    assert first.name == "Bob-video.mp4"  # the common case stays readable
    assert second.name.startswith("bob~") and second.name.endswith("-video.mp4")
    assert first.name.casefold() != second.name.casefold()
    # Each member keeps its own name across media sessions and runs.
    assert recording_path(tmp_path, "Bob", "video").name == "Bob-video-2.mp4"
    again = recording_path(tmp_path, "bob", "video")
    assert again.name == second.name.replace("-video.mp4", "-video-2.mp4")
    assert recording_path(tmp_path, "bob", "audio").name == second.name.replace(
        "-video.mp4", "-audio.wav"
    )
    names = [p.name.casefold() for p in tmp_path.iterdir()]
    assert len(names) == len(set(names)) == 5


def test_a_recording_of_an_earlier_run_is_not_taken_case_insensitively(tmp_path: Path) -> None:
    (tmp_path / "BOB-video.mp4").write_bytes(b"earlier")
    path = recording_path(tmp_path, "bob", "video")
    assert path.name.casefold() != "bob-video.mp4"
    assert (tmp_path / "BOB-video.mp4").read_bytes() == b"earlier"


class _Few(PatternTrack):
    """A pattern of a few frames, then the end (its publisher left)."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.left = frames

    async def recv(self) -> av.VideoFrame:
        if self.left == 0:
            self.stop()
            raise MediaStreamError
        self.left -= 1
        return await super().recv()


async def test_two_members_named_alike_are_recorded_into_two_files(tmp_path: Path) -> None:
    record = tmp_path / "received"
    paths = await asyncio.gather(*(
        record_track(_Few(5), partial(recording_path, record, name, "video"))
        for name in ("Bob", "bob")
    ))
    assert all(p is not None for p in paths)
    assert len({p.name.casefold() for p in paths if p is not None}) == 2
    assert sorted(p.name for p in record.iterdir()) == sorted(
        p.name for p in paths if p is not None
    )
    for path in paths:
        with av.open(str(path)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 5


async def test_a_clip_of_one_frame_is_sent_at_a_picture_rate_not_as_fast_as_it_opens(
    tmp_path: Path,
) -> None:
    # Each round is one frame: its timestamps go on by a frame's time at least (1/15 s), so
    # the frames are paced rather than sent as fast as the file opens again.
    clip = tmp_path / "picture.mp4"
    write_clip(clip, frames=1)
    tracks, _ = MediaSpec(file=str(clip)).tracks()
    (video,) = tracks
    try:
        frames = await _frames(video, 4)
        assert len(frames) == 4
        times = [f.pts * f.time_base for f in frames]
        assert all(b - a >= Fraction(1, 15) for a, b in itertools.pairwise(times)), times
    finally:
        video.stop()
