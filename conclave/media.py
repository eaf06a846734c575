"""Media sources for participants: synthetic test tracks, or a file/device through MediaPlayer."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import hashlib
import math
import os
import queue
import re
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import av
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame
from av.container import OutputContainer
from av.frame import Frame
from av.stream import Stream

from .errors import ConclaveError

if TYPE_CHECKING:
    from aiortc.contrib.media import MediaPlayer

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
            (
                int(6000 * math.sin(2 * math.pi * frequency * i / AUDIO_RATE))
                for i in range(samples)
            ),
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
    # Play a file (a regular file: not a device, a FIFO or a stream URL) over and over until
    # the call ends: a clip shorter than the call would leave the others a frozen picture.
    loop: bool = True
    # The kinds of a file played once (`loop` off) that ended: a new media session sends
    # nothing from it, where opening it again would present the clip a second time.
    _spent: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def tracks(
        self, on_end: Callable[[str], None] | None = None
    ) -> tuple[list[MediaStreamTrack], object | None]:
        """The tracks and, for a file, what plays it (which must stay referenced). `on_end`
        is told once, in a line, that a source that is not looped ended: nothing more is
        sent from then on."""
        if self.file is None:
            tracks: list[MediaStreamTrack] = []
            if self.audio:
                tracks.append(ToneTrack(330.0 + 55.0 * self.seed))
            if self.video:
                tracks.append(PatternTrack(self.width, self.height, self.fps, self.seed))
            return tracks, None
        if self._spent is not None:
            return [_Spent(kind) for kind in self._spent], None
        regular = os.path.isfile(self.file)
        source = _FileSource(self.file, self.format, self.loop and regular, on_end)
        kinds = [
            kind
            for kind, wanted in (("audio", self.audio), ("video", self.video))
            if wanted and source.has(kind)
        ]
        if not kinds:
            raise ConclaveError(f"{self.file!r} has no audio or video stream to publish")
        if not self.loop and regular:  # (a device or a stream opens again: a camera is back)
            source.on_over = lambda: setattr(self, "_spent", kinds)
        return [_FileTrack(source, kind) for kind in kinds], source


def _open_player(file: str, format: str | None) -> MediaPlayer:
    from aiortc.contrib.media import MediaPlayer

    try:
        return MediaPlayer(file, format=format)
    except Exception as exc:  # av raises many types for missing files and bad formats
        raise ConclaveError(f"cannot play {file!r}: {_open_failure(exc)}") from None


class _FileSource:
    """A file or device played through aiortc's MediaPlayer; a looped file through a new
    MediaPlayer each time round (MediaPlayer's own `loop` ends at the file's end all the same
    with PyAV 18, and would restart the timestamps, which the receivers' decoders take for
    old frames). Each round is shared by the audio and video tracks: the first to reach the
    end of a round opens the next."""

    def __init__(
        self, file: str, format: str | None, looped: bool, on_end: Callable[[str], None] | None
    ) -> None:
        self.file, self.format, self.looped = file, format, looped
        self._on_end = on_end
        self._told = False
        self.player = _open_player(file, format)  # (what must stay referenced)
        self.round = 0
        self.over = False  # the end of a source that is not looped: nothing more to play
        self.on_over: Callable[[], None] | None = None  # told when `over` is set

    def has(self, kind: str) -> bool:
        return getattr(self.player, kind) is not None

    def track(self, kind: str, round_: int) -> MediaStreamTrack | None:
        """The `kind` track of round `round_` (the current one or the next), None if the file
        cannot be played again (gone, or without that stream now)."""
        if round_ > self.round:
            try:
                self.player = _open_player(self.file, self.format)
            except ConclaveError as exc:
                self.set_over()
                self.ended(f"{exc}: nothing more is sent from it")
                return None
            self.round = round_
        track: MediaStreamTrack | None = getattr(self.player, kind)
        return track

    def alone(self, kind: str) -> MediaStreamTrack | None:
        """The `kind` track of a new player of a file played once, for a track that had not
        started when the other one ended the file (a clip shorter than the time between the
        two senders' starts), None if there is none. The ended player is closed: MediaPlayer
        closes its file once its started tracks stopped, with this track's frames unread, and
        fails a track started afterwards. A file from its start gives the same frames; a device
        or a stream would not (and a looped file ended only when it could not be played)."""
        if self.looped or not os.path.isfile(self.file):
            return None
        try:
            player = _open_player(self.file, self.format)
        except ConclaveError:  # (gone meanwhile: told at the end already)
            return None
        track: MediaStreamTrack | None = getattr(player, kind)
        return track

    def set_over(self) -> None:
        self.over = True
        if self.on_over is not None:
            self.on_over()

    def ended(self, line: str) -> None:
        """Tell the user once (not once per track) that nothing more is sent."""
        if not self._told and self._on_end is not None:
            self._told = True
            self._on_end(line)


class _FileTrack(MediaStreamTrack):
    """A track of a `_FileSource`: its frames, round after round for a looped file, with
    timestamps that go on from one round to the next."""

    def __init__(self, source: _FileSource, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._source = source
        self._round = source.round
        self._inner: MediaStreamTrack | None = source.track(kind, self._round)
        self._offset = 0  # added to this round's pts (in the track's time base)
        self._next_pts = 0  # the pts that follows the last frame sent
        self._last_pts: int | None = None  # this round's last pts, before the offset
        self._frames = 0  # this round's
        self._t0: float | None = None  # the loop's time of pts 0
        self._alone = False  # playing a file played once on a player of its own (`alone`)

    async def recv(self) -> Frame:
        while True:
            if self._inner is None:  # (ended, as MediaPlayer's own do: a new media session
                self.stop()  # opens the file again, `Participant.open_media`)
            if self.readyState != "live":
                raise MediaStreamError
            if self._frames == 0 and self._source.over and not self._alone:
                # The other track's end closed the player before this one began: its frames
                # are played from the file again, once (none of it was sent).
                if self._inner is not None:
                    self._inner.stop()  # (not started: nothing to close)
                self._alone = True
                self._inner = self._source.alone(self.kind)
                continue
            if self._frames == 0 and self._round < self._source.round:
                # A round the other track finished before this one began: its player is
                # closed (MediaPlayer closes its file once its started tracks stopped).
                self._round = self._source.round
                self._inner = self._source.track(self.kind, self._round)
                continue
            assert self._inner is not None
            try:
                frame = await self._inner.recv()
            except MediaStreamError:
                if self.readyState != "live":
                    raise
                self._next_round()
                continue
            pts = frame.pts or 0
            base = frame.time_base or fractions.Fraction(1, VIDEO_CLOCK)
            if isinstance(frame, AudioFrame):
                step = max(frame.samples, 1)
            else:  # (a frame lasts until the next: as the last one did)
                step = pts - self._last_pts if self._last_pts is not None else 0
                # At least 1/15 s: a clip of one frame (a picture) is not sent at the speed
                # it can be opened again.
                step = max(step, math.ceil(1 / (15 * base)), 1)
            self._last_pts = pts
            self._frames += 1
            frame.pts = pts + self._offset
            self._next_pts = frame.pts + step
            # Paced on the timestamps that go on (MediaPlayer paces a round from its start).
            loop = asyncio.get_running_loop()
            if self._t0 is None:
                self._t0 = loop.time() - float(frame.pts * base)
            wait = self._t0 + float(frame.pts * base) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            return frame

    def _next_round(self) -> None:
        """The round's frames ended: play the file again, or tell the user that nothing
        more is sent."""
        source = self._source
        if not source.looped or self._frames == 0:  # (a round without frames: no busy loop)
            what = "file" if os.path.isfile(source.file) else "source"
            source.ended(
                f"the {what} {source.file!r} ended: nothing more is sent from it (the others "
                "see its last picture)"
            )
            source.set_over()
            self._inner = None
            return
        self._round = max(self._round + 1, source.round)  # (the rounds this one is behind)
        self._inner = source.track(self.kind, self._round)
        self._offset, self._last_pts, self._frames = self._next_pts, None, 0

    def stop(self) -> None:
        super().stop()
        if self._inner is not None:  # (lets the player's thread end, and close the file)
            self._inner.stop()


class _Spent(MediaStreamTrack):
    """A track of a file played once that ended already (`MediaSpec._spent`): it ends at
    the first frame asked, as the file's own did."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Frame:
        self.stop()
        raise MediaStreamError


# MP4 in fragments (one per keyframe), the index first, each written out at once: what was
# recorded up to the last keyframe before a crash or SIGKILL plays, where a plain MP4 is
# unplayable without the index written at its end. WAV packets are written out at once too:
# a full disk is then told when it happens, not at the end of the call.
_MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov", "flush_packets": "1"}
_WAV_OPTIONS = {"flush_packets": "1"}


class _Output:
    """A recording's file as FFmpeg writes it: through Python's `os` calls, which let go of
    the GIL while the disk takes its time. FFmpeg's own file I/O does not for the file's
    opening, header, trailer and close (PyAV holds the GIL around them): a disk that hangs
    there (a stalled NFS mount, a FIFO without a reader) would stop every thread, the call's
    event loop with it, and `FINISH_WAIT` would never come."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)  # (the container's format is guessed from it)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.lseek(self.fd, 0, os.SEEK_CUR)
            self._seekable = True
        except OSError:  # a FIFO, say: FFmpeg then writes it without going back
            self._seekable = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:  # (FFmpeg takes a short count for an error)
            view = view[os.write(self.fd, view) :]
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def seekable(self) -> bool:
        return self._seekable

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _open_recording(output: _Output, kind: str) -> tuple[OutputContainer, Stream]:
    """The container and stream of a recording into `output`, with the codecs aiortc's
    MediaRecorder would choose (PCM in a WAV, else AAC; H.264 for video)."""
    options = _MP4_OPTIONS if output.name.endswith(".mp4") else _WAV_OPTIONS
    container = av.open(output, mode="w", options=options)
    try:
        if kind == "audio":
            codec = "pcm_s16le" if container.format.name == "wav" else "aac"
            return container, container.add_stream(codec)
        stream = container.add_stream("libx264", rate=30)
        stream.pix_fmt = "yuv420p"
        # The frames' own clock (RTP's), not 1/30 s: at 1/30 s, two frames less than 1/30 s
        # apart (60 fps, a camera's jitter) would get one timestamp, which FFmpeg refuses
        # ("Invalid argument"), ending the recording.
        stream.codec_context.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return container, stream
    except BaseException:
        container.close()
        raise


class RecordingIncomplete(ConclaveError):
    """A recording that lacks part of its track: a write failed (a full disk), the file was
    not finished in time at the call's end, or frames were left out while the encoder was
    behind. The message is a line for the user; what was written stays in `path`."""

    def __init__(self, message: str, path: Path, dropped: int, frames: int) -> None:
        super().__init__(message)
        self.path, self.dropped, self.frames = path, dropped, frames


# Frames received and not yet encoded, at most (per recording): 72 of 640x480 (about 5 s at
# 15 fps), ten of 1080p. Beyond it, frames are left out (and counted) rather than queued: the
# relay already queues without bound what this does not read, and the recording cannot make
# its track slow down.
QUEUE_BYTES = 32 << 20
# How long the call's end waits for a recording's file to be finished: the queue's frames and
# the encoder's lookahead, a fraction of a second unless the disk hangs.
FINISH_WAIT = 10.0
# What a queued frame takes beyond its planes (FFmpeg's AVFrame and buffer references, PyAV's
# objects, the allocator's rounding): about 1.8 KiB measured, with PyAV 18. Counted, so that
# small frames (audio, a tiny video) do not take several times QUEUE_BYTES.
FRAME_OVERHEAD = 2048


def _frame_bytes(frame: Frame) -> int:
    return FRAME_OVERHEAD + sum(plane.buffer_size for plane in frame.planes)


# An audio track's frames that never came (lost on the network and not repaired, or that failed
# to decrypt or decode) leave a hole in their timestamps, which PCM in a WAV does not keep: every
# later sound would play early by the hole's length, and the recording drift from its video (an
# MP4 keeps its frames' timestamps, holes included). So a hole is filled with silence as long,
# within bounds, for the timestamps come from the SFU, which is not trusted, and across a
# stream's restart (the SFU goes on from the time elapsed; aiortc's TimestampMapper takes a
# lower RTP timestamp for a wrap: a jump of up to 2**32 samples, 25 hours):
# - a hole gets at most SILENCE_MOST seconds: a jump of hours is no hole to fill;
# - silence never takes the file past the time since its first frame came, plus SILENCE_SLACK
#   (frames' delays vary): without it, a jump of 10 s at every 20 ms frame would write 100 MB/s;
# - a jump backwards (an overlap), a frame without a timestamp or at another sample rate starts
#   the count afresh: nothing to fill.
SILENCE_MOST = 10.0
SILENCE_SLACK = 2.0
_clock = time.monotonic  # when a frame came (its own name: the tests' clock replaces it)


class _Timeline:
    """Where an audio recording's frames fall in its file: the silence before each (a hole's)
    and the frame's timestamp there."""

    def __init__(self) -> None:
        self.first: float | None = None  # when the first frame came (`_clock`)
        self.rate = 0  # the last frame's sample rate: what `at` and `end` count
        self.at = 0  # samples written: frames and silence
        self.end: int | None = None  # the sample after the last frame's, by its timestamp

    def place(self, frame: AudioFrame, came: float) -> list[AudioFrame]:
        """The silence to write before `frame`, which came at `came` (mostly none); `frame` is
        given its timestamp in the file. Those go on from frame to frame, whatever the frames'
        own do: a jump backwards would be refused by FFmpeg ("Invalid argument"), and end the
        recording."""
        rate = frame.sample_rate
        if self.first is None:
            self.first = came
        if not rate:  # (nothing to count in: the encoder says what is wrong)
            return []
        if rate != self.rate:
            self.at = self.at * rate // self.rate if self.rate else 0
            self.end, self.rate = None, rate
        hole = 0
        if frame.pts is None or frame.time_base is None:
            self.end = None
        else:
            start = round(frame.pts * frame.time_base * rate)
            if self.end is not None:
                hole = start - self.end
            self.end = start + frame.samples
        most = min(SILENCE_MOST, came - self.first + SILENCE_SLACK - self.at / rate)
        hole = max(0, min(hole, int(most * rate)))
        silence = _silence(frame, hole, self.at)
        frame.pts, frame.time_base = self.at + hole, fractions.Fraction(1, rate)
        self.at += hole + frame.samples
        return silence


