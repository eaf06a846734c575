"""Codec-aware frame transforms, without a network: prefixes, H.264 escaping, counters, and the
round trip through aiortc's own packetizers and depacketizers."""

from __future__ import annotations

import os

import pytest
from aiortc.codecs.h264 import H264Encoder, h264_depayload
from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload
from hypothesis import given
from hypothesis import strategies as st

from e2ee_media.codecs import (
    H264,
    OPUS,
    VP8,
    clear_prefix_length,
    escape_emulation,
    split_annex_b,
    unescape_emulation,
    vp8_is_keyframe,
)
from e2ee_media.errors import (
    AuthenticationFailure,
    MalformedFrame,
    ReplayedFrame,
    SFrameError,
    UnknownKeyId,
)
from e2ee_media.header import decode_header, encode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import MAX_HELD, FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import Clock, FakeGroup, FakeWorld

# A VP8 keyframe starts with a frame tag whose bit 0 is 0, then the start code 9d 01 2a.
VP8_KEYFRAME = bytes([0x50, 0x42, 0x00, 0x9D, 0x01, 0x2A, 0xA0, 0x00, 0x78, 0x00]) + os.urandom(
    3000
)
VP8_DELTA = bytes([0x31, 0x0A, 0x00]) + os.urandom(400)
OPUS_FRAME = bytes([0x78]) + os.urandom(80)


def pair() -> tuple[MLSKeyManager, MLSKeyManager]:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    return alice, bob


@pytest.mark.parametrize(
    "mime, frame, prefix",
    [(VP8, VP8_KEYFRAME, 10), (VP8, VP8_DELTA, 3), (OPUS, OPUS_FRAME, 1), ("audio/pcmu", b"ab", 0)],
)
def test_clear_prefix_is_kept_and_authenticated(mime: str, frame: bytes, prefix: int) -> None:
    alice, bob = pair()
    encryptor, decryptor = FrameEncryptor(alice, mime, context=2), FrameDecryptor(bob)
    wire = encryptor.encrypt_frame(frame)
    assert wire[:prefix] == frame[:prefix]
    kid, ctr, _ = decode_header(wire[prefix:])
    assert (kid, ctr) == (alice.send_kid(2), 0)
    assert frame[prefix:][:16] not in wire
    assert decryptor.decrypt_frame(wire, mime) == frame
    if prefix:
        tampered = bytearray(encryptor.encrypt_frame(frame))
        tampered[prefix - 1] ^= 0x40  # a bit an SFU might want to flip
        with pytest.raises(AuthenticationFailure):
            decryptor.decrypt_frame(bytes(tampered), mime)
    assert decryptor.stats.as_dict() == {
        "frames_encrypted": 0,
        "frames_decrypted": 1,
        "frames_held": 0,
        "frames_lost": 0,
        "frames_dropped_at_stop": 0,
        "encrypt_failures": 0,
        "failed_unknown_kid": 0,
        "failed_replay": 0,
        "failed_authentication": 1 if prefix else 0,
        "failed_malformed": 0,
        "failed_wrong_sender": 0,
    }
    assert encryptor.stats.frames_encrypted == (2 if prefix else 1)


def test_vp8_keyframe_bit_is_readable_by_an_sfu() -> None:
    alice, _ = pair()
    encryptor = FrameEncryptor(alice, VP8)
    assert vp8_is_keyframe(encryptor.encrypt_frame(VP8_KEYFRAME))
    assert not vp8_is_keyframe(encryptor.encrypt_frame(VP8_DELTA))


def test_flipping_the_keyframe_bit_fails_authentication() -> None:
    alice, bob = pair()
    wire = bytearray(FrameEncryptor(alice, VP8).encrypt_frame(VP8_DELTA))
    wire[0] &= 0xFE  # claims keyframe: the receiver now reads a 10-byte prefix
    decryptor = FrameDecryptor(bob)
    with pytest.raises(SFrameError):  # which check trips depends on the bytes now read as header
        decryptor.decrypt_frame(bytes(wire), VP8)
    wire[0] |= 0x01
    assert decryptor.decrypt_frame(bytes(wire), VP8) == VP8_DELTA


def test_failures_are_counted_by_reason() -> None:
    alice, bob = pair()
    encryptor, decryptor = FrameEncryptor(alice, OPUS), FrameDecryptor(bob)
    wire = encryptor.encrypt_frame(OPUS_FRAME)
    decryptor.decrypt_frame(wire, OPUS)
    with pytest.raises(ReplayedFrame):
        decryptor.decrypt_frame(wire, OPUS)
    with pytest.raises(MalformedFrame):
        decryptor.decrypt_frame(b"", OPUS)
    with pytest.raises(MalformedFrame):
        decryptor.decrypt_frame(wire[:3], OPUS)
    stranger = FrameDecryptor(MLSKeyManager())
    with pytest.raises(UnknownKeyId):
        stranger.decrypt_frame(wire, OPUS)
    assert decryptor.stats.failures == {"replay": 1, "malformed": 2}
    assert stranger.stats.failures == {"unknown_kid": 1}


