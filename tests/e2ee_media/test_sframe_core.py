"""SFrame core behaviour beyond the vectors: malformed input, counters, replay, key usage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2ee_media.cipher_suites import CipherSuite, suite_params
from e2ee_media.context import SFrameContext
from e2ee_media.errors import (
    AuthenticationFailure,
    CounterExhausted,
    KeyUsageError,
    MalformedFrame,
    ReplayedFrame,
    UnknownKeyId,
    UnsupportedCipherSuite,
)
from e2ee_media.header import SFrameHeader, decode_header, encode_header
from e2ee_media.replay import ReplayWindow

BASE_KEY = bytes(range(32))
ALL_SUITES = list(CipherSuite)


def pair(suite: CipherSuite, kid: int = 3, **kwargs: int) -> tuple[SFrameContext, SFrameContext]:
    sender, receiver = SFrameContext(suite, **kwargs), SFrameContext(suite, **kwargs)
    sender.add_send_key(kid, BASE_KEY)
    receiver.add_recv_key(kid, BASE_KEY)
    return sender, receiver


@pytest.mark.parametrize(
    "data, what",
    [
        (b"", "empty"),
        (b"\x88", "KID length 1 but no byte"),
        (b"\xf0" + b"\x01" * 7, "KID length 8 but 7 bytes"),
        (b"\x08", "CTR length 1 but no byte"),
        (b"\x89\x10", "CTR missing after KID"),
        (b"\x80\x05", "KID 5 in extended form"),
        (b"\x90\x00\x09", "KID with a leading zero byte"),
        (b"\x08\x07", "CTR 7 in extended form"),
        (b"\x09\x00\x08", "CTR with a leading zero byte"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, what: str) -> None:
    with pytest.raises(MalformedFrame):
        decode_header(data)


def test_header_trailing_bytes_refused_by_strict_decode() -> None:
    with pytest.raises(MalformedFrame):
        SFrameHeader.decode(encode_header(9, 1) + b"\x00")


def test_header_values_out_of_range() -> None:
    with pytest.raises(ValueError):
        encode_header(1 << 64, 0)
    with pytest.raises(ValueError):
        encode_header(0, -1)


@pytest.mark.parametrize("suite", [0, 6, 0xF000])
def test_unknown_cipher_suite(suite: int) -> None:
    with pytest.raises(UnsupportedCipherSuite, match="not supported"):
        SFrameContext(suite)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [0, 1, 100, 5000, 70000])
def test_roundtrip_every_suite_and_size(suite: CipherSuite, size: int) -> None:
    sender, receiver = pair(suite)
    plaintext = bytes(i % 251 for i in range(size))
    for i in range(10):  # crosses the one-byte CTR boundary (CTR >= 8)
        ct = sender.encrypt(3, b"meta", plaintext)
        assert len(ct) == len(encode_header(3, sender.send_keys[3].next_counter - 1)) + size + (
            suite_params(suite).Nt
        )
        assert plaintext not in bytes(ct) or size < 2
        # bytes, bytearray and memoryview inputs are all accepted
        given = (bytes(ct), bytearray(ct), memoryview(bytes(ct)))[i % 3]
        assert receiver.decrypt(b"meta", given) == plaintext
        assert receiver.recv_keys[3].window.top == sender.send_keys[3].next_counter - 1


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_tampering_fails_authentication(suite: CipherSuite) -> None:
    sender, receiver = pair(suite)
    ct = bytearray(sender.encrypt(3, b"meta", b"hello frame"))
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt(b"metb", bytes(ct))
    ct[-1] ^= 1
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt(b"meta", bytes(ct))
    ct[-1] ^= 1
    ct[2] ^= 0x80
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt(b"meta", bytes(ct))
    ct[2] ^= 0x80
    # Failed attempts did not consume the CTR: the genuine frame still decrypts once.
    assert receiver.decrypt(b"meta", bytes(ct)) == b"hello frame"


def test_ciphertext_shorter_than_tag_is_malformed() -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    ct = sender.encrypt(3, b"", b"")
    with pytest.raises(MalformedFrame):
        receiver.decrypt(b"", ct[:-1])


def test_counter_advances_and_is_never_reused() -> None:
    sender, _ = pair(CipherSuite.AES_128_GCM_SHA256_128)
    headers = [decode_header(sender.encrypt(3, b"", b"x"))[:2] for _ in range(300)]
    assert headers == [(3, ctr) for ctr in range(300)]


def test_encrypt_refused_past_counter_limit() -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128, max_counter=2)
    frames = [sender.encrypt(3, b"", b"x") for _ in range(3)]
    with pytest.raises(CounterExhausted, match="new key"):
        sender.encrypt(3, b"", b"x")
    with pytest.raises(CounterExhausted):
        sender.encrypt(3, b"", b"x")
    assert [receiver.decrypt(b"", f) for f in frames] == [b"x"] * 3


def test_default_counter_limit_is_64_bits() -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    sender.send_keys[3].next_counter = (1 << 64) - 1
    last = sender.encrypt(3, b"", b"x")
    assert decode_header(last)[1] == (1 << 64) - 1
    assert receiver.decrypt(b"", last) == b"x"
    with pytest.raises(CounterExhausted):
        sender.encrypt(3, b"", b"x")


def test_replay_is_refused_and_counted() -> None:
    sender, receiver = pair(CipherSuite.AES_128_CTR_HMAC_SHA256_32)
    frame = sender.encrypt(3, b"", b"x")
    assert receiver.decrypt(b"", frame) == b"x"
    with pytest.raises(ReplayedFrame, match="replayed"):
        receiver.decrypt(b"", frame)
    assert receiver.recv_keys[3].window.refused == 1


def test_reordering_within_window_accepted_too_old_refused() -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128, replay_window=16)
    frames = [sender.encrypt(3, b"", bytes([i])) for i in range(40)]
    assert receiver.decrypt(b"", frames[20]) == bytes([20])
    assert receiver.decrypt(b"", frames[10]) == bytes([10])  # 10 behind: inside the window
    assert receiver.decrypt(b"", frames[5]) == bytes([5])  # 15 behind: last slot of the window
    with pytest.raises(ReplayedFrame, match="too old"):
        receiver.decrypt(b"", frames[4])  # 16 behind
    with pytest.raises(ReplayedFrame, match="replayed"):
        receiver.decrypt(b"", frames[10])
    assert receiver.decrypt(b"", frames[39]) == bytes([39])
    with pytest.raises(ReplayedFrame, match="too old"):
        receiver.decrypt(b"", frames[21])
    assert receiver.decrypt(b"", frames[30]) == bytes([30])
    assert receiver.recv_keys[3].window.refused == 3


def test_unknown_kid() -> None:
    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_send_key(9, BASE_KEY[:16])
    with pytest.raises(UnknownKeyId) as info:
        receiver.decrypt(b"", sender.encrypt(9, b"", b"x"))
    assert info.value.kid == 9 and info.value.reason == "unknown_kid"


def test_key_is_for_sending_or_receiving_never_both() -> None:
    ctx = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128)
    ctx.add_send_key(1, BASE_KEY[:16])
    with pytest.raises(KeyUsageError):
        ctx.add_recv_key(1, BASE_KEY[:16])
    ctx.add_recv_key(2, BASE_KEY[:16])
    with pytest.raises(KeyUsageError):
        ctx.add_send_key(2, BASE_KEY[:16])
    with pytest.raises(KeyUsageError):
        ctx.encrypt(2, b"", b"x")
    ctx.remove_key(1)
    with pytest.raises(KeyUsageError):
        ctx.encrypt(1, b"", b"x")


def test_secrets_not_in_repr() -> None:
    from e2ee_media.cipher_suites import derive_key_salt

    sender, receiver = pair(CipherSuite.AES_128_GCM_SHA256_128)
    text = repr(sender) + repr(sender.send_keys[3]) + repr(receiver.recv_keys[3])
    key, salt = derive_key_salt(sender.params, 3, BASE_KEY)
    for secret in (BASE_KEY, key, salt):
        for form in (secret.hex(), repr(secret), str(int.from_bytes(secret, "big"))):
            assert form not in text
    assert "salt" not in text


def test_resolver_supplies_and_caches_keys() -> None:
    calls: list[int] = []
    sender = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_send_key(42, BASE_KEY[:16])

    def resolve(kid: int):  # type: ignore[no-untyped-def]
        calls.append(kid)
        if kid != 42:
            return None
        from e2ee_media.context import RecvKeyContext

        return RecvKeyContext(receiver.params, kid, BASE_KEY[:16])

    receiver = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128, resolver=resolve)
    assert receiver.decrypt(b"", sender.encrypt(42, b"", b"a")) == b"a"
    assert receiver.decrypt(b"", sender.encrypt(42, b"", b"b")) == b"b"
    assert calls == [42]
    with pytest.raises(UnknownKeyId):
        receiver.decrypt(b"", b"\x70" + bytes(16))


def test_resolved_key_is_kept_only_after_a_frame_authenticates() -> None:
    from e2ee_media.context import RecvKeyContext

    calls: list[int] = []

    def resolve(kid: int) -> RecvKeyContext:
        calls.append(kid)
        return RecvKeyContext(receiver.params, kid, BASE_KEY[:16])

    sender = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128)
    sender.add_send_key(42, BASE_KEY[:16])
    receiver = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128, resolver=resolve)
    frame = bytearray(sender.encrypt(42, b"", b"a"))
    frame[-1] ^= 1
    with pytest.raises(AuthenticationFailure):
        receiver.decrypt(b"", bytes(frame))
    assert receiver.recv_keys == {}
    frame[-1] ^= 1
    assert receiver.decrypt(b"", bytes(frame)) == b"a"
    # Derived once: the forged frame's key was kept aside, unauthenticated.
    assert list(receiver.recv_keys) == [42] and calls == [42]


@pytest.mark.parametrize(
    "setting", [{"replay_window": 0}, {"max_counter": -1}, {"max_counter": 1 << 64}]
)
def test_bad_settings_refused_when_the_context_is_made(setting: dict[str, int]) -> None:
    # Not later, at the first frame, where the error would surface inside aiortc's receive path.
    with pytest.raises(ValueError, match=next(iter(setting))):
        SFrameContext(CipherSuite.AES_128_GCM_SHA256_128, **setting)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_encrypt_into_reused_buffer_matches_encrypt(suite: CipherSuite) -> None:
    sender, receiver = pair(suite)
    twin = SFrameContext(suite)
    twin.add_send_key(3, BASE_KEY)
    buffer = bytearray()
    for size in (5000, 10, 70000, 0):  # grows, then is reused for smaller frames
        plaintext = bytes(size)
        view = twin.encrypt_into(3, b"m", plaintext, buffer)
        assert bytes(view) == bytes(sender.encrypt(3, b"m", plaintext))
        assert receiver.decrypt(b"m", view) == plaintext
        view.release()  # a buffer with a live view cannot grow
    assert len(buffer) >= 70000


def reference_ctr_hmac(
    suite: CipherSuite, key: bytes, nonce: bytes, aad: bytes, pt: bytes
) -> bytes:
    """RFC 9605 §4.5.1 written out directly with pyca CTR mode and stdlib HMAC."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    params = suite_params(suite)
    enc = Cipher(algorithms.AES(key[:16]), modes.CTR(nonce + bytes(4))).encryptor()
    ct = enc.update(pt) + enc.finalize()
    auth = len(aad).to_bytes(8, "big") + len(ct).to_bytes(8, "big") + params.Nt.to_bytes(8, "big")
    tag = hmac.new(key[16:], auth + nonce + aad + ct, hashlib.sha256).digest()[: params.Nt]
    return ct + tag


