"""RFC 9420 §6.1-§6.3 message protection: message-protection.json, tampering, state on failure."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mls.commit import Commit
from mls.crypto import CipherSuite, get_crypto
from mls.errors import CryptoError, DecodeError, SecretReuseError, ValidationError
from mls.framing import (
    AuthenticatedContent,
    ContentType,
    FramedContent,
    FramedContentTBS,
    MLSMessage,
    PrivateContentAAD,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
    SenderDataAAD,
    WireFormat,
)
from mls.group_context import GroupContext
from mls.message_protection import (
    decrypt_private,
    framed_content_tbs,
    membership_tag,
    protect_private,
    protect_public,
    sender_data_key_nonce,
    sign_framed_content,
    unprotect_private,
    unprotect_public,
)
from mls.proposals import ExternalInit, Proposal, Remove
from mls.secret_tree import RatchetType, SecretTree
from tests.vectors import vector_cases

SENDER = 1  # FORMATS.md: the member with LeafIndex 1 sends every message of the vectors.


def _framed(
    case: dict[str, Any], kind: str, raw: bytes, authenticated_data: bytes = b""
) -> FramedContent:
    group_id = bytes.fromhex(case["group_id"])
    sender = Sender.member(SENDER)
    if kind == "proposal":
        return FramedContent(
            group_id,
            case["epoch"],
            sender,
            authenticated_data,
            ContentType.proposal,
            proposal=Proposal.decode(raw),
        )
    if kind == "commit":
        return FramedContent(
            group_id,
            case["epoch"],
            sender,
            authenticated_data,
            ContentType.commit,
            commit=Commit.decode(raw),
        )
    return FramedContent(
        group_id,
        case["epoch"],
        sender,
        authenticated_data,
        ContentType.application,
        application_data=raw,
    )


def _body(content: FramedContent) -> bytes:
    if content.content_type == ContentType.proposal:
        assert content.proposal is not None
        return content.proposal.encode()
    if content.content_type == ContentType.commit:
        assert content.commit is not None
        return content.commit.encode()
    assert content.application_data is not None
    return content.application_data


def _roundtrip(message: PublicMessage | PrivateMessage) -> Any:
    """Through the wire: MLSMessage encode, decode."""
    return MLSMessage.decode(MLSMessage(message).encode()).body


@pytest.mark.parametrize("case", vector_cases("mls/message-protection.json"))
def test_message_protection_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    context = GroupContext(
        cipher_suite=case["cipher_suite"],
        group_id=bytes.fromhex(case["group_id"]),
        epoch=case["epoch"],
        tree_hash=bytes.fromhex(case["tree_hash"]),
        confirmed_transcript_hash=bytes.fromhex(case["confirmed_transcript_hash"]),
        extensions=[],
    )
    context_bytes = context.encode()
    # The P-521 case gives a 65-byte private key (a leading zero octet dropped); restore the
    # fixed-width Field-Element-to-Octet-String encoding FORMATS.md specifies.
    key_size = len(crypto.signature_key_pair()[0])
    sig_priv = bytes.fromhex(case["signature_priv"]).rjust(key_size, b"\0")
    sig_pub = bytes.fromhex(case["signature_pub"])
    encryption_secret = bytes.fromhex(case["encryption_secret"])
    sender_data_secret = bytes.fromhex(case["sender_data_secret"])
    membership_key = bytes.fromhex(case["membership_key"])

    def signature_key_for(leaf: int) -> bytes | None:
        return sig_pub if leaf == SENDER else None

    def unprotect_priv(message: PrivateMessage) -> AuthenticatedContent:
        tree = SecretTree(crypto, encryption_secret, 2)
        return unprotect_private(
            crypto, message, context, tree, sender_data_secret, signature_key_for
        )

    for kind in ("proposal", "commit", "application"):
        raw = bytes.fromhex(case[kind])
        confirmation_tag = None

        if kind != "application":
            wire = bytes.fromhex(case[f"{kind}_pub"])
            message = MLSMessage.decode(wire)
            assert message.encode() == wire
            ac = unprotect_public(crypto, message.public_message, context, sig_pub, membership_key)
            assert ac.content.sender == Sender.member(SENDER)
            assert ac.content.content_type == ContentType[kind]
            assert _body(ac.content) == raw
            confirmation_tag = ac.auth.confirmation_tag
            assert (confirmation_tag is not None) == (kind == "commit")

        # The given PrivateMessage decrypts and verifies to the raw value.
        wire = bytes.fromhex(case[f"{kind}_priv"])
        message = MLSMessage.decode(wire)
        assert message.encode() == wire
        ac = unprotect_priv(message.private_message)
        assert ac.wire_format == WireFormat.mls_private_message
        assert ac.content.sender == Sender.member(SENDER)
        assert ac.content.content_type == ContentType[kind]
        assert _body(ac.content) == raw
        if kind == "commit":
            confirmation_tag = ac.auth.confirmation_tag
            assert confirmation_tag is not None

        # Our own PublicMessage: signed, tagged, verifies with the vector's keys.
        content = _framed(case, kind, raw)
        signed = sign_framed_content(
            crypto, WireFormat.mls_public_message, content, sig_priv, context
        )
        signed.auth.confirmation_tag = confirmation_tag
        if kind == "application":
            with pytest.raises(ValidationError, match="PrivateMessage"):
                protect_public(crypto, signed, context, membership_key)
        else:
            public = _roundtrip(protect_public(crypto, signed, context_bytes, membership_key))
            ac = unprotect_public(crypto, public, context, sig_pub, membership_key)
            assert _body(ac.content) == raw
            assert ac == signed

        # Our own PrivateMessage: sender's and receiver's trees both start from the vector's.
        content = _framed(case, kind, raw)
        signed = sign_framed_content(
            crypto, WireFormat.mls_private_message, content, sig_priv, context_bytes
        )
        signed.auth.confirmation_tag = confirmation_tag
        sender_tree = SecretTree(crypto, encryption_secret, 2)
        private = _roundtrip(protect_private(crypto, signed, sender_tree, sender_data_secret))
        ac = unprotect_priv(private)
        assert _body(ac.content) == raw
        assert ac == signed


# --- tampering and state on failure -------------------------------------------------------------

SUITE = CipherSuite(1)
SENDER_DATA_SECRET = bytes(range(32, 64))
MEMBERSHIP_KEY = bytes(range(64, 96))


def _encryption_secret(suite: CipherSuite) -> bytes:
    return bytes(range(get_crypto(suite).hash_length))


ENCRYPTION_SECRET = _encryption_secret(SUITE)


class Group:
    """Two members' view of one epoch (leaf 0 receives from leaf 1)."""

    def __init__(self, suite: CipherSuite = SUITE) -> None:
        self.crypto = get_crypto(suite)
        self.sig_priv, self.sig_pub = self.crypto.signature_key_pair()
        self.context = GroupContext(suite, b"group", 7, b"\x01" * 32, b"\x02" * 32, [])
        self.sender_tree = SecretTree(self.crypto, _encryption_secret(suite), 2)
        self.receiver_tree = SecretTree(self.crypto, _encryption_secret(suite), 2)

    def content(
        self, content_type: ContentType = ContentType.application, data: bytes = b"hello"
    ) -> FramedContent:
        if content_type == ContentType.application:
            return FramedContent(
                b"group", 7, Sender.member(SENDER), b"ad", content_type, application_data=data
            )
        if content_type == ContentType.proposal:
            return FramedContent(
                b"group", 7, Sender.member(SENDER), b"", content_type, proposal=Proposal(Remove(0))
            )
        return FramedContent(b"group", 7, Sender.member(SENDER), b"", content_type, commit=Commit())

    def signed(
        self, content: FramedContent, wire_format: WireFormat = WireFormat.mls_private_message
    ) -> AuthenticatedContent:
        ac = sign_framed_content(self.crypto, wire_format, content, self.sig_priv, self.context)
        if content.content_type == ContentType.commit:
            ac.auth.confirmation_tag = b"\x03" * 32
        return ac

    def private(self, content: FramedContent | None = None, **kwargs: Any) -> PrivateMessage:
        ac = self.signed(content or self.content())
        return protect_private(self.crypto, ac, self.sender_tree, SENDER_DATA_SECRET, **kwargs)

    def public(self, content: FramedContent) -> PublicMessage:
        ac = self.signed(content, WireFormat.mls_public_message)
        return protect_public(self.crypto, ac, self.context, MEMBERSHIP_KEY)

    def keys_for(self, leaf: int) -> bytes | None:
        return self.sig_pub if leaf == SENDER else None

    def unprotect(self, message: PrivateMessage, keys: Any = None) -> AuthenticatedContent:
        return unprotect_private(
            self.crypto,
            message,
            self.context,
            self.receiver_tree,
            SENDER_DATA_SECRET,
            keys or self.keys_for,
        )

    def receiver_state(self) -> tuple[int, list[int], int, list[int]]:
        app = self.receiver_tree.ratchet(SENDER, RatchetType.APPLICATION)
        hs = self.receiver_tree.ratchet(SENDER, RatchetType.HANDSHAKE)
        return (
            app.next_generation,
            app.retained_generations,
            hs.next_generation,
            hs.retained_generations,
        )


