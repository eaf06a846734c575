"""Media sources: synthetic tracks, or a file through aiortc's MediaPlayer."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from conclave.errors import ConclaveError
from conclave.media import MediaSpec
from conclave.participant import Participant


def write_clip(path: Path, frames: int = 5) -> None:
    """A tiny silent MPEG-4 video, made here so that the test needs no media fixture."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for i in range(frames):
        frame = av.VideoFrame(64, 48, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([i * 20]) * plane.buffer_size)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


async def test_a_file_is_published_through_media_player(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    write_clip(clip)
    tracks, player = MediaSpec(file=str(clip)).tracks()
    try:
        assert player is not None
        assert [t.kind for t in tracks] == ["video"]  # the clip has no audio stream
        frame = await tracks[0].recv()
        assert (frame.width, frame.height) == (64, 48)
    finally:
        for t in tracks:
            t.stop()


async def test_synthetic_tracks_by_default() -> None:
    tracks, player = MediaSpec(audio=True, video=True).tracks()
    assert player is None and [t.kind for t in tracks] == ["audio", "video"]
    audio = await tracks[0].recv()
    assert audio.sample_rate == 48000 and audio.samples == 960  # 20 ms
    for t in tracks:
        t.stop()


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConclaveError, match="cannot play"):
        MediaSpec(file=str(tmp_path / "none.mp4")).tracks()


def test_a_participant_opens_its_media_once() -> None:
    p = Participant("ann", "http://127.0.0.1:9")
    first = p.open_media()
    assert p.open_media() is first
    for t in first:
        t.stop()


@pytest.mark.parametrize("kwargs", [{"rotation_period": 0}, {"rotation_period": -5.0}])
def test_a_rotation_period_must_be_positive(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConclaveError, match="rotation period"):
        Participant("ann", "http://127.0.0.1:9", **kwargs)


@pytest.mark.parametrize("name", ["", "x" * 256])
def test_a_name_must_fit_an_identity(name: str) -> None:
    with pytest.raises(ConclaveError, match="participant name"):
        Participant(name, "http://127.0.0.1:9")


def test_h264_frames_pass_the_plain_benchmark_transform() -> None:
    # The benchmark's "plain" mode runs the same frame pipeline with keys that do not encrypt:
    # the NAL-unit binding must not need an SFrame header there.
    from conclave import participant as participant_module
    from e2ee_media.codecs import H264
    from e2ee_media.transform import FrameDecryptor, FrameEncryptor

    keys = participant_module._IdentityKeys()
    nals = [b"\x67\x4d\x00\x1f\x95\xa8", b"\x68\xee\x3c\x80", b"\x65" + bytes(range(100))]
    sealed = FrameEncryptor(keys, H264).encrypt_nal_units(nals)
    annex_b = b"".join(b"\x00\x00\x00\x01" + nal for nal in sealed)
    assert FrameDecryptor(keys).decrypt_frame(annex_b, H264) == b"".join(
        b"\x00\x00\x00\x01" + nal for nal in nals
    )
