"""Media sources for participants: synthetic test tracks, or a file/device through MediaPlayer."""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame
from av.container import OutputContainer
from av.frame import Frame
from av.stream import Stream

from .errors import ConclaveError

AUDIO_RATE = 48000
AUDIO_PTIME = 0.02
VIDEO_CLOCK = 90000


class _Paced(MediaStreamTrack):
    """Emits frames at a fixed rate from the first `recv()`, with pts from a monotonic clock."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.interval = interval
        self._start: float | None = None
        self._count = 0

    async def _tick(self) -> int:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._count * self.interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        n = self._count
        self._count += 1
        return n


class ToneTrack(_Paced):
    """A sine tone in 20 ms mono frames, 48 kHz, a different pitch per participant."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0) -> None:
        super().__init__(AUDIO_PTIME)
        self.frequency = frequency
        samples = int(AUDIO_RATE * AUDIO_PTIME)
        # One period-aligned buffer reused for every frame: content matters little, CPU does.
        self._pcm = array(
            "h",
            (int(6000 * math.sin(2 * math.pi * frequency * i / AUDIO_RATE)) for i in range(samples)),
        ).tobytes()
        self._samples = samples

    async def recv(self) -> AudioFrame:
        n = await self._tick()
        frame = AudioFrame(format="s16", layout="mono", samples=self._samples)
        frame.planes[0].update(self._pcm)
        frame.sample_rate = AUDIO_RATE
        frame.pts = n * self._samples
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        return frame


class PatternTrack(_Paced):
    """A small moving gradient, so that VP8 has something to encode."""

    kind = "video"
    BASE = bytes(range(256)) * 400

    def __init__(self, width: int = 160, height: int = 120, fps: float = 15.0, seed: int = 0):
        super().__init__(1.0 / fps)
        self.width, self.height, self.fps = width, height, fps
        self.seed = seed

    async def recv(self) -> VideoFrame:
        n = await self._tick()
        frame = VideoFrame(self.width, self.height, "yuv420p")
        shift = (n * 3 + self.seed * 37) % 256
        for plane in frame.planes:
            plane.update(self.BASE[shift : shift + plane.buffer_size])
        frame.pts = int(n * VIDEO_CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return frame


@dataclass
class MediaSpec:
    """What a participant publishes: synthetic audio/video, or a file (or device) to play."""

    audio: bool = True
    video: bool = True
    file: str | None = None
    format: str | None = None  # MediaPlayer input format, for devices (v4l2, avfoundation...)
    width: int = 160
    height: int = 120
    fps: float = 15.0
    seed: int = 0

    def tracks(self) -> tuple[list[MediaStreamTrack], object | None]:
        """The tracks and, for a file, the MediaPlayer that must stay referenced."""
        if self.file is None:
            tracks: list[MediaStreamTrack] = []
            if self.audio:
                tracks.append(ToneTrack(330.0 + 55.0 * self.seed))
            if self.video:
                tracks.append(PatternTrack(self.width, self.height, self.fps, self.seed))
            return tracks, None
        from aiortc.contrib.media import MediaPlayer

        try:
            player = MediaPlayer(self.file, format=self.format)
        except Exception as exc:  # av raises many types for missing files and bad formats
            raise ConclaveError(f"cannot play {self.file!r}: {exc}") from None
        tracks = [t for t in (player.audio if self.audio else None,
                              player.video if self.video else None) if t is not None]
        if not tracks:
            raise ConclaveError(f"{self.file!r} has no audio or video stream to publish")
        return tracks, player


# MP4 in fragments (one per keyframe), the index first, each written out at once: what was
# recorded up to the last keyframe before a crash or SIGKILL plays, where a plain MP4 is
# unplayable without the index written at its end. WAV packets are written out at once too:
# a full disk is then told when it happens, not at the end of the call.
_MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov", "flush_packets": "1"}
_WAV_OPTIONS = {"flush_packets": "1"}


def _open_recording(path: Path, kind: str) -> tuple[OutputContainer, Stream]:
    """The container and stream of a recording into `path`, with the codecs aiortc's
    MediaRecorder would choose (PCM in a WAV, else AAC; H.264 for video)."""
    options = _MP4_OPTIONS if path.suffix == ".mp4" else _WAV_OPTIONS
    container = av.open(str(path), mode="w", options=options)
    try:
        if kind == "audio":
            codec = "pcm_s16le" if container.format.name == "wav" else "aac"
            return container, container.add_stream(codec)
        stream = container.add_stream("libx264", rate=30)
        stream.pix_fmt = "yuv420p"
        return container, stream
    except BaseException:
        container.close()
        raise


async def record_track(track: MediaStreamTrack, new_file: Callable[[], Path]) -> Path | None:
    """Record a received `track` into the file `new_file` makes at its first frame, and finish
    the file when the track ends (its publisher left, the media session ended) or this is
    cancelled (the call ends): a file per track, playable as soon as its track is over. A
    track that ends without a frame makes no file. Returns the file, if any.

    The recording owns `track` (a relay's subscription): it is stopped however the recording
    ends, for a subscription no one reads keeps every frame relayed to it. A file that cannot
    be written (a full disk, say) ends the recording with a `ConclaveError`; what was written
    stays. The frames are encoded here rather than by aiortc's MediaRecorder, whose task dies
    of such an error unseen (the recording then waits for ever for a track end no one reads)
    and then muxes again into the failed file, which crashes FFmpeg."""
    try:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return None
        path = new_file()
        try:
            container, stream = _open_recording(path, track.kind)
        except Exception as exc:
            path.unlink(missing_ok=True)  # empty: no use to anyone
            raise ConclaveError(f"cannot record into {path}: {_why(exc)}") from None
        await _write(track, frame, path, container, stream)
        return path
    finally:
        track.stop()


async def _write(
    track: MediaStreamTrack, frame: Frame, path: Path, container: OutputContainer, stream: Stream
) -> None:
    """Encode `frame` and the rest of `track` into `container`, then finish the file (also
    when cancelled: the encoder's last frames and the file's end). After a failed write FFmpeg
    is given nothing more but the close."""
    muxed = 0
    failure: Exception | None = None

    def put(frame: Frame | None) -> bool:  # None: what the encoder holds back
        nonlocal muxed, failure
        try:
            for packet in stream.encode(frame):
                container.mux(packet)
                muxed += 1
        except Exception as exc:
            failure = exc
            return False
        return True

    try:
        if isinstance(frame, VideoFrame):  # the file's size is its first frame's
            stream.width, stream.height = frame.width, frame.height
        while put(frame):
            try:
                frame = await track.recv()
            except MediaStreamError:
                break
    finally:
        if failure is None:
            put(None)
        try:
            container.close()
        except Exception as exc:
            failure = failure or exc
        if muxed == 0 and failure is not None:
            path.unlink(missing_ok=True)  # nothing in it
    if failure is not None:
        done = "stopped recording into" if muxed else "cannot record into"
        raise ConclaveError(f"{done} {path}: {_why(failure)}") from None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
