"""Two (and three) aiortc peers on 127.0.0.1 exchanging Opus and VP8 through the SFrame hooks."""

from __future__ import annotations

import asyncio
import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
)
from aiortc.codecs.h264 import h264_depayload
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, pack_remb_fci
from av import AudioFrame, VideoFrame

from e2ee_media.aiortc_hooks import decrypt_receiver, encrypt_sender
from e2ee_media.codecs import split_annex_b, unescape_emulation, vp8_is_keyframe
from e2ee_media.header import decode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import FakeGroup, FakeWorld

AUDIO_CONTEXT, VIDEO_CONTEXT = 0, 1


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone (aiortc's own track paces the 20 ms frames)."""

    async def recv(self) -> AudioFrame:
        frame = await super().recv()
        start = frame.pts
        samples = array(
            "h",
            (
                int(8000 * math.sin(2 * math.pi * 440 * (start + i) / frame.sample_rate))
                for i in range(frame.samples)
            ),
        )
        frame.planes[0].update(samples.tobytes())
        return frame


class PatternTrack(VideoStreamTrack):
    """A small moving pattern, so that VP8 has content to encode."""

    WIDTH, HEIGHT = 160, 120
    BASE = bytes(range(256)) * 200

    async def recv(self) -> VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = VideoFrame(self.WIDTH, self.HEIGHT, "yuv420p")
        shift = (pts // 3000) % 256
        for plane in frame.planes:
            plane.update(self.BASE[shift : shift + plane.buffer_size])
        frame.pts, frame.time_base = pts, time_base
        return frame


@dataclass
class Wire:
    """RTP packets as they arrive at a receiver (after SRTP, before aiortc's receive path)."""

    packets: list[Any] = field(default_factory=list)


@dataclass
class Endpoint:
    pc: RTCPeerConnection
    keys: MLSKeyManager
    decryptors: dict[str, FrameDecryptor] = field(default_factory=dict)
    receivers: dict[str, RTCRtpReceiver] = field(default_factory=dict)
    wire: dict[str, Wire] = field(default_factory=dict)
    decoded: dict[str, int] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def receiving(pc: RTCPeerConnection, keys: MLSKeyManager) -> Endpoint:
    endpoint = Endpoint(pc, keys)

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
        endpoint.receivers[track.kind] = receiver
        # A generous holdback: a loaded CI machine may delay Bob's commit processing.
        endpoint.decryptors[track.kind] = decrypt_receiver(receiver, keys, holdback=2.0)
        wire = endpoint.wire[track.kind] = Wire()
        original = receiver._handle_rtp_packet

        async def tap(packet: Any, arrival_time_ms: int) -> None:
            wire.packets.append(packet)
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = tap  # type: ignore[method-assign]
        endpoint.decoded[track.kind] = 0

        async def consume() -> None:
            while True:
                await track.recv()
                endpoint.decoded[track.kind] += 1

        endpoint.tasks.append(asyncio.ensure_future(consume()))

    return endpoint


@dataclass
class Sender:
    pc: RTCPeerConnection
    senders: dict[str, RTCRtpSender]
    encryptors: dict[str, FrameEncryptor]
    plaintexts: dict[str, list[bytes]]


def sending(pc: RTCPeerConnection, keys: MLSKeyManager, contexts: tuple[int, int]) -> Sender:
    senders, encryptors, plaintexts = {}, {}, {}
    for kind, track, context in (
        ("audio", ToneTrack(), contexts[0]),
        ("video", PatternTrack(), contexts[1]),
    ):
        sender = pc.addTrack(track)
        encryptor = encrypt_sender(sender, keys, context=context)
        recorded: list[bytes] = []
        original = encryptor.encrypt_frame

        def record(
            frame: bytes, original: Any = original, recorded: list[bytes] = recorded
        ) -> bytes:
            recorded.append(bytes(frame))
            return original(frame)

        encryptor.encrypt_frame = record  # type: ignore[method-assign]
        senders[kind], encryptors[kind], plaintexts[kind] = sender, encryptor, recorded
    return Sender(pc, senders, encryptors, plaintexts)


async def connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


def new_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def wait_for(condition: Any, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.05)


async def rotate(
    world: FakeWorld,
    first: tuple[FakeGroup, MLSKeyManager],
    then: tuple[FakeGroup, MLSKeyManager],
    pause: float,
) -> None:
    """A commit that `first` processes `pause` seconds before `then` does."""
    world.commit()
    for group, keys in (first, then):
        group.sync()
        keys.update(group)
        if group is first[0]:
            await asyncio.sleep(pause)


async def more_frames_decoded(endpoint: Endpoint, count: int = 15) -> None:
    start = dict(endpoint.decoded)
    await wait_for(
        lambda: all(endpoint.decoded[kind] >= start[kind] + count for kind in ("audio", "video")),
        8,
    )


def vp8_frame_starts(packets: list[Any]) -> list[bytes]:
    """The first packet's data (after the VP8 payload descriptor) of every frame."""
    starts = []
    for packet in packets:
        descriptor, data = VpxPayloadDescriptor.parse(packet.payload)
        if descriptor.partition_start and descriptor.partition_id == 0:
            starts.append(data)
    return starts


async def test_opus_and_vp8_end_to_end_with_rotation_and_a_keyless_receiver() -> None:
    world = FakeWorld(members={0, 1})
    alice_group, bob_group = FakeGroup(world, 0), FakeGroup(world, 1)
    alice_keys, bob_keys, carol_keys = MLSKeyManager(), MLSKeyManager(), MLSKeyManager()
    alice_keys.update(alice_group)
    bob_keys.update(bob_group)
    # Carol is not in the group: she holds no keys at all.

    to_bob, to_carol = new_pc(), new_pc()
    bob_pc, carol_pc = new_pc(), new_pc()
    alice = sending(to_bob, alice_keys, (AUDIO_CONTEXT, VIDEO_CONTEXT))
    # The second connection's tracks get their own KID contexts: never two CTR sequences per KID.
    alice_to_carol = sending(to_carol, alice_keys, (2, 3))
    bob = receiving(bob_pc, bob_keys)
    carol = receiving(carol_pc, carol_keys)
    try:
        await connect(to_bob, bob_pc)
        await connect(to_carol, carol_pc)
        await wait_for(lambda: bob.decoded.get("video", 0) >= 15 and bob.decoded["audio"] >= 15, 8)
        first_epoch_frames = bob.decryptors["video"].stats.frames_decrypted

        # Rotation mid-stream: Bob processes the commit, then Alice; no frame may be lost.
        await rotate(world, (bob_group, bob_keys), (alice_group, alice_keys), pause=0.1)
        await more_frames_decoded(bob)
        # Second rotation, Alice first: Bob holds her next-epoch frames until he catches up.
        await rotate(world, (alice_group, alice_keys), (bob_group, bob_keys), pause=0.5)
        await more_frames_decoded(bob)

        # Keyframe request (PLI) from Bob reaches Alice's wrapped encoder.
        video_packets = bob.wire["video"].packets
        keyframes_before = sum(vp8_is_keyframe(d) for d in vp8_frame_starts(video_packets))
        await bob.receivers["video"]._send_rtcp_pli(video_packets[-1].ssrc)
        await wait_for(
            lambda: (
                sum(vp8_is_keyframe(d) for d in vp8_frame_starts(video_packets)) > keyframes_before
            ),
            5,
        )
        # Bitrate feedback (REMB) reaches it too.
        await bob.receivers["video"]._send_rtcp(
            RtcpPsfbPacket(
                fmt=RTCP_PSFB_APP,
                ssrc=1,
                media_ssrc=0,
                fci=pack_remb_fci(321_000, [video_packets[-1].ssrc]),
            )
        )
        encoder = alice.senders["video"]._RTCRtpSender__encoder  # type: ignore[attr-defined]
        await wait_for(lambda: encoder.target_bitrate == 321_000, 3)
    finally:
        for endpoint in (bob, carol):
            for task in endpoint.tasks:
                task.cancel()
        for pc in (to_bob, to_carol, bob_pc, carol_pc):
            await pc.close()

    # No decrypt failure at Bob across both rotations.
    for kind in ("audio", "video"):
        stats = bob.decryptors[kind].stats
        assert sum(stats.failures.values()) == 0, stats
        assert stats.frames_decrypted > 0
    assert bob.decryptors["video"].stats.frames_decrypted > first_epoch_frames
    # While Alice was ahead, Bob held her frames for the keys instead of dropping them.
    assert bob.decryptors["video"].stats.frames_held > 0
    assert bob.decryptors["audio"].stats.frames_held > 0

    # The wire carries SFrame ciphertext behind the clear codec prefix, under Alice's KIDs.
    video_kids = set()
    for data in vp8_frame_starts(bob.wire["video"].packets):
        prefix = 10 if vp8_is_keyframe(data) else 3
        video_kids.add(decode_header(data[prefix:])[0])
    assert video_kids == {alice_keys.kid(0, epoch, 1, VIDEO_CONTEXT) for epoch in (0, 1, 2)}, (
        "video frames of all three epochs, all under Alice's video KIDs"
    )
    audio_kids = {decode_header(p.payload[1:])[0] for p in bob.wire["audio"].packets}
    assert audio_kids == {alice_keys.kid(0, epoch, 1, AUDIO_CONTEXT) for epoch in (0, 1, 2)}
    wire_bytes = b"".join(p.payload for kind in ("audio", "video") for p in bob.wire[kind].packets)
    for kind, prefix in (("video", 10), ("audio", 1)):
        samples = [f[prefix : prefix + 12] for f in alice.plaintexts[kind] if len(f) >= prefix + 12]
        assert samples and not any(s in wire_bytes for s in samples), "plaintext on the wire"
    # The clear Opus TOC is the encoder's, and the audio-level extension is still sent.
    assert {p.payload[0] for p in bob.wire["audio"].packets} <= {
        f[0] for f in alice.plaintexts["audio"]
    }
    levels = [p.extensions.audio_level for p in bob.wire["audio"].packets]  # (vad, -dBov)
    assert all(level is not None for level in levels)
    assert all(level[1] < 40 for level in levels), "a 440 Hz tone is well above silence (127)"

    # Carol got the RTP but decrypted nothing and decoded nothing.
    for kind in ("audio", "video"):
        assert len(carol.wire[kind].packets) > 10
        stats = carol.decryptors[kind].stats
        assert stats.frames_decrypted == 0
        assert stats.failures["unknown_kid"] > 5
        assert carol.decoded[kind] == 0
    assert alice_to_carol.encryptors["video"].stats.frames_encrypted > 5


async def test_h264_end_to_end_keeps_nal_headers_in_the_clear() -> None:
    world = FakeWorld(members={0, 1})
    alice_keys, bob_keys = MLSKeyManager(), MLSKeyManager()
    alice_keys.update(FakeGroup(world, 0))
    bob_keys.update(FakeGroup(world, 1))
    alice_pc, bob_pc = new_pc(), new_pc()
    transceiver = alice_pc.addTransceiver(PatternTrack(), direction="sendonly")
    transceiver.setCodecPreferences(
        [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/H264"]
    )
    encryptor = encrypt_sender(transceiver.sender, alice_keys, context=VIDEO_CONTEXT)
    bob = receiving(bob_pc, bob_keys)
    try:
        await connect(alice_pc, bob_pc)
        await wait_for(lambda: bob.decoded.get("video", 0) >= 10, 8)
    finally:
        for task in bob.tasks:
            task.cancel()
        await alice_pc.close()
        await bob_pc.close()

    assert encryptor.mime_type == "video/h264"
    stats = bob.decryptors["video"].stats
    assert sum(stats.failures.values()) == 0 and stats.frames_decrypted >= 10
    # Reassemble the wire frames: every NAL unit has a clear header and an SFrame body that a
    # second copy of Bob's keys decrypts.
    frames: dict[int, bytes] = {}
    for packet in bob.wire["video"].packets:
        frames[packet.timestamp] = frames.get(packet.timestamp, b"") + h264_depayload(
            packet.payload
        )
    verifier = MLSKeyManager()
    verifier.update(FakeGroup(world, 1))
    nal_types = set()
    for stream in frames.values():
        nals = list(split_annex_b(stream))
        nal_types |= {nal[0] & 0x1F for nal in nals}
        assert all(nal[-1] == 0x80 for nal in nals)
        assert all(
            decode_header(unescape_emulation(nal[1:-1]))[0] == alice_keys.send_kid(VIDEO_CONTEXT)
            for nal in nals
        )
        FrameDecryptor(verifier).decrypt_frame(stream, "video/h264")
    assert {5, 7, 8} <= nal_types, "IDR, SPS and PPS headers readable on the wire"
