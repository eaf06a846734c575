"""E2EE media on a bad network: packet loss through the real SFU on loopback.

A packet lost for good (every retransmission lost too) stalls aiortc's video jitter buffer until
it overflows; it then restarts at the next packet it holds, which may be in the middle of a
frame, and releases that frame as if it were whole. Such a frame is a loss, not a forgery: it
must not reach SFrame decryption and be counted as a failure (authentication, or an unknown KID
read from ciphertext bytes), and video must resume after it.
"""

from __future__ import annotations

import pytest

from conclave.media import PatternTrack
from tests.e2ee_media.sfu_call import Call, NoiseTrack, PacketFilter, wait_for


def lose_first_packet_of_a_frame(
    payload_type: int, after_frames: int
) -> tuple[PacketFilter, list[int]]:
    """A filter that drops, every time it is sent, the first packet of the `after_frames`-th
    video frame it sees (the packet after one with the marker bit)."""
    state = {"frames": 0, "last_marker": -1}
    lost: list[int] = []

    def drop(data: bytes) -> bool:
        if data[1] & 0x7F != payload_type:
            return False
        seq = int.from_bytes(data[2:4], "big")
        if seq in lost:
            return True  # the SFU's retransmissions of it are lost too
        if not lost and seq == (state["last_marker"] + 1) & 0xFFFF:
            state["frames"] += 1
            if state["frames"] >= after_frames:
                lost.append(seq)
                return True
        if data[1] & 0x80:
            state["last_marker"] = seq
        return False

    return drop, lost


async def test_frame_without_its_first_packet_is_a_loss_not_a_failure() -> None:
    call = Call(NoiseTrack())
    try:
        await call.start()
        await wait_for(lambda: call.decoded["video"] >= 5, 10)
        video = call.decryptors["video"]
        drop, lost = lose_first_packet_of_a_frame(call.payload_type("video"), 3)
        call.down = drop
        # The jitter buffer waits for the lost packet until it overflows (512 packets), then
        # hands on what it has: wait for that frame to be dealt with one way or the other.
        await wait_for(
            lambda: bool(lost) and video.stats.frames_lost + sum(video.stats.failures.values()) > 0,
            15,
        )
        decrypted, decoded = video.stats.frames_decrypted, call.decoded["video"]
        # ... and for video to resume after it (the PLI brought a keyframe).
        await wait_for(
            lambda: (
                video.stats.frames_decrypted >= decrypted + 10
                and call.decoded["video"] >= decoded + 10
            ),
            10,
        )
    finally:
        await call.stop()
    assert len(lost) == 1
    assert sum(video.stats.failures.values()) == 0, video.stats.as_dict()
    assert video.stats.frames_lost == 1
    audio = call.decryptors["audio"].stats
    assert sum(audio.failures.values()) == 0 and audio.frames_lost == 0


async def test_video_given_up_on_a_lost_packet_resumes_long_before_the_buffer_overflows() -> None:
    """A packet lost for good in a low-rate stream (a test pattern compresses to a few packets a
    second): aiortc would wait for 512 packets to pile up, many seconds of frozen video; the
    jitter buffer gives the packet up after VIDEO_GAP_GIVE_UP and asks for a keyframe."""
    call = Call(PatternTrack(320, 240, fps=15))
    seen_after_loss = [0]
    try:
        await call.start()
        await wait_for(lambda: call.decoded["video"] >= 5, 10)
        video = call.decryptors["video"]
        buffer = call.receivers["video"]._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        drop, lost = lose_first_packet_of_a_frame(call.payload_type("video"), 3)
        payload_type = call.payload_type("video")

        def count_then_drop(data: bytes) -> bool:
            if lost and data[1] & 0x7F == payload_type:
                seen_after_loss[0] += 1
            return drop(data)

        call.down = count_then_drop
        await wait_for(lambda: bool(lost) and buffer.gaps_given_up > 0, 10)
        decoded = call.decoded["video"]
        await wait_for(lambda: call.decoded["video"] >= decoded + 5, 10)
    finally:
        await call.stop()
    assert seen_after_loss[0] < buffer.capacity // 2, seen_after_loss  # 512 without the give-up
    assert sum(video.stats.failures.values()) == 0, video.stats.as_dict()


async def test_audio_loses_only_the_packets_lost_and_gains_no_delay() -> None:
    """Opus has no retransmission: a lost audio packet is given up once `prefetch` later ones
    are here. (aiortc's own buffer held everything behind it until it overflowed, dropped about
    four good frames per loss, and then kept 16 packets, 220 ms more delay, for good.)"""
    call = Call(PatternTrack(160, 120, fps=15))
    drops = 8
    counts = {"audio": 0, "dropped": 0, "passed": 0}
    try:
        await call.start()
        await wait_for(lambda: call.decoded["audio"] >= 20, 10)
        payload_type = call.payload_type("audio")
        buffer = call.receivers["audio"]._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        decoded = call.decoded["audio"]

        def drop(data: bytes) -> bool:
            if data[1] & 0x7F != payload_type:
                return False
            counts["audio"] += 1
            if counts["dropped"] < drops and counts["audio"] % 10 == 5:
                counts["dropped"] += 1
                return True
            counts["passed"] += 1
            return False

        call.down = drop
        await wait_for(lambda: counts["dropped"] == drops and counts["passed"] >= 100, 15)
        # every frame that came is played, but those still waiting in the buffer
        await wait_for(lambda: call.decoded["audio"] - decoded >= counts["passed"] - buffer.held, 5)
        held = buffer.held
    finally:
        await call.stop()
    assert held <= buffer._prefetch + 1, held
    assert sum(call.decryptors["audio"].stats.failures.values()) == 0


def test_a_large_frame_repaired_late_in_its_arrival_is_not_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A keyframe that takes 1.5 s to arrive (a slow link) with a packet lost a second into it
    and repaired 0.1 s later: the hole was young, the frame is whole, nothing is given up (nor
    is another keyframe asked for, which on such a link would never arrive whole either)."""
    from aiortc.jitterbuffer import JitterBuffer
    from aiortc.rtp import RtpPacket

    import e2ee_media.aiortc_hooks as hooks

    clock = [0.0]
    monkeypatch.setattr(hooks.time, "monotonic", lambda: clock[0])
    buffer = hooks._FrameCheckingJitterBuffer(
        JitterBuffer(capacity=512, is_video=True), lambda pt: "video/vp8"
    )

    def packet(seq: int, timestamp: int, first: bool) -> RtpPacket:
        p = RtpPacket(
            payload_type=96,
            sequence_number=seq,
            timestamp=timestamp,
            payload=bytes([0x10 if first else 0x00, 0]),
        )
        p._data = bytes([seq & 0xFF])  # type: ignore[attr-defined]
        return p

    order = [*range(1, 68), *range(69, 75), 68, *range(75, 101)]  # 68 lost, at 1 s in
    frames = []
    for seq in order:
        clock[0] += 0.015
        frames.append(buffer.add(packet(seq, 3000, seq == 1))[1])
    clock[0] += 0.015
    pli, frame = buffer.add(packet(101, 6000, True))  # the next frame releases it
    assert frames == [None] * len(order) and not pli
    assert frame is not None and frame.data == bytes(range(1, 101))
    assert not getattr(frame, "incomplete", False) and buffer.gaps_given_up == 0