def _flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


@pytest.mark.parametrize("suite", list(CipherSuite), ids=lambda s: f"suite{int(s)}")
def test_private_roundtrip_every_suite_and_content_type(suite: CipherSuite) -> None:
    g = Group(suite)
    for content_type in (ContentType.application, ContentType.proposal, ContentType.commit):
        content = g.content(content_type)
        ac = g.unprotect(_roundtrip(g.private(content)))
        assert ac.content == content
    assert g.receiver_state() == (1, [], 2, [])


def test_tampered_private_message_is_rejected_and_changes_nothing() -> None:
    g = Group()
    message = g.private()
    before = g.receiver_state()
    tampered = [
        (dataclasses.replace(message, ciphertext=_flip(message.ciphertext, 40)), CryptoError),
        (
            dataclasses.replace(
                message, encrypted_sender_data=_flip(message.encrypted_sender_data)
            ),
            CryptoError,
        ),
        # The AADs bind the header fields.
        (dataclasses.replace(message, authenticated_data=b"other"), CryptoError),
        (dataclasses.replace(message, content_type=ContentType.proposal), CryptoError),
        # A message for another epoch or group is refused before any decryption.
        (dataclasses.replace(message, epoch=8), ValidationError),
        (dataclasses.replace(message, group_id=b"other"), ValidationError),
    ]
    for bad, error in tampered:
        with pytest.raises(error):
            g.unprotect(bad)
        assert g.receiver_state() == before
    # The untouched message still decrypts: no generation was consumed by the failures.
    assert g.unprotect(message).content.application_data == b"hello"


