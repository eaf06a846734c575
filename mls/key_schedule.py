"""The epoch key schedule (RFC 9420 §8, §8.3-§8.7) and the Welcome key and nonce (§12.4.3.1).

Inputs are bytes: the previous epoch's `init_secret`, the `commit_secret`, the `psk_secret` (or
None for the all-zero vector) and the *encoded* GroupContext of the new epoch, so this module does
not depend on the wire structs.

    init_secret_[n-1] --Extract(salt)--(commit_secret)--> ExpandWithLabel("joiner", GC) = joiner
    joiner --Extract(salt)--(psk_secret)--> member_prk
        member_prk --DeriveSecret("welcome")--> welcome_secret
        member_prk --ExpandWithLabel("epoch", GC)--> epoch_secret --DeriveSecret(label)--> ...

`EpochSecrets` holds one epoch's secrets. The epoch_secret itself is never kept: §9.2 lets it go
once the table 4 secrets are derived. A consumer that has taken what it needs (the secret tree its
`encryption_secret`, a committer its `joiner_secret` after building Welcomes) calls `delete()`;
reading a deleted secret raises `SecretReuseError` rather than returning stale bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from .crypto import Crypto
from .errors import CryptoError, DecodeError, SecretReuseError
from .tls import Reader, Writer, decode_all, encode_with

__all__ = [
    "EXTERNAL_INIT_LABEL",
    "EpochSecrets",
    "derive_epoch_secret",
    "derive_joiner_secret",
    "derive_welcome_secret",
    "external_init_receive",
    "external_init_send",
    "mls_exporter",
    "derive_psk_secret",
    "welcome_key_and_nonce",
]

# §8.3: the HPKE exporter label of the external init secret (used verbatim, already prefixed).
EXTERNAL_INIT_LABEL = b"MLS 1.0 external init secret"

# Table 4 of §8: attribute name -> DeriveSecret label.
EPOCH_DERIVED_LABELS: dict[str, bytes] = {
    "sender_data_secret": b"sender data",
    "encryption_secret": b"encryption",
    "exporter_secret": b"exporter",
    "external_secret": b"external",
    "confirmation_key": b"confirm",
    "membership_key": b"membership",
    "resumption_psk": b"resumption",
    "epoch_authenticator": b"authentication",
}


def _zero(crypto: Crypto) -> bytes:
    return bytes(crypto.hash_length)


def _check_length(crypto: Crypto, name: str, value: bytes) -> None:
    if len(value) != crypto.hash_length:
        raise CryptoError(f"{name} must be KDF.Nh = {crypto.hash_length} bytes, got {len(value)}")


def derive_joiner_secret(
    crypto: Crypto, init_secret: bytes, commit_secret: bytes, group_context: bytes
) -> bytes:
    """joiner_secret = ExpandWithLabel(Extract(init_secret, commit_secret), "joiner", GC, Nh)."""
    prk = crypto.kdf_extract(init_secret, commit_secret)
    return crypto.expand_with_label(prk, b"joiner", group_context, crypto.hash_length)


def _member_prk(crypto: Crypto, joiner_secret: bytes, psk_secret: bytes | None) -> bytes:
    return crypto.kdf_extract(joiner_secret, _zero(crypto) if psk_secret is None else psk_secret)


def derive_welcome_secret(crypto: Crypto, joiner_secret: bytes, psk_secret: bytes | None) -> bytes:
    """welcome_secret = DeriveSecret(Extract(joiner_secret, psk_secret or 0), "welcome")."""
    return crypto.derive_secret(_member_prk(crypto, joiner_secret, psk_secret), b"welcome")


def derive_epoch_secret(
    crypto: Crypto, joiner_secret: bytes, psk_secret: bytes | None, group_context: bytes
) -> bytes:
    """epoch_secret = ExpandWithLabel(Extract(joiner_secret, psk_secret or 0), "epoch", GC, Nh)."""
    prk = _member_prk(crypto, joiner_secret, psk_secret)
    return crypto.expand_with_label(prk, b"epoch", group_context, crypto.hash_length)


def welcome_key_and_nonce(crypto: Crypto, welcome_secret: bytes) -> tuple[bytes, bytes]:
    """(welcome_key, welcome_nonce) that encrypt the GroupInfo of a Welcome (§12.4.3.1)."""
    key = crypto.expand_with_label(welcome_secret, b"key", b"", crypto.aead_key_length)
    nonce = crypto.expand_with_label(welcome_secret, b"nonce", b"", crypto.aead_nonce_length)
    return key, nonce


def mls_exporter(
    crypto: Crypto, exporter_secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """MLS-Exporter(Label, Context, Length) (§8.5); `label` without the "MLS 1.0 " prefix."""
    return crypto.expand_with_label(
        crypto.derive_secret(exporter_secret, label), b"exported", crypto.hash(context), length
    )


def derive_psk_secret(crypto: Crypto, psks: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The psk_secret of §8.4 from (encoded PreSharedKeyID, psk) pairs, in Commit order.

    No PSKs gives the all-zero vector, as §8.4 specifies.
    """
    count = len(psks)
    if count > 0xFFFF:
        raise CryptoError(f"{count} PSKs exceed the uint16 count of PSKLabel")
    zero = _zero(crypto)
    secret = zero
    for index, (psk_id, psk) in enumerate(psks):
        psk_extracted = crypto.kdf_extract(zero, psk)
        psk_label = psk_id + struct.pack(">HH", index, count)  # PSKLabel {id, index, count}
        psk_input = crypto.expand_with_label(
            psk_extracted, b"derived psk", psk_label, crypto.hash_length
        )
        secret = crypto.kdf_extract(psk_input, secret)
    return secret


