"""`conclave join --video FILE --no-loop`: a clip presented once, its tracks ended at its end
(the participant stays in the call, as muted), and the combinations where it means nothing
refused in one line."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import pytest

from conclave import participant as participant_module
from conclave.cli import check_no_loop, main, parse_args
from conclave.errors import ConclaveError
from conclave.media import MediaSpec

from .test_media28 import _frames, write_clip

JOIN = ["join", "--room", "r", "--name", "n", "--no-commands"]
# The frames of one round of `write_clip(frames=4, audio=True)`: a fifth of a second.
ONE_ROUND = {"video": 4, "audio": 10}


def _join_args(*extra: str) -> argparse.Namespace:
    return parse_args([*JOIN, *extra])


# -- the command line


def test_no_loop_is_taken_with_a_regular_file(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    args = _join_args("--video", str(clip), "--no-loop")
    assert args.no_loop is True
    check_no_loop(args)  # (no error)
    assert _join_args("--video", str(clip)).no_loop is False  # looped by default


def test_no_loop_without_video_is_refused() -> None:
    with pytest.raises(ConclaveError, match=r"^--no-loop only works with --video FILE"):
        check_no_loop(_join_args("--no-loop"))


@pytest.mark.parametrize("how", ["fifo", "url", "device format", "directory"])
def test_no_loop_with_a_device_or_stream_is_refused(tmp_path: Path, how: str) -> None:
    extra: list[str] = []
    if how == "fifo":  # as a device: played as it comes
        video = str(tmp_path / "live")
        os.mkfifo(video)
    elif how == "url":
        video = "rtsp://camera.example/live"
    elif how == "device format":  # (avfoundation's "0:0" is no path)
        video, extra = "0:0", ["--video-format", "avfoundation"]
    else:
        video = str(tmp_path)
    with pytest.raises(ConclaveError, match="only works with a regular file") as caught:
        check_no_loop(_join_args("--video", video, *extra, "--no-loop"))
    assert repr(video) in str(caught.value) and "leave out --no-loop" in str(caught.value)


def test_no_loop_with_a_url_shows_no_password() -> None:
    with pytest.raises(ConclaveError) as caught:
        check_no_loop(_join_args("--video", "rtsp://me:hunter2@camera.example/live", "--no-loop"))
    assert "hunter2" not in str(caught.value) and "me:***@camera.example" in str(caught.value)


def test_a_missing_file_is_left_to_the_open(tmp_path: Path) -> None:
    # Its message ("cannot play ...: no such file") says what is wrong; --no-loop is not.
    check_no_loop(_join_args("--video", str(tmp_path / "nope.mp4"), "--no-loop"))


def test_join_refuses_no_loop_without_video_in_one_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    # (the port of nothing: the refusal comes before anyone is contacted)
    status = main([*JOIN, "--ds", "http://127.0.0.1:9", "--state", str(state), "--no-loop"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("conclave join: --no-loop only works with --video FILE")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not state.exists()  # nothing made for a refused command line


@pytest.mark.parametrize("no_loop", [True, False])
def test_join_hands_the_choice_to_its_media(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_loop: bool
) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    given: list[MediaSpec] = []

    def participant(*args: object, media: MediaSpec, **kwargs: object) -> None:
        given.append(media)
        raise ConclaveError("stopped here")  # (before anyone is contacted)

    monkeypatch.setattr(participant_module, "Participant", participant)
    argv = [*JOIN, "--ds", "http://127.0.0.1:9", "--state", str(tmp_path / "state"),
            "--video", str(clip)]
    assert main(argv + ["--no-loop"] if no_loop else argv) == 2
    (media,) = given
    assert media.file == str(clip) and media.loop is not no_loop


# -- the media


async def test_a_clip_played_once_ends_its_tracks_and_says_so_once(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    told: list[str] = []
    tracks, _ = MediaSpec(file=str(clip), loop=False).tracks(on_end=told.append)
    assert sorted(t.kind for t in tracks) == ["audio", "video"]
    # Read together, as the call's senders do.
    played = await asyncio.gather(*(_frames(t, 100) for t in tracks))
    # One round exactly: 4 video frames, 10 audio ones (20 ms each), no more, none missing.
    assert {t.kind: len(got) for t, got in zip(tracks, played, strict=True)} == ONE_ROUND
    assert all(t.readyState == "ended" for t in tracks)
    assert len(told) == 1
    assert told[0].startswith(f"the file {str(clip)!r} ended: nothing more is sent from it")


async def test_a_looped_clip_still_plays_again(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4)
    told: list[str] = []
    tracks, _ = MediaSpec(file=str(clip)).tracks(on_end=told.append)
    (video,) = tracks
    try:
        assert len(await _frames(video, 10)) == 10  # past two rounds of 4
        assert video.readyState == "live" and told == []
    finally:
        video.stop()


async def test_a_clip_played_once_is_not_replayed_by_a_new_media_session(tmp_path: Path) -> None:
    # A new media session (the SFU restarted, a renewal) asks for new tracks
    # (`Participant.open_media`): opening the file again would present the clip a second
    # time, where the user asked for once.
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4, audio=True)
    told: list[str] = []
    spec = MediaSpec(file=str(clip), loop=False)
    first, _ = spec.tracks(on_end=told.append)
    await asyncio.gather(*(_frames(t, 100) for t in first))
    again, _ = spec.tracks(on_end=told.append)
    # The same kinds (what the others expect of this publisher), with nothing in them.
    assert sorted(t.kind for t in again) == ["audio", "video"]
    for t in again:
        assert await _frames(t, 100) == []
        assert t.readyState == "ended"
    assert len(told) == 1  # told once, at the clip's end


async def test_a_clip_cut_short_by_a_new_media_session_plays_in_the_next(tmp_path: Path) -> None:
    # Stopped before its end (the session ended): not spent, the next session plays it.
    clip = tmp_path / "clip.mp4"
    write_clip(clip, frames=4)
    spec = MediaSpec(file=str(clip), loop=False)
    (video,), _ = spec.tracks()
    assert len(await _frames(video, 1)) == 1
    video.stop()
    (again,), _ = spec.tracks()
    try:
        # The whole clip from its start, not the rest of it from where the last one stopped.
        played = await _frames(again, 100)
        assert len(played) == ONE_ROUND["video"]
        assert played[0].pts == 0
    finally:
        again.stop()