def test_bad_signature_is_rejected_and_generation_not_consumed() -> None:
    g = Group()
    other_priv, _ = g.crypto.signature_key_pair()
    ac = sign_framed_content(
        g.crypto, WireFormat.mls_private_message, g.content(), other_priv, g.context
    )
    forged = protect_private(g.crypto, ac, g.sender_tree, SENDER_DATA_SECRET)
    with pytest.raises(CryptoError, match="signature"):
        g.unprotect(forged)
    assert g.receiver_state() == (0, [], 0, [])
    # The genuine next message (generation 1) and a re-sent generation 0 both still work: the
    # forged message did not burn generation 0.
    genuine = g.private()
    g.unprotect(genuine)
    assert g.receiver_state() == (2, [0], 0, [])


def test_signature_covers_group_context() -> None:
    g = Group()
    message = g.private()
    other_context = dataclasses.replace(g.context, tree_hash=b"\x09" * 32)
    with pytest.raises(CryptoError, match="signature"):
        unprotect_private(
            g.crypto, message, other_context, g.receiver_tree, SENDER_DATA_SECRET, g.keys_for
        )
    assert g.receiver_state() == (0, [], 0, [])


def test_replay_is_refused() -> None:
    g = Group()
    message = g.private()
    g.unprotect(message)
    with pytest.raises(SecretReuseError):
        g.unprotect(message)


def test_blank_or_unknown_sender_leaf_is_refused() -> None:
    g = Group()
    message = g.private()
    with pytest.raises(ValidationError, match="blank"):
        g.unprotect(message, keys=lambda leaf: None)
    assert g.receiver_state() == (0, [], 0, [])
    # A one-leaf receiver tree: leaf 1 does not exist.
    with pytest.raises(ValidationError, match="outside"):
        unprotect_private(
            g.crypto,
            message,
            g.context,
            SecretTree(g.crypto, ENCRYPTION_SECRET, 1),
            SENDER_DATA_SECRET,
            g.keys_for,
        )