def test_short_frames_refused_on_send() -> None:
    alice, _ = pair()
    encryptor = FrameEncryptor(alice, VP8)
    with pytest.raises(MalformedFrame):
        encryptor.encrypt_frame(b"\x50\x42\x00\x9d")  # keyframe tag but 4 bytes
    with pytest.raises(MalformedFrame):
        encryptor.encrypt_frame(b"")
    assert encryptor.stats.encrypt_failures == 2
    assert clear_prefix_length(OPUS, b"\x01") == 1


@given(st.binary(max_size=200))
def test_emulation_escaping_roundtrip(data: bytes) -> None:
    escaped = escape_emulation(data)
    for forbidden in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
        assert forbidden not in escaped
    assert unescape_emulation(escaped) == data


def test_escape_examples() -> None:
    assert escape_emulation(b"\x00\x00\x00\x00\x01") == b"\x00\x00\x03\x00\x00\x03\x01"
    assert escape_emulation(b"\x00\x00\x04") == b"\x00\x00\x04"
    assert escape_emulation(b"\x00\x00\x03") == b"\x00\x00\x03\x03"


def test_split_annex_b() -> None:
    stream = b"\x00\x00\x00\x01\x67ab\x00\x00\x01\x68c\x00\x00\x00\x01\x65def"
    assert list(split_annex_b(stream)) == [b"\x67ab", b"\x68c", b"\x65def"]


def test_vp8_survives_aiortc_packetizer() -> None:
    alice, bob = pair()
    wire = FrameEncryptor(alice, VP8).encrypt_frame(VP8_KEYFRAME)
    payloads = Vp8Encoder._packetize(wire, picture_id=77)
    assert len(payloads) > 1
    assert b"".join(vp8_depayload(p) for p in payloads) == wire
    assert FrameDecryptor(bob).decrypt_frame(wire, VP8) == VP8_KEYFRAME


def test_h264_survives_aiortc_packetizer() -> None:
    alice, bob = pair()
    # SPS, PPS and a large IDR slice whose body is full of start-code look-alikes.
    nals = [b"\x67" + os.urandom(12), b"\x68" + os.urandom(4), b"\x65" + b"\x00\x00\x01" * 1500]
    encrypted = FrameEncryptor(alice, H264).encrypt_nal_units(nals)
    assert [n[0] for n in encrypted] == [0x67, 0x68, 0x65]
    assert all(b"\x00\x00\x01" not in n and n[-1] == 0x80 for n in encrypted)
    payloads = H264Encoder._packetize(encrypted)
    # aiortc's depayloader rebuilds an Annex-B stream per packet; the jitter buffer concatenates.
    stream = b"".join(h264_depayload(p) for p in payloads)
    assert FrameDecryptor(bob).decrypt_frame(stream, H264) == b"".join(
        b"\x00\x00\x00\x01" + n for n in nals
    )


def test_frames_of_the_next_epoch_wait_for_its_keys_in_order() -> None:
    world = FakeWorld(members={0, 1})
    alice_group, bob_group = FakeGroup(world, 0), FakeGroup(world, 1)
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(alice_group)
    bob.update(bob_group)
    clock = Clock()
    encryptor = FrameEncryptor(alice, OPUS)
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    frames = [encryptor.encrypt_frame(b"\x78old%d" % i) for i in range(2)]
    world.commit()
    alice_group.sync()
    alice.update(alice_group)  # Alice is ahead: Bob has not processed the commit yet
    frames += [encryptor.encrypt_frame(b"\x78new%d" % i) for i in range(3)]

    assert decryptor.push("f0", frames[0], OPUS) == [("f0", b"\x78old0")]
    assert decryptor.push("f2", frames[2], OPUS) == []  # next epoch: held
    # Alice's last frame of the old epoch, late: it opens, so it need not wait
    assert decryptor.push("f1", frames[1], OPUS) == [("f1", b"\x78old1")]
    assert decryptor.push("f3", frames[3], OPUS) == []  # next epoch, behind f2
    clock.now = 0.3
    bob_group.sync()
    bob.update(bob_group)
    assert decryptor.push("f4", frames[4], OPUS) == [
        ("f2", b"\x78new0"),
        ("f3", b"\x78new1"),
        ("f4", b"\x78new2"),
    ]
    assert decryptor.waiting == 0
    assert sum(decryptor.stats.failures.values()) == 0
    assert decryptor.stats.frames_decrypted == 5
    assert decryptor.stats.frames_held == 2


