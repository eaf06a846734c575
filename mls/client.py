"""An MLS client (RFC 9420 §5.3, §10): an identity, a signature key, and its KeyPackages.

A `Client` holds what outlives any one group: the basic credential, the signature key pair, and the
private keys (init and leaf encryption keys) of the KeyPackages it has published but not yet used to
join. `to_bytes()` / `from_bytes()` persist all of it, private keys included, so callers must store
the result as a secret.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .credential import Credential
from .crypto import CipherSuite, Crypto, SignaturePrivateKey, get_crypto
from .errors import DecodeError, ValidationError
from .group_context import ProtocolVersion
from .key_package import Capabilities, KeyPackage, LeafNode, LeafNodeSource, Lifetime
from .tls import Reader, Writer

__all__ = ["Client", "KeyPackagePrivate", "default_capabilities"]

_CLIENT_FORMAT_VERSION = 1
_MAGIC = b"MLSC"
# How long a KeyPackage this client makes stays valid (§10.1: the lifetime should be bounded).
KEY_PACKAGE_LIFETIME = 90 * 24 * 3600
# Clock skew tolerated for not_before.
_CLOCK_SKEW = 3600
# The longest total lifetime of a KeyPackage leaf that Conclave's clients and service accept
# (§7.2: "Applications MUST define a maximum total lifetime"; `Group(max_lifetime=...)`): this
# client's own (90 days and the skew) with room for a client that makes somewhat longer ones.
MAX_LEAF_LIFETIME = 120 * 24 * 3600


def default_capabilities(cipher_suite: int) -> Capabilities:
    """Everything this implementation supports; default extension and proposal types are implied
    (§7.2) and so not listed."""
    return Capabilities(
        versions=[ProtocolVersion.mls10],
        cipher_suites=[int(s) for s in CipherSuite],
        extensions=[],
        proposals=[],
        credentials=[1],
    )


@dataclass(slots=True)
class KeyPackagePrivate:
    """The private half of a published KeyPackage."""

    key_package: bytes = field(repr=False)  # encoded KeyPackage (not secret, but long)
    init_priv: bytes = field(repr=False)
    encryption_priv: bytes = field(repr=False)


class Client:
    """A member identity: `Client(identity, cipher_suite)` generates a fresh signature key."""

    def __init__(
        self,
        identity: bytes,
        cipher_suite: int | CipherSuite = 1,
        *,
        signature_priv: bytes | None = None,
        credential: Credential | None = None,
    ) -> None:
        self.cipher_suite = CipherSuite(get_crypto(cipher_suite).suite)
        self.identity = bytes(identity)
        self.credential = credential or Credential.basic(self.identity)
        crypto = self.crypto
        if signature_priv is None:
            signature_priv, _ = crypto.signature_key_pair()
        self._signature_priv = signature_priv
        # Parsed once: parsing an ECDSA or EdDSA key costs about as much as a signature, and
        # a member signs every message it sends.
        self._signing_key = crypto.load_signature_private_key(signature_priv)
        self.signature_key = crypto.signature_public_key(self._signing_key)
        # KeyPackageRef -> private keys of KeyPackages not yet consumed by a join.
        self._key_packages: dict[bytes, KeyPackagePrivate] = {}

    def __repr__(self) -> str:
        return f"Client(identity={self.identity!r}, cipher_suite={self.cipher_suite.name})"

    @property
    def crypto(self) -> Crypto:
        return get_crypto(self.cipher_suite)

    @property
    def signature_priv(self) -> bytes:
        """The encoded signature private key (e.g. for a delivery-service login)."""
        return self._signature_priv

    @property
    def signing_key(self) -> SignaturePrivateKey:
        """The signature private key, parsed: what the group code signs with."""
        return self._signing_key

    def capabilities(self) -> Capabilities:
        return default_capabilities(self.cipher_suite)

    # --- KeyPackages (§10) -----------------------------------------------------------------------

    def key_package(self, lifetime: int = KEY_PACKAGE_LIFETIME) -> bytes:
        """A fresh KeyPackage wrapped in an MLSMessage; its private keys stay with the client."""
        from .framing import MLSMessage  # framing imports more of the library; keep import cheap

        kp, private = self.make_key_package(lifetime)
        ref = self.crypto.make_key_package_ref(private.key_package)
        self._key_packages[ref] = private
        return MLSMessage(kp).encode()

    def make_key_package(
        self, lifetime: int = KEY_PACKAGE_LIFETIME
    ) -> tuple[KeyPackage, KeyPackagePrivate]:
        """A signed KeyPackage and its private keys, not registered with the client."""
        crypto = self.crypto
        init_priv, init_pub = crypto.hpke_key_pair()
        enc_priv, enc_pub = crypto.hpke_key_pair()
        leaf = self.leaf_node(enc_pub, lifetime)
        leaf.signature = crypto.sign_with_label(self._signing_key, b"LeafNodeTBS", leaf.tbs())
        kp = KeyPackage(cipher_suite=int(self.cipher_suite), init_key=init_pub, leaf_node=leaf)
        kp.signature = crypto.sign_with_label(self._signing_key, b"KeyPackageTBS", kp.tbs())
        return kp, KeyPackagePrivate(kp.encode(), init_priv, enc_priv)

    def leaf_node(self, encryption_key: bytes, lifetime: int = KEY_PACKAGE_LIFETIME) -> LeafNode:
        """An unsigned LeafNode of this client (source key_package, §7.2) valid from now (less
        the tolerated clock skew) for `lifetime` seconds."""
        now = int(time.time())
        return LeafNode(
            encryption_key=encryption_key,
            signature_key=self.signature_key,
            credential=self.credential,
            capabilities=self.capabilities(),
            leaf_node_source=LeafNodeSource.key_package,
            lifetime=Lifetime(now - _CLOCK_SKEW, now + lifetime),
        )

    def add_key_package_private(self, private: KeyPackagePrivate) -> bytes:
        """Registers the private keys of a KeyPackage made elsewhere; returns its reference."""
        ref = self.crypto.make_key_package_ref(private.key_package)
        self._key_packages[ref] = private
        return ref

    def find_key_package(self, ref: bytes) -> KeyPackagePrivate | None:
        return self._key_packages.get(ref)

    def key_package_refs(self) -> list[bytes]:
        return list(self._key_packages)

    def consume_key_package(self, ref: bytes) -> None:
        """Deletes a KeyPackage's private keys once it has been used to join (§10, §16.8)."""
        self._key_packages.pop(ref, None)

    # --- persistence -----------------------------------------------------------------------------

    def to_bytes(self, *, key_packages: bool = True) -> bytes:
        """The client with its private keys, versioned. Store it as a secret.

        `key_packages=False` leaves out the private keys of its unused KeyPackages: what a
        saved group keeps of its client, so that a KeyPackage used (and consumed) later does not
        survive in an older blob (§16.8: delete the init key's private key once used)."""
        w = Writer()
        w.raw(_MAGIC)
        w.uint16(_CLIENT_FORMAT_VERSION)
        w.uint16(self.cipher_suite)
        w.opaque(self.identity)
        self.credential.write(w)
        w.opaque(self._signature_priv)
        items = list(self._key_packages.items()) if key_packages else []

        def write_item(w2: Writer, item: tuple[bytes, KeyPackagePrivate]) -> None:
            ref, priv = item
            w2.opaque(ref)
            w2.opaque(priv.key_package)
            w2.opaque(priv.init_priv)
            w2.opaque(priv.encryption_priv)

        w.vector(items, write_item)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Client:
        r = Reader(data)
        if r.raw(4, "Client.magic") != _MAGIC:
            raise DecodeError("not a serialised mls.Client", "Client.magic")
        version = r.uint16("Client.format_version")
        if version != _CLIENT_FORMAT_VERSION:
            raise DecodeError(
                f"client state format {version} is not supported (expected "
                f"{_CLIENT_FORMAT_VERSION})",
                "Client.format_version",
            )
        suite = r.uint16("Client.cipher_suite")
        identity = r.opaque("Client.identity")
        credential = Credential.read(r)
        signature_priv = r.opaque("Client.signature_priv")

        def read_item(r2: Reader) -> tuple[bytes, KeyPackagePrivate]:
            ref = r2.opaque("Client.key_package_ref")
            return ref, KeyPackagePrivate(
                r2.opaque("Client.key_package"),
                r2.opaque("Client.init_priv"),
                r2.opaque("Client.encryption_priv"),
            )

        items = r.vector(read_item, "Client.key_packages")
        r.finish("Client")
        try:
            client = cls(identity, suite, signature_priv=signature_priv, credential=credential)
        except ValueError as exc:
            raise ValidationError(f"invalid client state: {exc}") from None
        client._key_packages = dict(items)
        return client
