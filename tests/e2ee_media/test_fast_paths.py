"""The per-frame fast paths agree with the plain ones: lock-free CTRs, precomputed headers, the
inline header parse and replay window, writing into caller buffers, large frames in transforms."""

from __future__ import annotations

import os
import threading

import pytest

from e2ee_media import buffers
from e2ee_media.cipher_suites import CipherSuite
from e2ee_media.context import LARGE_FRAME, MAX_OVERHEAD, SFrameContext
from e2ee_media.errors import (
    AuthenticationFailure,
    CounterExhausted,
    MalformedFrame,
    ReplayedFrame,
    UnknownKeyId,
)
from e2ee_media.header import decode_header, encode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor, FrameEncryptor
from tests.e2ee_media.fake_mls import FakeGroup, FakeWorld

BASE_KEY = bytes(range(32))
ALL_SUITES = list(CipherSuite)
# Frame sizes on both sides of every size-dependent branch (_LARGE_OPEN = 4096, LARGE_FRAME).
SIZES = [0, 1, 4095, 4096, LARGE_FRAME - 1, LARGE_FRAME, 100_000]


def pair(suite: CipherSuite, kid: int = 0x53, **kwargs: int) -> tuple[SFrameContext, SFrameContext]:
    sender, receiver = SFrameContext(suite, **kwargs), SFrameContext(suite, **kwargs)
    sender.add_send_key(kid, BASE_KEY)
    receiver.add_recv_key(kid, BASE_KEY)
    return sender, receiver


@pytest.mark.parametrize(
    "ctr", [0, 7, 8, 255, 256, 65535, 65536, (1 << 24) - 1, 1 << 24, (1 << 64) - 1]
)
def test_headers_at_every_ctr_length_boundary(ctr: int) -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    sender.send_keys[0x53].next_counter = ctr
    frame = sender.encrypt(0x53, b"m", b"payload")
    header = encode_header(0x53, ctr)
    assert bytes(frame[: len(header)]) == header
    assert receiver.decrypt(b"m", frame) == b"payload"
    assert receiver.recv_keys[0x53].window.top == ctr


def test_next_counter_reads_and_sets() -> None:
    sender, _ = pair(CipherSuite.AES_128_GCM_SHA256_128)
    key = sender.send_keys[0x53]
    assert key.next_counter == 0
    sender.encrypt(0x53, b"", b"x")
    assert key.next_counter == 1
    key.next_counter = 1000
    assert decode_header(sender.encrypt(0x53, b"", b"x"))[1] == 1000
    assert key.next_counter == 1001
    for used in (-1, 0, 1000):  # a CTR already used (or impossible) would reuse a nonce
        with pytest.raises(ValueError, match="reuse a nonce"):
            key.next_counter = used
    key.next_counter = 1001
    assert decode_header(sender.encrypt(0x53, b"", b"x"))[1] == 1001


@pytest.mark.parametrize("limit", [0, 5, 255, 256, 300])
def test_counter_limit_below_and_above_the_precomputed_headers(limit: int) -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128, max_counter=limit)
    frames = [sender.encrypt(0x53, b"", bytes([i & 0xFF])) for i in range(limit + 1)]
    with pytest.raises(CounterExhausted):
        sender.encrypt(0x53, b"", b"x")
    with pytest.raises(CounterExhausted):
        sender.encrypt_into(0x53, b"", b"x", bytearray())
    assert [decode_header(f)[1] for f in frames] == list(range(limit + 1))
    assert receiver.decrypt(b"", frames[-1]) == bytes([limit & 0xFF])