class _Pictures:
    """A video recording's timestamps: the frames' own (an MP4 keeps them, holes included),
    except that they never go back nor stand still, which FFmpeg refuses ("Invalid
    argument"), ending the recording: a frame that would is put just after the last one, and
    the frames after it go on from there (a new start). Nor do they jump ahead by more than
    SILENCE_MOST, as an audio hole at most: aiortc takes an RTP timestamp one tick lower than
    the last (an SFU's to send) for a wrap, 2**32 ticks on, which the MP4 muxer refuses (its
    gaps stay under 2**31), ending the recording too."""

    def __init__(self) -> None:
        self.shift = 0  # added to the frames' timestamps, at VIDEO_CLOCK
        self.last: int | None = None

    def place(self, frame: VideoFrame) -> None:
        if frame.pts is None or frame.time_base is None:
            at = 0 if self.last is None else self.last + 1
        else:
            at = round(frame.pts * frame.time_base * VIDEO_CLOCK) + self.shift
        if self.last is not None and at <= self.last:
            self.shift += self.last + 1 - at
            at = self.last + 1
        elif self.last is not None and at - self.last > SILENCE_MOST * VIDEO_CLOCK:
            self.shift -= at - self.last - int(SILENCE_MOST * VIDEO_CLOCK)
            at = self.last + int(SILENCE_MOST * VIDEO_CLOCK)
        frame.pts, frame.time_base = at, fractions.Fraction(1, VIDEO_CLOCK)
        self.last = at