@pytest.mark.parametrize("suite", ALL_SUITES[:3], ids=lambda s: s.name)
def test_ctr_hmac_matches_reference_for_every_small_length(suite: CipherSuite) -> None:
    from e2ee_media.cipher_suites import Aead

    key, nonce = bytes(range(48)), bytes(range(100, 112))
    aead = Aead(suite_params(suite), key)
    for size in [*range(0, 300), 1000, 5000]:  # both keystream paths and their boundary
        pt = bytes((7 * i) & 0xFF for i in range(size))
        expected = reference_ctr_hmac(suite, key, nonce, b"aad", pt)
        assert aead.seal(nonce, pt, b"aad") == expected
        assert aead.open(nonce, expected, b"aad") == pt


@given(
    st.one_of(
        st.binary(max_size=20),
        st.builds(
            lambda kid, ctr, tail: encode_header(kid, ctr) + tail,
            st.integers(0, (1 << 64) - 1),
            st.integers(0, (1 << 64) - 1),
            st.binary(max_size=20),
        ),
    )
)
def test_decrypt_parses_headers_exactly_like_decode_header(data: bytes) -> None:
    """The inline header parse of the per-frame path agrees with `decode_header` on any input."""
    ctx = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128)
    try:
        kid = decode_header(data)[0]
    except MalformedFrame:
        with pytest.raises(MalformedFrame):
            ctx.decrypt(b"", data)
        return
    with pytest.raises(UnknownKeyId) as info:
        ctx.decrypt(b"", data)
    assert info.value.kid == kid


def test_replay_window_survives_a_huge_jump() -> None:
    window = ReplayWindow(64)
    window.accept(5)
    window.accept((1 << 64) - 1)  # must not build a 2^64-bit bitmap
    assert window.check(5) == "too old"
    assert window.check((1 << 64) - 1) == "replayed"
    assert window.check((1 << 64) - 2) is None


def test_a_kid_gets_one_send_key_in_its_life_in_a_context() -> None:
    # a second key for a KID would count from 0 again: the same nonces (RFC 9605 §9.1)
    ctx = SFrameContext(CipherSuite.AES_128_GCM_SHA256_128)
    ctx.add_send_key(7, BASE_KEY[:16])
    with pytest.raises(KeyUsageError, match="send key already"):
        ctx.add_send_key(7, BASE_KEY[:16])
    ctx.remove_key(7)  # deliberately, with its counter state: a new key is then allowed
    ctx.add_send_key(7, bytes(16))
