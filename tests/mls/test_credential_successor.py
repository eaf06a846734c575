"""§5.3.1: which credential may replace a member's (Update, UpdatePath, external resync)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from mls.credential import Credential
from mls.errors import ValidationError
from mls.leaf_validation import check_credential_successor


def _certificate(subject: str, san: str | None = None) -> bytes:
    """A self-signed end-entity certificate, a fresh key each time (as a renewal has)."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(san)]), critical=False
        )
    cert = builder.sign(key, None)
    return cert.public_bytes(serialization.Encoding.DER)


def test_basic_credentials_must_name_the_same_identity() -> None:
    check_credential_successor(Credential.basic(b"alice"), Credential.basic(b"alice"), "leaf 0")
    with pytest.raises(ValidationError, match="leaf 0: the credential names another identity"):
        check_credential_successor(Credential.basic(b"alice"), Credential.basic(b"bob"), "leaf 0")


def test_a_renewed_certificate_succeeds_another_subjects_does_not() -> None:
    old = Credential.x509([_certificate("alice", "alice@example.org")])
    renewed = Credential.x509([_certificate("alice", "alice@example.org")])
    assert old != renewed
    check_credential_successor(old, renewed, "leaf 1")
    for other in (
        Credential.x509([_certificate("bob", "alice@example.org")]),
        Credential.x509([_certificate("alice", "bob@example.org")]),
        Credential.x509([_certificate("alice")]),
    ):
        with pytest.raises(ValidationError, match="another subject"):
            check_credential_successor(old, other, "leaf 1")


def test_the_credential_type_cannot_change_and_bad_certificates_are_refused() -> None:
    with pytest.raises(ValidationError, match="credential type"):
        check_credential_successor(
            Credential.basic(b"alice"), Credential.x509([_certificate("alice")]), "leaf 2"
        )
    good = Credential.x509([_certificate("alice")])
    for bad in (Credential.x509([]), Credential.x509([b"not a certificate"])):
        with pytest.raises(ValidationError, match="unreadable certificate"):
            check_credential_successor(good, bad, "leaf 2")




def test_a_certificate_cryptography_cannot_read_is_a_validation_error() -> None:
    """Two SubjectAlternativeName extensions: cryptography raises its own DuplicateExtension
    when the extensions are read, which must come out as the MLS error, not past it."""
    der = _certificate("alice", "alice@example.org")
    der = x509.load_der_x509_certificate(der)
    key = ed25519.Ed25519PrivateKey.generate()
    builder = (
        x509.CertificateBuilder()
        .subject_name(der.subject)
        .issuer_name(der.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(der.not_valid_before_utc)
        .not_valid_after(der.not_valid_after_utc)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("a@x")]), critical=False)
        .add_extension(x509.IssuerAlternativeName([x509.RFC822Name("a@x")]), critical=False)
    )
    raw = builder.sign(key, None).public_bytes(serialization.Encoding.DER)
    ian = bytes([0x06, 0x03, 0x55, 0x1D, 0x12])  # the OID of IssuerAlternativeName ...
    i = raw.index(ian)
    bad = raw[:i] + bytes([0x06, 0x03, 0x55, 0x1D, 0x11]) + raw[i + 5 :]  # ... made a 2nd SAN
    with pytest.raises(ValidationError, match="unreadable certificate"):
        check_credential_successor(
            Credential.x509([_certificate("alice")]), Credential.x509([bad]), "leaf 3"
        )