def test_decrypt_private_does_not_consume_until_asked() -> None:
    g = Group()
    message = g.private()
    decrypted = decrypt_private(
        g.crypto, message, g.context, g.receiver_tree, SENDER_DATA_SECRET, g.keys_for
    )
    assert decrypted.sender_data.leaf_index == SENDER
    assert decrypted.sender_data.generation == 0
    assert g.receiver_state() == (0, [], 0, [])
    g.receiver_tree.consume(decrypted.pending_key)
    assert g.receiver_state() == (1, [], 0, [])
    with pytest.raises(SecretReuseError):
        g.unprotect(message)


def _encrypt_raw(g: Group, plaintext: bytes, reuse_guard: bytes = b"\x00" * 4) -> PrivateMessage:
    """Encrypt an arbitrary plaintext exactly as §6.3 says, independently of protect_private."""
    key = g.sender_tree.next_key(SENDER, RatchetType.APPLICATION)
    nonce = bytes(a ^ b for a, b in zip(key.nonce, reuse_guard + bytes(8), strict=True))
    aad = PrivateContentAAD(b"group", 7, ContentType.application, b"ad").encode()
    ciphertext = g.crypto.aead_seal(key.key, nonce, aad, plaintext)
    sd_key, sd_nonce = sender_data_key_nonce(g.crypto, SENDER_DATA_SECRET, ciphertext)
    sd_aad = SenderDataAAD(b"group", 7, ContentType.application).encode()
    sender_data = SenderData(SENDER, key.generation, reuse_guard).encode()
    return PrivateMessage(
        b"group",
        7,
        ContentType.application,
        b"ad",
        g.crypto.aead_seal(sd_key, sd_nonce, sd_aad, sender_data),
        ciphertext,
    )


def test_padding_is_zero_and_checked() -> None:
    g = Group()
    plain = g.private(padding=0)
    padded = g.private(padding=100)
    assert len(padded.ciphertext) == len(plain.ciphertext) + 100
    g.unprotect(plain)
    assert g.unprotect(padded).content.application_data == b"hello"

    ac = g.signed(g.content())
    body = PrivateMessageContent(
        ContentType.application, ac.auth, application_data=b"hello"
    ).encode()
    # Independently encrypted zero padding is accepted; a single non-zero byte is not.
    good = _encrypt_raw(g, body + bytes(5))
    bad = _encrypt_raw(g, body + bytes(4) + b"\x01")
    before = g.receiver_state()
    with pytest.raises(DecodeError, match="padding"):
        g.unprotect(bad)
    assert g.receiver_state() == before
    assert g.unprotect(good).content == ac.content


def test_reuse_guard_is_xored_into_nonce() -> None:
    g = Group()
    guard = b"\xde\xad\xbe\xef"
    message = g.private(reuse_guard=guard)
    # Independent decryption with the ratchet's key and nonce XOR guard in the first 4 bytes.
    ref = SecretTree(g.crypto, ENCRYPTION_SECRET, 2).next_key(SENDER, RatchetType.APPLICATION)
    aad = PrivateContentAAD(b"group", 7, ContentType.application, b"ad").encode()
    guarded = bytes(a ^ b for a, b in zip(ref.nonce[:4], guard, strict=True)) + ref.nonce[4:]
    g.crypto.aead_open(ref.key, guarded, aad, message.ciphertext)
    with pytest.raises(CryptoError):
        g.crypto.aead_open(ref.key, ref.nonce, aad, message.ciphertext)
    # And the sender data carries the guard.
    sd_key, sd_nonce = sender_data_key_nonce(g.crypto, SENDER_DATA_SECRET, message.ciphertext)
    sd_aad = SenderDataAAD(b"group", 7, ContentType.application).encode()
    sender_data = SenderData.decode(
        g.crypto.aead_open(sd_key, sd_nonce, sd_aad, message.encrypted_sender_data)
    )
    assert sender_data == SenderData(SENDER, 0, guard)
    assert g.unprotect(message).content.application_data == b"hello"


def test_random_reuse_guards_differ() -> None:
    g = Group()
    guards = set()
    for _ in range(4):
        message = g.private()
        decrypted = decrypt_private(
            g.crypto, message, g.context, g.receiver_tree, SENDER_DATA_SECRET, g.keys_for
        )
        g.receiver_tree.consume(decrypted.pending_key)
        guards.add(decrypted.sender_data.reuse_guard)
    assert len(guards) == 4