def _silence(like: AudioFrame, samples: int, pts: int) -> list[AudioFrame]:
    """`samples` of silence from `pts` (in samples) in frames of at most a second, in `like`'s
    format, layout and rate."""
    quiet = b"\x80" if like.format.name.startswith("u8") else b"\x00"  # (unsigned: 128)
    frames = []
    while samples:
        n = min(samples, like.sample_rate)
        frame = AudioFrame(format=like.format.name, layout=like.layout.name, samples=n)
        for plane in frame.planes:
            plane.update(quiet * plane.buffer_size)
        frame.sample_rate = like.sample_rate
        frame.pts, frame.time_base = pts, fractions.Fraction(1, like.sample_rate)
        frames.append(frame)
        pts += n
        samples -= n
    return frames


async def record_track(
    track: MediaStreamTrack,
    new_file: Callable[[], Path],
    tell: Callable[[str], None] | None = None,
) -> Path | None:
    """Record a received `track` into the file `new_file` makes at its first frame, and finish
    the file when the track ends (its publisher left, the media session ended) or this is
    cancelled (the call ends): a file per track, playable as soon as its track is over. A
    track that ends without a frame makes no file. Returns the file, if any.

    The frames are encoded and written by a thread of the recording's own (`_Recorder`): an
    H.264 frame takes milliseconds to encode, which on the event loop would hold up the call's
    own media. When the encoder falls behind by `QUEUE_BYTES` of frames, the frames received
    meanwhile are left out and counted. A recording that lacks anything (frames left out, a
    failed write, a file not finished within `FINISH_WAIT` at the call's end) ends in a
    `RecordingIncomplete` saying so: that is the line the user is told. Cancelled, it hands
    that line to `tell` and lets the cancellation go on (without `tell`, it raises the error).

    The recording owns `track` (a relay's subscription): it is stopped however the recording
    ends, for a subscription no one reads keeps every frame relayed to it. A file that cannot
    be written (a full disk, say) ends the recording at once; what was written stays. The
    frames are encoded here rather than by aiortc's MediaRecorder, whose task dies of such an
    error unseen (the recording then waits for ever for a track end no one reads) and then
    muxes again into the failed file, which crashes FFmpeg."""
    try:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return None
        try:
            path = new_file()
        except OSError as exc:  # (record_dir cannot be made, or written)
            where = exc.filename or "its file"
            raise ConclaveError(
                f"cannot record a {track.kind} track into {where}: {_why(exc)}"
            ) from None
        recorder = _Recorder(path, track.kind)
        recorder.put(frame)
        return await recorder.record(track, tell)
    finally:
        track.stop()