def test_a_forged_next_epoch_header_delays_only_itself() -> None:
    # The KID is unauthenticated until the keys come: a path that slips in a frame under the
    # next epoch's KID (no key needed) must not hold the track's real frames behind it.
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    clock = Clock()
    encryptor = FrameEncryptor(alice, OPUS)
    decryptor = FrameDecryptor(bob, holdback=0.5, clock=clock)
    next_kid = alice.kid(0, 1, bob.current.index_bits)  # alice's KID of epoch 1
    forged = b"\x78" + encode_header(next_kid, 0) + bytes(16)
    for i in range(10):
        assert decryptor.push(("forged", i), forged, OPUS) == []
        genuine = encryptor.encrypt_frame(b"\x78frame%d" % i)
        assert decryptor.push(i, genuine, OPUS) == [(i, b"\x78frame%d" % i)]
        clock.now += 0.1
    # the forged ones wait out their holdback, at most MAX_HELD at a time, and then fail
    assert 0 < decryptor.waiting <= MAX_HELD
    assert decryptor.stats.frames_decrypted == 10
    clock.now += 1.0
    assert decryptor.drain() == []
    assert decryptor.waiting == 0
    assert decryptor.stats.failures["unknown_kid"] == 10


def test_waiting_frames_are_bounded() -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    decryptor = FrameDecryptor(bob, holdback=60.0, clock=Clock())
    forged = b"\x78" + encode_header(alice.kid(0, 1, bob.current.index_bits), 0) + bytes(16)
    for i in range(MAX_HELD + 5):
        decryptor.push(i, forged, OPUS)
    assert decryptor.waiting == MAX_HELD
    assert decryptor.stats.failures["unknown_kid"] == 5
    assert decryptor.stats.frames_held == MAX_HELD + 5


def test_held_frames_are_dropped_after_the_holdback() -> None:
    world = FakeWorld(members={0, 1})
    alice_group = FakeGroup(world, 0)
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(alice_group)
    bob.update(FakeGroup(world, 1))
    world.commit()
    alice_group.sync()
    alice.update(alice_group)
    clock = Clock()
    failures: list[str] = []
    decryptor = FrameDecryptor(
        bob, holdback=0.5, clock=clock, on_failure=lambda exc: failures.append(exc.reason)
    )
    encryptor = FrameEncryptor(alice, OPUS)
    assert decryptor.push(1, encryptor.encrypt_frame(b"\x78a"), OPUS) == []
    clock.now = 0.6
    assert decryptor.push(2, encryptor.encrypt_frame(b"\x78b"), OPUS) == []
    assert failures == ["unknown_kid"]
    assert decryptor.drain() == [] and decryptor.waiting == 1


def test_unrelated_unknown_kids_are_not_held() -> None:
    alice, _ = pair()
    stranger = FrameDecryptor(MLSKeyManager(), holdback=5.0)
    frame = FrameEncryptor(alice, OPUS).encrypt_frame(b"\x78x")
    assert stranger.push(1, frame, OPUS) == []
    assert stranger.waiting == 0 and stranger.stats.failures == {"unknown_kid": 1}


@pytest.mark.parametrize("mime", ["video/VP8", "audio/OPUS", "video/H264"])
def test_mime_types_are_case_insensitive_on_both_sides(mime: str) -> None:
    # aiortc spells them "video/VP8", "audio/opus", "video/H264".
    alice, bob = pair()
    encryptor, decryptor = FrameEncryptor(alice, mime), FrameDecryptor(bob)
    if mime == "video/H264":
        nal, start = b"\x65" + os.urandom(40), b"\x00\x00\x00\x01"
        frames = [(start + encryptor.encrypt_nal_units([nal])[0], start + nal) for _ in range(2)]
    else:
        frame = VP8_DELTA if "vp8" in mime.lower() else OPUS_FRAME
        frames = [(bytes(encryptor.encrypt_frame(frame)), frame) for _ in range(2)]
    assert decryptor.decrypt_frame(frames[0][0], mime) == frames[0][1]
    assert decryptor.push("x", frames[1][0], mime) == [("x", frames[1][1])]
    assert sum(decryptor.stats.failures.values()) == 0