def test_threads_never_share_a_ctr() -> None:
    sender, _ = pair(CipherSuite.AES_128_GCM_SHA256_128)
    per_thread, threads = 2000, 4
    seen: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def run(out: list[int]) -> None:
        start.wait()
        for _ in range(per_thread):
            out.append(decode_header(sender.encrypt(0x53, b"", b"x"))[1])

    workers = [threading.Thread(target=run, args=(seen[i],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ctrs = [ctr for out in seen for ctr in out]
    assert sorted(ctrs) == list(range(per_thread * threads))


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("size", SIZES)
def test_encrypt_paths_agree_and_open_both_ways(suite: CipherSuite, size: int) -> None:
    """`encrypt` (either size branch), `encrypt_at` into an uninitialized buffer at an offset,
    `decrypt` and `decrypt_into`: the same bytes, and each opens the others' output."""
    plaintext = os.urandom(size)
    sender, receiver = pair(suite)
    twin, twin_receiver = pair(suite)
    frame = sender.encrypt(0x53, b"meta", plaintext)
    out = buffers.uninitialized(5 + size + MAX_OVERHEAD)
    out[:5] = b"clear"
    end = twin.send_keys[0x53].encrypt_at(b"meta", plaintext, out, 5)
    assert bytes(out[5:end]) == bytes(frame)
    assert receiver.decrypt(b"meta", frame) == plaintext
    into = buffers.uninitialized(3 + size)
    into[:3] = b"pre"
    stop = twin_receiver.decrypt_into(b"meta", memoryview(out)[5:end], into, 3)
    assert stop == 3 + size and bytes(into[:stop]) == b"pre" + plaintext


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_buffers_grow_when_too_short(suite: CipherSuite) -> None:
    sender, receiver = pair(suite)
    out = bytearray(b"ab")
    end = sender.send_keys[0x53].encrypt_at(b"", b"hello", out, 2)
    assert len(out) == end and out[:2] == b"ab"
    plain = bytearray()
    assert receiver.decrypt_into(b"", out[2:], plain, 0) == 5 and plain == b"hello"


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_decrypt_into_refuses_like_decrypt(suite: CipherSuite) -> None:
    sender, receiver = pair(suite)
    frame = bytes(sender.encrypt(0x53, b"m", bytes(LARGE_FRAME)))
    out = bytearray()
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt_into(b"x", frame, out)
    tampered = bytearray(frame)
    tampered[-1] ^= 1
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt_into(b"m", tampered, out)
    with pytest.raises(MalformedFrame):
        receiver.decrypt_into(b"m", frame[:4], out)
    with pytest.raises(UnknownKeyId):
        receiver.decrypt_into(b"m", encode_header(9, 0) + bytes(20), out)
    assert receiver.decrypt_into(b"m", frame, out) == LARGE_FRAME
    with pytest.raises(ReplayedFrame):
        receiver.decrypt_into(b"m", frame, out)
    with pytest.raises(ReplayedFrame):
        receiver.decrypt(b"m", frame)  # one window for both entry points


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_large_decrypt_refuses_tampering_and_keeps_its_window(suite: CipherSuite) -> None:
    """`decrypt` opens large frames into a fresh buffer: a forged one raises, moves nothing and
    leaves the genuine frame acceptable."""
    sender, receiver = pair(suite)
    plaintext = os.urandom(LARGE_FRAME + 7)
    frame = bytes(sender.encrypt(0x53, b"m", plaintext))
    tampered = bytearray(frame)
    tampered[len(tampered) // 2] ^= 1
    for bad_meta, bad_frame in ((b"m", tampered), (b"x", frame)):
        with pytest.raises(AuthenticationFailure):
            receiver.decrypt(bad_meta, bad_frame)
    opened = receiver.decrypt(b"m", frame)
    assert opened == plaintext and len(opened) == len(plaintext)
    with pytest.raises(ReplayedFrame):
        receiver.decrypt(b"m", frame)


@pytest.mark.parametrize(
    "header",
    [
        b"\x80\x05",  # 1-byte KID below 8
        b"\x90\x00\x09",  # 2-byte KID with a leading zero
        b"\x88\x53\x07",  # 1-byte CTR below 8
        b"\x89\x53\x00\xff",  # 2-byte CTR with a leading zero
        b"\x8a\x53\x00\x01\x00",  # 3-byte CTR with a leading zero
        b"\x89\x53\x01",  # truncated 2-byte CTR
    ],
)
def test_inline_parse_refuses_non_minimal_and_truncated_headers(header: bytes) -> None:
    _, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    with pytest.raises(MalformedFrame):
        receiver.decrypt(b"", header + bytes(16))
    with pytest.raises(MalformedFrame):
        receiver.decrypt_into(b"", header + bytes(16), bytearray())


def test_replay_window_inline_path_matches_accept() -> None:
    """Frames opened in a shuffled order: the window the inline path leaves behind equals one
    built with `ReplayWindow.accept` alone."""
    from e2ee_media.replay import ReplayWindow

    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128, replay_window=32)
    frames = [sender.encrypt(0x53, b"", bytes([i])) for i in range(200)]
    # In order past the window size (the bitmap must stay `size` bits), gaps, jumps, stragglers.
    order = [*range(0, 40), 45, 43, 44, 41, 10, 100, 99, 70, 101, 199, 180, 170, 150, 198]
    reference = ReplayWindow(32)
    for ctr in order:
        if reference.check(ctr) is None:
            reference.accept(ctr)
            assert receiver.decrypt(b"", frames[ctr]) == bytes([ctr])
        else:
            with pytest.raises(ReplayedFrame):
                receiver.decrypt(b"", frames[ctr])
        window = receiver.recv_keys[0x53].window
        assert (window.top, window.seen) == (reference.top, reference.seen)


def test_uninitialized_buffers() -> None:
    buf = buffers.uninitialized(100_000)
    assert type(buf) is bytearray and len(buf) == 100_000
    buf[:3] = b"abc"
    del buf[3:]
    assert buf == b"abc"
    # CPython: the zero fill is skipped (ctypes is part of the standard library here).
    assert buffers.AVAILABLE


def test_zero_filled_fallback_gives_the_same_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    plaintext = os.urandom(LARGE_FRAME + 100)
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    twin, _ = pair(CipherSuite.AES_128_GCM_SHA256_128)
    fast = sender.encrypt(0x53, b"m", plaintext)
    monkeypatch.setattr(buffers, "_new", None)
    assert buffers.uninitialized(4) == bytearray(4)
    assert twin.encrypt(0x53, b"m", plaintext) == fast
    assert receiver.decrypt(b"m", fast) == plaintext


class PlainKeys:
    """`FrameKeys` with only encrypt/decrypt: the transforms' copying paths."""

    def __init__(self, keys: MLSKeyManager) -> None:
        self.keys = keys

    def encrypt(self, metadata: bytes, plaintext: bytes, context: int = 0) -> bytes | bytearray:
        return self.keys.encrypt(metadata, plaintext, context)

    def decrypt(self, metadata: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        return self.keys.decrypt(metadata, ciphertext)


@pytest.mark.parametrize("size", [LARGE_FRAME - 1, LARGE_FRAME, 100_000])
@pytest.mark.parametrize("keyframe", [True, False])
def test_large_vp8_frames_through_both_transform_paths(size: int, keyframe: bool) -> None:
    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    tag = bytes([0x50, 0x42, 0x00, 0x9D, 0x01, 0x2A, 0xA0, 0x00, 0x78, 0x00])
    frame = (tag if keyframe else bytes([0x31, 0x0A, 0x00])) + os.urandom(size)
    prefix = 10 if keyframe else 3
    fast_enc = FrameEncryptor(alice, "video/vp8", context=1)
    plain_enc = FrameEncryptor(PlainKeys(alice), "video/vp8", context=2)
    fast_dec, plain_dec = FrameDecryptor(bob), FrameDecryptor(PlainKeys(bob))
    for encryptor in (fast_enc, plain_enc):
        wires = [encryptor.encrypt_frame(frame) for _ in range(3)]
        for wire in wires:
            assert bytes(wire[:prefix]) == frame[:prefix]
            assert frame[prefix:][:32] not in bytes(wire)
            # header + body + 16-byte tag behind the clear prefix
            assert len(wire) == len(frame) + decode_header(wire[prefix:])[2] + 16
        for decryptor, wire in ((fast_dec, wires[0]), (plain_dec, wires[2])):
            tampered = bytearray(wire)
            tampered[prefix - 1] ^= 0x40  # the clear prefix is authenticated
            with pytest.raises(AuthenticationFailure):
                decryptor.decrypt_frame(bytes(tampered), "video/vp8")
        assert fast_dec.decrypt_frame(bytes(wires[0]), "video/vp8") == frame
        assert plain_dec.decrypt_frame(bytes(wires[1]), "video/vp8") == frame
    assert fast_enc.stats.frames_encrypted == plain_enc.stats.frames_encrypted == 3
    for decryptor in (fast_dec, plain_dec):
        assert decryptor.stats.frames_decrypted == 2
        assert decryptor.stats.failures["authentication"] == 2


def test_large_vp8_keyframe_through_aiortc_packetizer_and_decoder_input() -> None:
    """A 100 KB keyframe takes the buffer paths on both sides; aiortc's packetizer accepts the
    bytearray, and the decrypted frame is a valid `av.Packet` input."""
    import av
    from aiortc.codecs.vpx import Vp8Encoder, vp8_depayload

    world = FakeWorld(members={0, 1})
    alice, bob = MLSKeyManager(), MLSKeyManager()
    alice.update(FakeGroup(world, 0))
    bob.update(FakeGroup(world, 1))
    frame = bytes([0x50, 0x42, 0x00, 0x9D, 0x01, 0x2A, 0xA0, 0x00, 0x78, 0x00]) + os.urandom(
        100_000
    )
    wire = FrameEncryptor(alice, "video/vp8", context=1).encrypt_frame(frame)
    assert isinstance(wire, bytearray)
    payloads = Vp8Encoder._packetize(wire, picture_id=5)  # type: ignore[arg-type]
    assert all(type(p) is bytes for p in payloads) and len(payloads) > 50
    received = b"".join(vp8_depayload(p) for p in payloads)
    assert received == wire
    plaintext = FrameDecryptor(bob).decrypt_frame(received, "video/vp8")
    assert isinstance(plaintext, bytearray) and plaintext == frame
    assert bytes(av.Packet(plaintext)) == frame