def test_public_message_tampering_is_rejected() -> None:
    g = Group()
    content = g.content(ContentType.proposal)
    message = g.public(content)
    assert unprotect_public(g.crypto, message, g.context, g.sig_pub, MEMBERSHIP_KEY).content == (
        content
    )

    bad_tag = dataclasses.replace(message, membership_tag=_flip(message.membership_tag or b""))
    with pytest.raises(CryptoError, match="membership_tag"):
        unprotect_public(g.crypto, bad_tag, g.context, g.sig_pub, MEMBERSHIP_KEY)
    with pytest.raises(CryptoError, match="membership_tag"):
        unprotect_public(g.crypto, message, g.context, g.sig_pub, bytes(32))

    # A forged signature with a recomputed (valid) membership tag still fails on the signature.
    forged_auth = dataclasses.replace(message.auth, signature=_flip(message.auth.signature, 5))
    forged = dataclasses.replace(message, auth=forged_auth)
    forged.membership_tag = membership_tag(
        g.crypto, MEMBERSHIP_KEY, forged.authenticated_content(), g.context
    )
    with pytest.raises(CryptoError, match="signature"):
        unprotect_public(g.crypto, forged, g.context, g.sig_pub, MEMBERSHIP_KEY)

    # Content changed after signing (e.g. by the delivery service).
    altered = dataclasses.replace(
        message, content=dataclasses.replace(content, authenticated_data=b"x")
    )
    with pytest.raises(CryptoError):
        unprotect_public(g.crypto, altered, g.context, g.sig_pub, MEMBERSHIP_KEY)
    # Wrong epoch: refused with a clear message.
    with pytest.raises(ValidationError, match="epoch"):
        unprotect_public(
            g.crypto,
            message,
            dataclasses.replace(g.context, epoch=8),
            g.sig_pub,
            MEMBERSHIP_KEY,
        )


def test_public_message_without_membership_key_checks_signature_only() -> None:
    # The delivery service has no membership_key but can still check the signature.
    g = Group()
    message = g.public(g.content(ContentType.commit))
    message.membership_tag = bytes(32)
    ac = unprotect_public(g.crypto, message, g.context, g.sig_pub, None)
    assert ac.auth.confirmation_tag == b"\x03" * 32
    other_priv, other_pub = g.crypto.signature_key_pair()
    with pytest.raises(CryptoError):
        unprotect_public(g.crypto, message, g.context, other_pub, None)


def test_external_sender_signature_omits_group_context() -> None:
    g = Group()
    content = FramedContent(
        b"group", 7, Sender.external(0), b"", ContentType.proposal, proposal=Proposal(Remove(1))
    )
    tbs = framed_content_tbs(WireFormat.mls_public_message, content, g.context)
    assert g.context.encode() not in tbs
    ac = g.signed(content, WireFormat.mls_public_message)
    message = protect_public(g.crypto, ac, g.context, None)
    assert message.membership_tag is None
    # Any group context verifies, since it is not signed; the epoch must still match.
    other = dataclasses.replace(g.context, tree_hash=b"\x09" * 32)
    assert unprotect_public(g.crypto, message, other, g.sig_pub, MEMBERSHIP_KEY).content == content


def test_protect_refuses_wrong_shapes() -> None:
    g = Group()
    # Content signed for one wire format cannot be sent as the other (the signature covers it).
    public_ac = g.signed(g.content(ContentType.proposal), WireFormat.mls_public_message)
    with pytest.raises(ValidationError, match="PublicMessage"):
        protect_private(g.crypto, public_ac, g.sender_tree, SENDER_DATA_SECRET)
    private_ac = g.signed(g.content(ContentType.proposal))
    with pytest.raises(ValidationError, match="PrivateMessage"):
        protect_public(g.crypto, private_ac, g.context, MEMBERSHIP_KEY)
    # A commit without its confirmation tag.
    commit_ac = sign_framed_content(
        g.crypto,
        WireFormat.mls_private_message,
        g.content(ContentType.commit),
        g.sig_priv,
        g.context,
    )
    with pytest.raises(ValidationError, match="confirmation_tag"):
        protect_private(g.crypto, commit_ac, g.sender_tree, SENDER_DATA_SECRET)
    # Non-member senders cannot use PrivateMessage.
    external = FramedContent(
        b"group", 7, Sender.external(0), b"", ContentType.proposal, proposal=Proposal(Remove(1))
    )
    ext_ac = sign_framed_content(
        g.crypto, WireFormat.mls_private_message, external, g.sig_priv, g.context
    )
    with pytest.raises(ValidationError, match="external"):
        protect_private(g.crypto, ext_ac, g.sender_tree, SENDER_DATA_SECRET)
    # Bad padding or reuse guard arguments.
    app_ac = g.signed(g.content())
    with pytest.raises(ValidationError, match="padding must be non-negative, got -1"):
        protect_private(g.crypto, app_ac, g.sender_tree, SENDER_DATA_SECRET, padding=-1)
    with pytest.raises(ValidationError, match="reuse_guard must be 4 bytes, got 3"):
        protect_private(g.crypto, app_ac, g.sender_tree, SENDER_DATA_SECRET, reuse_guard=b"abc")
    # None of these consumed a sending generation.
    assert g.sender_tree.ratchet(SENDER, RatchetType.HANDSHAKE).next_generation == 0
    assert g.sender_tree.ratchet(SENDER, RatchetType.APPLICATION).next_generation == 0


