"""A clip played once (`--no-loop`) whose video sender starts reading after the audio one has
played the whole clip: the video is still sent, once, from its first frame. (The player shared
by both tracks closes once the audio, its only started track, ended: the video's frames were
never read from it.)"""

from __future__ import annotations

from pathlib import Path

from conclave.media import MediaSpec

from .test_media28 import _frames, write_clip
from .test_no_loop import ONE_ROUND


async def test_a_video_that_starts_after_the_audio_ended_is_still_sent(tmp_path: Path) -> None:
    # Before: the video track ended at its first frame asked, and the clip's video was never
    # sent at all.
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    told: list[str] = []
    spec = MediaSpec(file=str(clip), loop=False)
    tracks, _ = spec.tracks(on_end=told.append)
    audio, video = tracks
    assert (audio.kind, video.kind) == ("audio", "video")
    try:
        sounds = await _frames(audio, 100)  # the whole clip, before the video's first frame
        assert len(sounds) == ONE_ROUND["audio"] and audio.readyState == "ended"
        pictures = await _frames(video, 100)
        # The clip's frames, once, from its start (no more: it is not played again).
        assert len(pictures) == ONE_ROUND["video"]
        assert [p.pts for p in pictures] == sorted({p.pts for p in pictures})
        assert pictures[0].pts == 0
        assert video.readyState == "ended"
        assert len(told) == 1  # told once, at the audio's end, not again at the video's
    finally:
        video.stop()
    # Spent: a new media session sends nothing from it.
    again, _ = spec.tracks(on_end=told.append)
    for t in again:
        assert await _frames(t, 100) == []


async def test_a_video_started_after_the_audio_ended_does_not_wait_for_the_audio(
    tmp_path: Path,
) -> None:
    # The other order (the audio starts after the video ended) is played the same way.
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    audio, video = MediaSpec(file=str(clip), loop=False).tracks()[0]
    try:
        assert len(await _frames(video, 100)) == ONE_ROUND["video"]
        assert len(await _frames(audio, 100)) == ONE_ROUND["audio"]
    finally:
        audio.stop()