def external_init_send(crypto: Crypto, external_pub: bytes) -> tuple[bytes, bytes]:
    """A joiner's (kem_output, init_secret) for an external commit (§8.3)."""
    return crypto.hpke_export_send(external_pub, b"", EXTERNAL_INIT_LABEL, crypto.hash_length)


def external_init_receive(crypto: Crypto, external_priv: bytes, kem_output: bytes) -> bytes:
    """The init_secret a member recovers from an ExternalInit proposal's kem_output (§8.3)."""
    return crypto.hpke_export_receive(
        external_priv, kem_output, b"", EXTERNAL_INIT_LABEL, crypto.hash_length
    )


class _Secret:
    """A secret attribute of `EpochSecrets`; reading it after `delete()` raises."""

    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> bytes:
        if obj is None:
            return self  # type: ignore[return-value]
        try:
            return obj._secrets[self.name]  # type: ignore[no-any-return]
        except KeyError:
            raise SecretReuseError(
                f"{self.name} of this epoch was deleted after use (RFC 9420 §9.2) or never derived"
            ) from None


class EpochSecrets:
    """The secrets of one epoch (§8, table 4), plus joiner/welcome secrets when derived here.

    Build with `from_init_secret` (members processing or creating a Commit), `from_joiner_secret`
    (new members joining by Welcome) or `from_epoch_secret`. `repr()` never shows secret values.
    """

    __slots__ = ("crypto", "_secrets")

    joiner_secret = _Secret()
    welcome_secret = _Secret()
    sender_data_secret = _Secret()
    encryption_secret = _Secret()
    exporter_secret = _Secret()
    external_secret = _Secret()
    confirmation_key = _Secret()
    membership_key = _Secret()
    resumption_psk = _Secret()
    epoch_authenticator = _Secret()
    init_secret = _Secret()  # init_secret_[n], the input of the next epoch

    def __init__(self, crypto: Crypto, secrets: dict[str, bytes]) -> None:
        self.crypto = crypto
        self._secrets = dict(secrets)

    @classmethod
    def from_epoch_secret(
        cls, crypto: Crypto, epoch_secret: bytes, **extra: bytes
    ) -> EpochSecrets:
        """Derive table 4's secrets and the next init_secret from epoch_secret."""
        _check_length(crypto, "epoch_secret", epoch_secret)
        secrets = {
            name: crypto.derive_secret(epoch_secret, label)
            for name, label in EPOCH_DERIVED_LABELS.items()
        }
        secrets["init_secret"] = crypto.derive_secret(epoch_secret, b"init")
        secrets.update(extra)
        return cls(crypto, secrets)

    @classmethod
    def from_joiner_secret(
        cls,
        crypto: Crypto,
        joiner_secret: bytes,
        group_context: bytes,
        psk_secret: bytes | None = None,
    ) -> EpochSecrets:
        """The epoch's secrets from joiner_secret (as a new member gets it in GroupSecrets)."""
        _check_length(crypto, "joiner_secret", joiner_secret)
        if psk_secret is not None:
            _check_length(crypto, "psk_secret", psk_secret)
        member_prk = _member_prk(crypto, joiner_secret, psk_secret)
        welcome_secret = crypto.derive_secret(member_prk, b"welcome")
        epoch_secret = crypto.expand_with_label(
            member_prk, b"epoch", group_context, crypto.hash_length
        )
        return cls.from_epoch_secret(
            crypto, epoch_secret, joiner_secret=joiner_secret, welcome_secret=welcome_secret
        )

    @classmethod
    def from_init_secret(
        cls,
        crypto: Crypto,
        init_secret: bytes,
        commit_secret: bytes,
        group_context: bytes,
        psk_secret: bytes | None = None,
    ) -> EpochSecrets:
        """The full §8 chain from the previous epoch's init_secret (or a fresh or external one).

        `commit_secret` is the all-zero vector when the Commit has no path (§12.4).
        """
        _check_length(crypto, "init_secret", init_secret)
        _check_length(crypto, "commit_secret", commit_secret)
        joiner_secret = derive_joiner_secret(crypto, init_secret, commit_secret, group_context)
        return cls.from_joiner_secret(crypto, joiner_secret, group_context, psk_secret)

    def __repr__(self) -> str:
        return f"EpochSecrets({self.crypto.suite.name}, holds={sorted(self._secrets)})"

    def has(self, name: str) -> bool:
        return name in self._secrets

    def delete(self, *names: str) -> None:
        """Forget secrets no longer needed (§9.2); later reads raise SecretReuseError."""
        for name in names:
            if not isinstance(getattr(type(self), name, None), _Secret):
                raise AttributeError(f"EpochSecrets has no secret named {name!r}")
            self._secrets.pop(name, None)

    def delete_all(self, keep: Iterable[str] = ()) -> None:
        """Forget every secret except `keep` (e.g. when the epoch is superseded)."""
        kept = set(keep)
        for name in list(self._secrets):
            if name not in kept:
                del self._secrets[name]

    def subset(self, *names: str) -> EpochSecrets:
        """A copy holding only `names` (e.g. what a GroupInfo built later needs), so that
        deleting this object's secrets does not reach into the copy's."""
        return EpochSecrets(self.crypto, {n: getattr(self, n) for n in names})

    def write(self, w: Writer) -> None:
        """The secrets still held, as (name, value) pairs. The result holds secrets."""
        w.vector(
            sorted(self._secrets.items()),
            lambda w2, kv: (w2.opaque(kv[0].encode()), w2.opaque(kv[1])),
        )

    @classmethod
    def read(cls, r: Reader, crypto: Crypto) -> EpochSecrets:
        """Secrets saved by `write`."""

        def read_item(s: Reader) -> tuple[str, bytes]:
            name = s.opaque("secret.name").decode("ascii", "replace")
            if not isinstance(getattr(cls, name, None), _Secret):
                raise DecodeError(f"unknown epoch secret {name!r}", "secret.name")
            return name, s.opaque("secret.value")

        return cls(crypto, dict(r.vector(read_item, "state.secrets")))

    def to_bytes(self) -> bytes:
        return encode_with(self.write)

    @classmethod
    def from_bytes(cls, data: bytes, crypto: Crypto) -> EpochSecrets:
        return decode_all(data, lambda r: cls.read(r, crypto), "EpochSecrets")

    def export(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter(label, context, length) of this epoch (§8.5)."""
        return mls_exporter(self.crypto, self.exporter_secret, label, context, length)

    def welcome_key_and_nonce(self) -> tuple[bytes, bytes]:
        """The Welcome GroupInfo key and nonce (§12.4.3.1)."""
        return welcome_key_and_nonce(self.crypto, self.welcome_secret)

    def external_key_pair(self) -> tuple[bytes, bytes]:
        """(external_priv, external_pub) = KEM.DeriveKeyPair(external_secret) (§8)."""
        return self.crypto.derive_key_pair(self.external_secret)

    @property
    def external_pub(self) -> bytes:
        return self.external_key_pair()[1]

    def confirmation_tag(self, confirmed_transcript_hash: bytes) -> bytes:
        """MAC(confirmation_key, confirmed_transcript_hash) (§6.1)."""
        return self.crypto.mac(self.confirmation_key, confirmed_transcript_hash)