_RECORDING = re.compile(r"(.*)-(?:audio|video|media)(?:-\d+)?\.(?:wav|mp4)")


def recording_path(record_dir: Path, publisher: str, kind: str) -> Path:
    """A new file in `record_dir` for a track of `publisher`, created empty with mode 0600 (it
    will hold decrypted media; the recorder then writes into it): `bob-video.mp4`, then
    `bob-video-2.mp4`... for bob's next tracks. The publisher's name comes from the SFU, which
    is not trusted: only letters, digits, '.', '_' and '-' of it make the file name, so that it
    names a file in record_dir and nothing else. An existing file is not replaced, even by a
    recorder opened at the same moment (O_EXCL: the name is taken when it is chosen).

    Two members whose names differ only by case ("Bob", "bob") get names that differ
    whatever the case too: on a case-insensitive file system (macOS's, Windows') or once
    copied there, their files would be one. The one whose recordings come second (in the
    directory, from this call or an earlier one) is told apart by a short hash of its exact
    name: `bob~1a2b3c-video.mp4`."""
    record_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # decrypted media
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", publisher)[:64].lstrip(".") or "unknown"
    owners = {
        m.group(1) for m in map(_RECORDING.fullmatch, os.listdir(record_dir)) if m is not None
    }
    if any(o != safe and o.casefold() == safe.casefold() for o in owners):
        safe += "~" + hashlib.sha256(publisher.encode("utf-8", "replace")).hexdigest()[:6]
    kind = kind if kind in ("audio", "video") else "media"
    suffix = "wav" if kind == "audio" else "mp4"
    taken = {name.casefold() for name in os.listdir(record_dir)}
    n = 1
    while True:
        name = f"{safe}-{kind}.{suffix}" if n == 1 else f"{safe}-{kind}-{n}.{suffix}"
        n += 1
        if name.casefold() in taken:
            continue
        path = record_dir / name
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return path


