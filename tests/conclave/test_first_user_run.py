"""What a first-time user's run of `conclave join` found: recordings finalized when their track
ends, "sent" counted over every media session, the delivery service's outages told, clear
errors for a wrong --ds, an invite into a second room, and a knock."""

from __future__ import annotations

import asyncio
import fractions
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import pytest
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame, VideoFrame

from conclave import participant as participant_module
from conclave.commands import Command, CommandError, InCall
from conclave.errors import ConclaveError
from conclave.participant import Participant, group_id_for_room
from conclave.services import Services
from delivery_service.client import RoomToken
from e2ee_media.transform import TrackStats

from .conftest import until


class _Frames(MediaStreamTrack):
    """A received track: `count` frames at once, then its end (as when its publisher left or
    the SFU restarted)."""

    def __init__(self, kind: str, count: int) -> None:
        super().__init__()
        self.kind = kind
        self.count = count
        self.n = 0

    async def recv(self) -> AudioFrame | VideoFrame:
        if self.n >= self.count:
            self.stop()
            raise MediaStreamError
        self.n += 1
        await asyncio.sleep(0)
        if self.kind == "video":
            frame = VideoFrame(64, 48, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes(plane.buffer_size))
            frame.pts, frame.time_base = self.n * 3000, fractions.Fraction(1, 90000)
            return frame
        audio = AudioFrame(format="s16", layout="mono", samples=960)
        audio.planes[0].update(bytes(1920))
        audio.sample_rate = 48000
        audio.pts, audio.time_base = self.n * 960, fractions.Fraction(1, 48000)
        return audio


def _recorder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Participant:
    """A participant that records what it receives, with no SFU: tracks are handed to
    `_on_track` as the SFU client would."""
    monkeypatch.setattr(participant_module, "decrypt_receiver",
                        lambda receiver, keys, stats=None: SimpleNamespace(stats=stats))
    p = Participant("bob", "http://127.0.0.1:9", record_dir=tmp_path / "rec")
    p.e2ee = False
    return p


def _frames_in(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams[0]))


async def test_a_recording_is_finished_when_its_track_ends_not_when_join_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each recorder was stopped only by close(): the files of peers who left stayed
    # 48 bytes, unplayable (PyAV: InvalidDataError), until the recorder quit; a SIGKILL lost
    # them all.
    p = _recorder(tmp_path, monkeypatch)
    try:
        for kind in ("video", "audio"):
            p._on_track(_Frames(kind, 20), SimpleNamespace(receiver=None),
                        {"identity": "dave", "kind": kind})
        await asyncio.gather(*list(p._tasks))  # the tracks ended; the call goes on
        assert _frames_in(tmp_path / "rec" / "dave-video.mp4") == 20
        assert _frames_in(tmp_path / "rec" / "dave-audio.wav") > 0
    finally:
        await p.close()


async def test_a_track_that_ends_without_a_frame_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a 0-byte file that no player opens, even after a clean exit.
    p = _recorder(tmp_path, monkeypatch)
    try:
        p._on_track(_Frames("video", 0), SimpleNamespace(receiver=None),
                    {"identity": "dave", "kind": "video"})
        await asyncio.gather(*list(p._tasks))
    finally:
        await p.close()
    assert not (tmp_path / "rec").exists() or list((tmp_path / "rec").iterdir()) == []


async def test_close_finishes_a_recording_still_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = _recorder(tmp_path, monkeypatch)

    class _Endless(_Frames):
        async def recv(self) -> AudioFrame | VideoFrame:
            if self.n >= self.count:
                await asyncio.Event().wait()  # a peer still in the call
            return await super().recv()

    track = _Endless("video", 5)
    p._on_track(track, SimpleNamespace(receiver=None), {"identity": "dave", "kind": "video"})
    await until(lambda: track.n >= 5)
    await p.close()
    assert _frames_in(tmp_path / "rec" / "dave-video.mp4") >= 1


_KILLED_RECORDER = """
import asyncio, fractions, os, signal, sys
from pathlib import Path
from aiortc import MediaStreamTrack
from av import VideoFrame
from conclave.media import record_track

class Track(MediaStreamTrack):
    kind = "video"
    n = 0
    async def recv(self):
        self.n += 1
        await asyncio.sleep(0)
        if self.n > 300:  # past the encoder's second keyframe (every 250 frames)
            # The encoder's thread lags this (synthetic, unpaced) track: killed once the file
            # holds a fragment, within 30 s (a plain MP4 never does: killed all the same).
            path = Path(sys.argv[1])
            for _ in range(600):
                if path.exists() and b"moof" in path.read_bytes():
                    break
                await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        frame = VideoFrame(64, 48, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes([self.n % 256]) * plane.buffer_size)
        frame.pts, frame.time_base = self.n * 3000, fractions.Fraction(1, 90000)
        return frame

asyncio.run(record_track(Track(), lambda: Path(sys.argv[1])))
"""