def test_group_context_bytes_and_struct_agree() -> None:
    g = Group()
    content = g.content()
    # Same bytes as the framing module's FramedContentTBS struct.
    assert (
        framed_content_tbs(WireFormat.mls_private_message, content, g.context)
        == FramedContentTBS(WireFormat.mls_private_message, content, g.context).encode()
    )
    assert framed_content_tbs(
        WireFormat.mls_private_message, content, g.context
    ) == framed_content_tbs(WireFormat.mls_private_message, content, g.context.encode())
    message = g.private()
    ac = unprotect_private(
        g.crypto, message, g.context.encode(), g.receiver_tree, SENDER_DATA_SECRET, g.keys_for
    )
    assert ac.content == content


@pytest.mark.parametrize(
    "sender, body",
    [
        (Sender.external(0), Commit()),  # external: proposals only
        (Sender.external(0), Proposal(ExternalInit(b"kem output"))),  # not allowed externally
        (Sender.new_member_proposal(), Proposal(Remove(1))),  # new_member_proposal: Add only
        (Sender.new_member_proposal(), Commit()),
        (Sender.new_member_commit(), Proposal(Remove(1))),  # new_member_commit: Commit only
    ],
    ids=["external-commit", "external-external_init", "new_member-remove", "new_member-commit",
         "new_member_commit-proposal"],
)
def test_non_member_sender_limited_to_its_content(sender: Sender, body: Any) -> None:
    """§6.1: a correctly signed PublicMessage is still refused if its sender type may not send
    that content; and it cannot be built either."""
    g = Group()
    if isinstance(body, Commit):
        content = FramedContent(b"group", 7, sender, b"", ContentType.commit, commit=body)
    else:
        content = FramedContent(b"group", 7, sender, b"", ContentType.proposal, proposal=body)
    ac = g.signed(content, WireFormat.mls_public_message)
    message = PublicMessage(ac.content, ac.auth, None)
    with pytest.raises(ValidationError, match=f"a {sender.sender_type.name} sender"):
        unprotect_public(g.crypto, _roundtrip(message), g.context, g.sig_pub, MEMBERSHIP_KEY)
    with pytest.raises(ValidationError, match=f"a {sender.sender_type.name} sender"):
        protect_public(g.crypto, ac, g.context, None)


def test_new_member_commit_public_message_accepted() -> None:
    g = Group()
    content = FramedContent(
        b"group", 7, Sender.new_member_commit(), b"", ContentType.commit, commit=Commit()
    )
    message = protect_public(
        g.crypto, g.signed(content, WireFormat.mls_public_message), g.context, None
    )
    ac = unprotect_public(g.crypto, _roundtrip(message), g.context, g.sig_pub, MEMBERSHIP_KEY)
    assert ac.content == content


def test_loaded_signature_key_signs_like_bytes() -> None:
    """A key parsed once (`Crypto.load_signature_private_key`) can sign every message, so the hot
    path need not re-parse the private key per message."""
    g = Group()
    loaded = g.crypto.load_signature_private_key(g.sig_priv)
    content = g.content()
    ac = sign_framed_content(g.crypto, WireFormat.mls_private_message, content, loaded, g.context)
    message = protect_private(g.crypto, ac, g.sender_tree, SENDER_DATA_SECRET)
    assert g.unprotect(message).content == content