class _Recorder:
    """One recording's file, encoded and written by a thread of its own from a queue that the
    event loop fills: frames stay in order, and a slow or failing file holds up no other.

    The thread is a daemon: a file on a disk that hangs must not keep the process from
    exiting once the call's end has given up waiting for it."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.frames = 0  # received, including those left out
        self.dropped = 0
        self.muxed = 0  # packets written (by the thread)
        self.failure: Exception | None = None  # set by the thread, read once it is done
        # Each frame with when it came (`_clock`); None: the end.
        self._queue: queue.SimpleQueue[tuple[Frame, float] | None] = queue.SimpleQueue()
        # Bytes queued = put - taken; each counter written by one side only, so no lock.
        self._put_bytes = 0
        self._taken_bytes = 0
        self._abandoned = False  # the loop gave up waiting: the thread takes no more frames
        self._over = False  # the thread takes no more frames (a failed write)
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, name=f"conclave-record {path.name}", daemon=True
        )
        try:
            self._thread.start()
        except RuntimeError as exc:  # (no thread to be had)
            path.unlink(missing_ok=True)
            raise ConclaveError(f"cannot record into {path}: {exc}") from None

    def put(self, frame: Frame) -> None:
        """Queue `frame` for the encoder, or leave it out (counted) if `QUEUE_BYTES` of frames
        wait already. (On the event loop.)"""
        if self._over:
            return  # (the end is near: not counted as left out)
        self.frames += 1
        size = _frame_bytes(frame)
        queued = self._put_bytes - self._taken_bytes
        if queued and queued + size > QUEUE_BYTES:  # (one frame always fits)
            self.dropped += 1
            return
        self._put_bytes += size
        self._queue.put((frame, _clock()))

    async def record(self, track: MediaStreamTrack, tell: Callable[[str], None] | None) -> Path:
        """Queue the rest of `track` until it ends, this is cancelled, or the thread stops (a
        failed write: the track is let go of at once, not at its next frame); then finish the
        file, and say what it lacks."""
        feeding = asyncio.ensure_future(self._feed(track))
        cancelled = False
        try:
            await asyncio.wait({feeding, self._done}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
        feeding.cancel()
        self._queue.put(None)
        # Cancelled (the call ends): the file is finished all the same, so a cancellation
        # meanwhile waits for it, within FINISH_WAIT; `close()` cancels once and waits.
        deadline: float | None = None
        while not (feeding.done() and self._done.done()):
            if cancelled and deadline is None:
                deadline = self._loop.time() + FINISH_WAIT
            left = None if deadline is None else deadline - self._loop.time()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait({feeding, self._done}, timeout=left)
            except asyncio.CancelledError:
                cancelled = True
        if self._done.done():
            self._thread.join(1.0)  # (at its last line: gone at once; none outlives the call)
        else:
            self._abandoned = True
        told = self._told()
        if told is not None and cancelled and tell is not None:
            tell(told)
        elif told is not None:
            raise RecordingIncomplete(told, self.path, self.dropped, self.frames) from None
        failed = feeding.exception() if feeding.done() and not feeding.cancelled() else None
        if failed is not None:
            raise failed  # (the track's own error, not its end)
        if cancelled:
            raise asyncio.CancelledError
        return self.path

    async def _feed(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                self.put(await track.recv())

    def _told(self) -> str | None:
        """What the user is told of the recording: None if it has everything."""
        left_out = (
            f"{self.dropped} of its {self.frames} frames left out (the encoder fell behind)"
            if self.dropped
            else ""
        )
        if not self._done.done():
            why = f"the file was not finished within {FINISH_WAIT:g} s"
            text = f"stopped recording into {self.path}: {why}"
        elif self.failure is not None:
            done = "stopped recording into" if self.muxed else "cannot record into"
            text = f"{done} {self.path}: {_why(self.failure)}"
        elif left_out:
            return f"recorded {self.path} with {left_out}"
        else:
            return None
        return f"{text}; {left_out}" if left_out else text

    def _run(self) -> None:
        """The thread: encode and write, then tell the loop. Nothing escapes it (a traceback
        on stderr): an unexpected error is the recording's failure."""
        try:
            self._write()
        except Exception as exc:
            self.failure = self.failure or exc
        finally:
            self._over = True
            # (a loop already closed: the call's end gave up on this file)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._finished)

    def _finished(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _write(self) -> None:
        """Open the file, encode the queue's frames into it until its end, then finish the
        file (the encoder's last frames and the file's end). After a failed write FFmpeg is
        given nothing more but the close."""
        try:
            output = _Output(self.path)
        except OSError as exc:
            self.failure = exc
            self.path.unlink(missing_ok=True)  # empty: no use to anyone
            return
        try:
            container, stream = _open_recording(output, self.kind)
        except Exception as exc:
            output.close()
            self.failure = exc
            self.path.unlink(missing_ok=True)
            return

        def put(frame: Frame | None) -> bool:  # None: what the encoder holds back
            try:
                for packet in stream.encode(frame):
                    container.mux(packet)
                    self.muxed += 1
            except Exception as exc:
                self.failure = exc
                return False
            return True

        # (Each frame's timestamp is set to its place in the file: the encoder sets it to its
        # own time base in place all the same, in the frame the call's other readers share.)
        timeline, pictures = _Timeline(), _Pictures()
        try:
            first = True
            while not self._abandoned:
                item = self._queue.get()
                if item is None:
                    break
                frame, came = item
                self._taken_bytes += _frame_bytes(frame)
                if first and isinstance(frame, VideoFrame):  # the file's size is its first frame's
                    stream.width, stream.height = frame.width, frame.height
                first = False
                if isinstance(frame, AudioFrame):  # (frames left out by `put` are a hole too)
                    if not all(map(put, timeline.place(frame, came))):
                        break
                elif isinstance(frame, VideoFrame):
                    pictures.place(frame)
                if not put(frame):
                    break
        finally:
            if self.failure is None:  # (abandoned too: what it encoded is worth a playable file)
                put(None)
            try:
                container.close()
            except Exception as exc:
                self.failure = self.failure or exc
            try:
                output.close()
            except OSError as exc:  # (a network file system's last write)
                self.failure = self.failure or exc
            if self.muxed == 0 and self.failure is not None:
                self.path.unlink(missing_ok=True)  # nothing in it


def _open_failure(exc: BaseException) -> str:
    """Why FFmpeg could not open a file or device to play, in words: its text for an FFmpeg
    error carries FFmpeg's own error number ("[Errno 1094995529]", no OS error) and the name
    the message names already."""
    if isinstance(exc, av.error.InvalidDataError):
        return "it is not a video (or audio) file that PyAV/FFmpeg can read"
    if isinstance(exc, av.error.FFmpegError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