def test_a_recorder_killed_mid_call_leaves_what_it_wrote_playable(tmp_path: Path) -> None:
    # Before: a plain MP4, whose index is written at its end: a SIGKILL of the recorder lost
    # every video file of the run.
    path = tmp_path / "dave-video.mp4"
    done = subprocess.run([sys.executable, "-c", _KILLED_RECORDER, str(path)], timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert _frames_in(path) >= 200


class _FakeSFU:
    """An SFU client whose join works at once, with one sender per kind."""

    def __init__(self, url: str, room: str, identity: str, token: str, tracks: list[Any],
                 on_track: Any) -> None:
        self.room = room
        self.senders = [SimpleNamespace(track=t) for t in tracks]
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def join(self) -> dict[str, Any]:
        return {}

    async def leave(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_frames_sent_count_every_media_session_not_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "sent" came from the encryptors of the latest session alone: carol, 8 minutes in
    # the call across a reconnect, printed "sent 0 audio, 0 video".
    def encrypt_sender(sender: Any, keys: Any, *, context: int, stats: TrackStats) -> Any:
        stats.frames_encrypted += 5  # what the session sent before it ended
        return SimpleNamespace(stats=stats)

    monkeypatch.setattr(participant_module, "SFUClient", _FakeSFU)
    monkeypatch.setattr(participant_module, "encrypt_sender", encrypt_sender)
    p = Participant("carol", "http://127.0.0.1:9", "http://sfu.invalid/v1/signal",
                    state_dir=tmp_path / "state")
    p.group = participant_module.Group.create(p.client, participant_module.group_id_for_room("r"))

    async def room_token(group_id: bytes) -> RoomToken:
        return RoomToken(group_id.hex(), "t", 2**40, 0, ttl=3600)

    monkeypatch.setattr(p.ds, "room_token", room_token)
    try:
        await p.connect_media()
        await p.connect_media()  # called in again (the SFU restarted)
        assert p.stats().sent == {"audio": 10, "video": 10}
    finally:
        await p.close()


async def test_frames_received_count_every_media_session_not_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a new session's track replaced the last one in `remote`, and its counts with it:
    # alice, 7 minutes in a call across reconnects, printed "received 97 decrypted".
    p = _recorder(tmp_path, monkeypatch)
    p.record_dir = None
    try:
        for frames in (20, 30):  # dave's video in two media sessions
            p._on_track(_Frames("video", frames), SimpleNamespace(receiver=None),
                        {"identity": "dave", "kind": "video"})
            await until(lambda n=frames: p.remote[("dave", "video")].decoded == n)
        assert p.stats().decoded == 50
    finally:
        await p.close()


@pytest.mark.parametrize("where", ["sfu", "path"])
async def test_a_wrong_ds_url_is_told_as_such_not_as_a_refused_name(
    services: Services, tmp_path: Path, where: str
) -> None:
    # Before: "the delivery service refused to register erin: 404 http_error: HTTP 404",
    # which reads as the name being refused.
    assert services.sfu_url is not None and services.ds_url is not None
    url = services.sfu_url.removesuffix("/v1/signal") if where == "sfu" else services.ds_url + "/v1"
    p = Participant("erin", url, state_dir=tmp_path / "state")
    try:
        with pytest.raises(ConclaveError) as caught:
            await p.start()
    finally:
        await p.close()
    text = str(caught.value)
    assert f"at {url} is not a Conclave delivery service (check --ds" in text
    assert "refused to register" not in text


async def test_knocking_on_a_room_that_does_not_exist_says_so(
    services: Services, tmp_path: Path
) -> None:
    # Before: "cannot join room 'emptyroom': no group 656d707479726f6f6d".
    p = Participant("ivy", services.ds_url, state_dir=tmp_path / "state")
    try:
        await p.start()
        with pytest.raises(ConclaveError) as caught:
            await p.enter("emptyroom", knock=True)
    finally:
        await p.close()
    text = str(caught.value)
    assert "there is no room 'emptyroom'" in text and "without --knock" in text
    assert group_id_for_room("emptyroom").hex() not in text


async def test_a_knock_not_answered_in_time_says_the_request_stands(
    services: Services, tmp_path: Path
) -> None:
    # Before: "ivy was not invited within 15s". The request stands: checked below that the
    # next join of ivy enters once a member (offline meanwhile) has let her in.
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    ivy = Participant("ivy", services.ds_url, state_dir=state)
    try:
        await alice.start()
        await alice.create("r")
        await alice.close()  # no member online: no one lets ivy in meanwhile
        await ivy.start()
        with pytest.raises(ConclaveError) as caught:
            await ivy.knock("r", timeout=0.2)
        text = str(caught.value)
        assert "no member let ivy into room 'r' within" in text
        assert "the request stands" in text and "conclave join --room r --name ivy --knock" in text
        await ivy.close()
        alice = Participant("alice", services.ds_url, state_dir=state)
        await alice.start()  # catches up and commits the Add
        await alice.enter("r")
        await until(lambda: "ivy" in alice.member_names)
        ivy = Participant("ivy", services.ds_url, state_dir=state)
        await ivy.start()
        assert await ivy.enter("r", knock=True) == "was let into"  # as the error said
    finally:
        await alice.close()
        await ivy.close()


async def test_an_invite_into_a_second_room_is_told_with_how_to_take_it(
    services: Services, tmp_path: Path
) -> None:
    # Before: "mona is in the call of room 'r3' ...: rejoin 'r3', or use another name for
    # 'r2'", not a word of the invitation, which leaving r3 first lets her take.
    state = tmp_path / "state"
    mona, nina, lena = (Participant(n, services.ds_url, state_dir=state)
                        for n in ("mona", "nina", "lena"))
    try:
        for p in (mona, nina, lena):
            await p.start()
        await mona.create("r3")
        await mona.invite(["nina"])
        await nina.wait_for_welcome(5)
        await lena.create("r2")
        await lena.invite(["mona"])
        await mona.close()
        mona = Participant("mona", services.ds_url, state_dir=state)  # her next `join`
        await mona.start()
        with pytest.raises(ConclaveError) as caught:
            await mona.enter("r2")
        text = str(caught.value)
        assert "mona was invited to room 'r2'" in text
        assert "leave the call of 'r3' first" in text
        assert "conclave join --room r2 --name mona" in text
        # What it says works: leave r3 (nina commits it), then join r2 from the Welcome.
        await mona.enter("r3")
        await mona.leave()
        await until(lambda: mona.removed)
        await mona.close()
        mona = Participant("mona", services.ds_url, state_dir=state)
        await mona.start()
        assert await mona.enter("r2") == "was let into"
        assert sorted(mona.member_names) == ["lena", "mona"]
    finally:
        for p in (mona, nina, lena):
            await p.close()


async def _stop_ds(services: Services) -> None:
    """Take the delivery service off the network, its database kept (as a restart does)."""
    runner = services._runners[0]  # the service's, started first
    await runner.cleanup()
    services._runners.remove(runner)


async def _start_ds(services: Services) -> None:
    from delivery_service.server import make_app

    assert services.service is not None and services.ds_url is not None
    port = int(services.ds_url.rsplit(":", 1)[1])
    await services._serve(make_app(services.service, manage_storage=False), port)


async def test_a_delivery_service_outage_is_told_once_and_commands_say_what_happened(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: with the service down, no one in the call saw anything, nor when it came back;
    # `rotate` said "cannot learn ... whether it took our last commit (...); try again later"
    # and `leave` "network error: Cannot connect to host ...", not that nothing was done.
    monkeypatch.setattr(participant_module, "SERVICE_LOST_AFTER", 0.2)
    monkeypatch.setattr(participant_module, "SERVICE_CHECK", 0.05)
    state = tmp_path / "state"
    alice, bob = (Participant(n, services.ds_url, state_dir=state) for n in ("alice", "bob"))
    lines: list[str] = []
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("r")
        await alice.invite(["bob"])
        await bob.wait_for_welcome(5)
        in_call = InCall(alice, lines.append)  # as `join` makes it: its lines on stdout
        epoch = alice.epoch
        await _stop_ds(services)
        await until(lambda: any("lost the connection to the delivery service" in t
                                for t in lines))
        for verb in ("rotate", "leave"):
            with pytest.raises(CommandError) as caught:
                await in_call.run(Command(verb))
            text = str(caught.value)
            assert f"{verb} was not done" in text
            assert f"type {verb} again once the delivery service is back" in text
        assert alice.epoch == epoch and alice.group is not None
        assert not alice.group.has_pending_commit  # nothing was sent: nothing to settle
        await _start_ds(services)
        # (" is back:": the lost line says "until it is back" too)
        await until(lambda: any(t.startswith("the delivery service at") and " is back:" in t
                                for t in lines))
        await in_call.run(Command("rotate"))  # as the message said
        assert alice.epoch == (epoch or 0) + 1
        assert [t for t in lines if "delivery service" in t and ("lost" in t or "back" in t)] \
            == lines[:1] + [t for t in lines[1:] if " is back:" in t]
        assert sum("lost the connection" in t for t in lines) == 1
        assert sum(" is back:" in t for t in lines) == 1
    finally:
        for p in (alice, bob):
            await p.close()
