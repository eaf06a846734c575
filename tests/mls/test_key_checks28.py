"""Signature public keys that are no keys (RFC 8032 §5.1.3, §5.2.3; SEC 1 for ECDSA), and the
one place such a key entered a group unchecked: the external_senders extension (§12.1.8.1).
OpenSSL takes any 32 or 57 bytes as an EdDSA public key and decodes it only when verifying."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import mls.proposal_list
from mls.client import Client
from mls.credential import Credential
from mls.crypto import (
    CipherSuite,
    SignatureScheme,
    _ed448_decodes,
    _ed25519_decodes,
    get_crypto,
    is_valid_public_key,
    signature_key_problem,
    signature_public_key_length,
)
from mls.errors import ValidationError
from mls.extensions import Extension, ExternalSender, external_senders_extension
from mls.group import Group
from mls.proposals import GroupContextExtensions, Proposal
from mls.public_group import PublicGroup

from .test_group import make_group, snapshot

P25519 = 2**255 - 19
P448 = 2**448 - 2**224 - 1
ED25519, ED448 = SignatureScheme.ed25519, SignatureScheme.ed448


def _ed25519(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


def _ed448(y: int, sign: int = 0) -> bytes:
    return (y | sign << 455).to_bytes(57, "little")


def _has_x_25519(y: int) -> bool:
    """An independent oracle: x^2 = (y^2 - 1) / (d y^2 + 1) has a root (Euler's criterion)."""
    p, d = P25519, -121665 * pow(121666, -1, P25519) % P25519
    x2 = (y * y - 1) * pow(d * y * y + 1, -1, p) % p
    return x2 == 0 or pow(x2, (p - 1) // 2, p) == 1


def _has_x_448(y: int) -> bool:
    p, d = P448, -39081 % P448
    x2 = (y * y - 1) * pow(d * y * y - 1, -1, p) % p
    return x2 == 0 or pow(x2, (p - 1) // 2, p) == 1


# y with no x on the curve (checked against the oracle below), either sign bit.
NO_X = [_ed25519(2), _ed25519(7, 1), _ed448(2), _ed448(6, 1)]
# y >= p, though y - p is a point's y (the RFC refuses the non-canonical encoding).
NOT_REDUCED = [_ed25519(P25519 + 3), _ed25519(P25519 + 18, 1), _ed448(P448 + 3),
               _ed448(P448 + 19, 1)]
BAD_EDDSA = NO_X + NOT_REDUCED


def _scheme(key: bytes) -> SignatureScheme:
    return ED25519 if len(key) == 32 else ED448


def test_the_vectors_are_what_they_say() -> None:
    assert not _has_x_25519(2) and not _has_x_25519(7)
    assert not _has_x_448(2) and not _has_x_448(6)
    assert _has_x_25519(3) and _has_x_25519(18) and _has_x_448(3) and _has_x_448(19)


@pytest.mark.parametrize("key", BAD_EDDSA, ids=[
    f"{curve}-{why}" for why in ("no-x", "y>=p") for curve in ("25519", "25519-sign", "448", "448-sign")
])
def test_eddsa_keys_that_decode_to_no_point_are_refused(key: bytes) -> None:
    assert not is_valid_public_key(_scheme(key), key)
    assert signature_key_problem(_scheme(key), key) == (
        f"not the encoding of a point of the {_scheme(key).name} curve")
    # the suite's scheme, given the suite
    suite = CipherSuite(1) if len(key) == 32 else CipherSuite(4)
    assert not is_valid_public_key(suite, key)


def test_bits_448_to_454_of_an_ed448_key_are_refused() -> None:
    real = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
    assert is_valid_public_key(ED448, real)
    for bit in range(7):
        bad = real[:56] + bytes([real[56] | 1 << bit])
        assert not is_valid_public_key(ED448, bad)


def test_x_zero_with_the_sign_bit_set_does_not_decode() -> None:
    # x = 0 only for y = +-1, points of small order (refused as such by is_valid_public_key):
    # the decoders refuse the sign bit 1 on their own too, as RFC 8032 says.
    for y in (1, P25519 - 1):
        assert _ed25519_decodes(_ed25519(y)) and not _ed25519_decodes(_ed25519(y, 1))
        assert signature_key_problem(ED25519, _ed25519(y, 1)) is not None
    for y in (1, P448 - 1):
        assert _ed448_decodes(_ed448(y)) and not _ed448_decodes(_ed448(y, 1))
        assert signature_key_problem(ED448, _ed448(y, 1)) is not None


def test_wrong_lengths_are_refused() -> None:
    for key in (b"", bytes(31), os.urandom(33)):
        assert signature_key_problem(ED25519, key) == f"{len(key)} bytes, not the 32 of an ed25519 key"
    for key in (os.urandom(56), os.urandom(58)):
        assert not is_valid_public_key(ED448, key)


def test_the_decoders_agree_with_the_oracle_on_random_ys() -> None:
    for _ in range(200):
        y = int.from_bytes(os.urandom(32), "little") % P25519
        assert _ed25519_decodes(_ed25519(y)) == _has_x_25519(y)
        y = int.from_bytes(os.urandom(56), "little") % P448
        assert _ed448_decodes(_ed448(y)) == _has_x_448(y)


def _real_keys() -> Iterator[tuple[SignatureScheme, bytes]]:
    for _ in range(50):
        yield ED25519, ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        yield ED448, ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
    curves = {SignatureScheme.ecdsa_secp256r1_sha256: ec.SECP256R1(),
              SignatureScheme.ecdsa_secp384r1_sha384: ec.SECP384R1(),
              SignatureScheme.ecdsa_secp521r1_sha512: ec.SECP521R1()}
    for scheme, curve in curves.items():
        for _ in range(5):
            public = ec.generate_private_key(curve).public_key()
            yield scheme, public.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def test_real_keys_are_taken() -> None:
    for scheme, key in _real_keys():
        assert signature_key_problem(scheme, key) is None, (scheme, key.hex())


def test_ecdsa_points_off_the_curve_or_compressed_are_refused() -> None:
    p256 = SignatureScheme.ecdsa_secp256r1_sha256
    real = ec.generate_private_key(ec.SECP256R1()).public_key()
    compressed = real.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    uncompressed = real.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    off_curve = uncompressed[:-1] + bytes([uncompressed[-1] ^ 1])
    for key in (compressed, off_curve, b"\x04" + bytes(64), b""):
        assert signature_key_problem(p256, key) == (
            "not an uncompressed point of the ecdsa_secp256r1_sha256 curve")


# -- external senders (§12.1.8.1)

SMALL_ORDER = bytes(32)  # y = 0: of order 4
BAD_SENDER_KEYS = [
    (NO_X[0], "not the encoding of a point of the ed25519 curve"),
    (NOT_REDUCED[0], "not the encoding of a point of the ed25519 curve"),
    (SMALL_ORDER, "a point of small order"),
    (bytes(57), "57 bytes, not the 32 of an ed25519 key"),  # an Ed448 key in an Ed25519 group
]


def _senders(key: bytes) -> list[ExternalSender]:
    good = Client(b"ds").signature_key
    return [ExternalSender(good, Credential.basic(b"ds")),
            ExternalSender(key, Credential.basic(b"bad"))]


def _ext(key: bytes) -> Extension:
    return external_senders_extension(_senders(key))


@pytest.mark.parametrize(("key", "says"), BAD_SENDER_KEYS, ids=["no-x", "y>=p", "small", "length"])
def test_a_group_is_not_created_with_a_bad_external_sender(key: bytes, says: str) -> None:
    # Before: created, the key in the GroupContext.
    with pytest.raises(ValidationError, match=f"external sender 1's signature key is no "
                       f"ed25519 public key: {says}"):
        Group.create(Client(b"alice"), extensions=[_ext(key)])


@pytest.mark.parametrize("suite", [4, 2])
def test_other_suites_check_their_own_scheme(suite: int) -> None:
    alice = Client(b"alice", suite)
    real = Client(b"ds", suite).signature_key
    bad = NO_X[2] if suite == 4 else real[:-1] + bytes([real[-1] ^ 1])
    with pytest.raises(ValidationError, match="external sender 0's signature key"):
        Group.create(alice, extensions=[
            external_senders_extension([ExternalSender(bad, Credential.basic(b"ds"))])])
    Group.create(alice, extensions=[
        external_senders_extension([ExternalSender(real, Credential.basic(b"ds"))])])


def test_a_group_context_extensions_commit_with_a_bad_external_sender_is_refused() -> None:
    ga, gb = make_group(2)
    observer = PublicGroup.from_group_info(ga.group_info())
    proposal = Proposal(GroupContextExtensions([_ext(NO_X[0])]))
    before = snapshot(ga)
    with pytest.raises(ValidationError, match="external sender 1's signature key"):
        ga.commit([proposal])
    assert snapshot(ga) == before
    # A committer without the check: the members refuse its commit, their state unchanged.
    check = mls.proposal_list.signature_key_problem
    mls.proposal_list.signature_key_problem = lambda scheme, key: None  # type: ignore[assignment]
    try:
        commit = ga.commit([proposal]).commit
    finally:
        mls.proposal_list.signature_key_problem = check
    before_b, before_observer = snapshot(gb), observer.group_context
    with pytest.raises(ValidationError, match="external sender 1's signature key"):
        gb.process(commit)
    with pytest.raises(ValidationError, match="external sender 1's signature key"):
        observer.process(commit)
    assert snapshot(gb) == before_b and observer.group_context == before_observer
    # A good list still goes through.
    ga.discard_pending_commit()
    good = Proposal(GroupContextExtensions([_ext(Client(b"ds2").signature_key)]))
    gb.process(ga.commit([good]).commit)
    ga.merge_pending_commit()
    assert gb.group_context == ga.group_context


def test_a_welcome_or_group_info_with_a_bad_external_sender_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    # A creator without the check.
    with monkeypatch.context() as m:
        m.setattr(mls.proposal_list, "signature_key_problem", lambda scheme, key: None)
        ga = Group.create(alice, extensions=[_ext(NO_X[0])])
        welcome = ga.add([bob.key_package()]).welcome
        ga.merge_pending_commit()
        group_info = ga.group_info()
    assert welcome is not None
    says = "external sender 1's signature key is no ed25519 public key"
    with pytest.raises(ValidationError, match=says):
        Group.join(bob, welcome)
    with pytest.raises(ValidationError, match=says):
        PublicGroup.from_group_info(group_info)
    with pytest.raises(ValidationError, match=says):
        Group.join_external(Client(b"carol"), group_info)


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: s.name)
def test_signature_public_key_length_is_that_of_the_keys_the_suite_makes(
    suite: CipherSuite,
) -> None:
    public = get_crypto(suite).signature_key_pair()[1]
    assert signature_public_key_length(suite) == len(public)
    assert signature_key_problem(suite, public) is None
    assert signature_key_problem(suite, public + b"\0") is not None  # one byte too many