def test_on_decrypted_sees_each_frame_that_decrypted_and_no_other() -> None:
    alice, bob = pair()
    seen: list[tuple[bytes, str]] = []
    decryptor = FrameDecryptor(bob, on_decrypted=lambda data, mime: seen.append((data, mime)))
    encryptor = FrameEncryptor(alice, OPUS)
    first, second = encryptor.encrypt_frame(b"\x78a"), encryptor.encrypt_frame(b"\x78b")
    assert decryptor.decrypt_frame(first, "AUDIO/OPUS") == b"\x78a"
    assert decryptor.push(7, second, OPUS) == [(7, b"\x78b")]
    tampered = bytearray(encryptor.encrypt_frame(b"\x78c"))
    tampered[-1] ^= 1
    with pytest.raises(SFrameError):
        decryptor.decrypt_frame(bytes(tampered), OPUS)
    assert decryptor.push(8, bytes(tampered), OPUS) == []
    assert seen == [(first, OPUS.lower()), (second, OPUS.lower())]
    assert decryptor.stats.frames_decrypted == 2


def _annex_b(nals: list[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + n for n in nals)


@pytest.mark.parametrize("suite", [1, 4])  # AES-CTR/HMAC and AES-GCM
def test_an_h264_frame_refused_part_way_uses_none_of_its_ctrs(suite: int) -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(suite), MLSKeyManager(suite)
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    while True:
        nals = [b"\x67SPS", b"\x68PPS", b"\x65" + os.urandom(200)]
        sealed = FrameEncryptor(alice, H264).encrypt_nal_units(nals)
        # Without its stop byte, a NAL whose escaped tag ends in 0x80 (1 in 256) still reads
        # as stopped, and fails authentication instead: not the case below.
        if sealed[2][-2] != 0x80:
            break
    genuine = _annex_b(sealed)
    corrupt = bytearray(sealed[2])
    corrupt[-5] ^= 1
    decryptor = FrameDecryptor(bob)
    for bad, error in [
        (_annex_b([*sealed[:2], bytes(corrupt)]), AuthenticationFailure),  # last NAL forged
        (_annex_b([*sealed[:2], sealed[2][:-1]]), MalformedFrame),  # last NAL without stop byte
        (_annex_b([sealed[0], sealed[1], sealed[0]]), ReplayedFrame),  # a NAL twice
    ]:
        with pytest.raises(error):
            decryptor.decrypt_frame(bad, H264)
        assert bob.sframe.recv_keys == {}  # no key kept, no CTR used
    assert decryptor.decrypt_frame(genuine, H264) == _annex_b(nals)
    with pytest.raises(ReplayedFrame):
        decryptor.decrypt_frame(genuine, H264)


def test_the_nal_units_of_an_h264_frame_cannot_be_dropped_reordered_or_moved() -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    encryptor = FrameEncryptor(alice, H264, context=1)
    a = encryptor.encrypt_nal_units([b"\x67SPS", b"\x68PPS", b"\x65slice-A-1", b"\x65slice-A-2"])
    b = encryptor.encrypt_nal_units([b"\x41slice-B-1", b"\x41slice-B-2"])
    decryptor = FrameDecryptor(bob, holdback=0)
    for spliced in [
        [a[0], a[1], a[2]],  # the last slice dropped
        [a[1], a[0], a[2], a[3]],  # reordered
        [a[0], a[1], a[3], a[2]],
        [b[0], a[3]],  # a slice moved into another frame of the same length
        [a[3], b[1], b[0]],
    ]:
        with pytest.raises(AuthenticationFailure):
            decryptor.decrypt_frame(_annex_b(spliced), H264)
    assert bob.sframe.recv_keys == {}  # no CTR used up by the refused frames
    assert decryptor.decrypt_frame(_annex_b(a), H264) == _annex_b(
        [b"\x67SPS", b"\x68PPS", b"\x65slice-A-1", b"\x65slice-A-2"]
    )
    assert decryptor.decrypt_frame(_annex_b(b), H264) == _annex_b(
        [b"\x41slice-B-1", b"\x41slice-B-2"]
    )


def test_an_h264_frame_sealed_across_an_epoch_change_waits_whole() -> None:
    # The encoder thread may seal a frame's first NAL units under one epoch and the rest under
    # the next; a receiver one commit behind holds it until the commit reaches it.
    clock = Clock(100.0)
    world = FakeWorld(members={0, 1})
    a, alice = FakeGroup(world, 0), MLSKeyManager(clock=clock)
    b, bob = FakeGroup(world, 1), MLSKeyManager(clock=clock)
    alice.update(a)
    bob.update(b)
    encryptor = FrameEncryptor(alice, H264)

    def nals():  # type: ignore[no-untyped-def]
        yield b"\x67SPS"
        world.commit()
        a.sync()
        alice.update(a)
        yield b"\x65IDR"

    decryptor = FrameDecryptor(bob, clock=clock)
    assert decryptor.push("frame", _annex_b(encryptor.encrypt_nal_units(nals())), H264) == []
    b.sync()
    bob.update(b)
    assert decryptor.drain() == [("frame", _annex_b([b"\x67SPS", b"\x65IDR"]))]
    assert not decryptor.stats.failures
