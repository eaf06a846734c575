"""Message protection (RFC 9420 §6.1-§6.3): a sans-IO toolbox for the Group state machine.

The flow follows the RFC's Figure 12:

    FramedContent --sign_framed_content--> AuthenticatedContent
    AuthenticatedContent --protect_public / protect_private--> PublicMessage / PrivateMessage
    PublicMessage / PrivateMessage --unprotect_public / unprotect_private--> AuthenticatedContent

Commits: the signature is computed first, the confirmation tag (§8.2, `mls.transcript`) only once
the new epoch's confirmation_key is known, so the caller sets `auth.confirmation_tag` on the
AuthenticatedContent returned by `sign_framed_content` before protecting it; verifying the
confirmation tag is likewise the caller's job (it needs the next epoch's key).

The group context is passed either as a `GroupContext` or as its encoding (`bytes`); both give
the same FramedContentTBS.

Nothing here changes state unless a message is fully valid: `decrypt_private` decrypts and
verifies a PrivateMessage and returns the `PendingKey` without consuming it (for a caller that
wants to consume only after its own checks, e.g. of a commit), `unprotect_private` consumes it
once decryption and signature verification have succeeded. Errors are `mls.errors` exceptions:
`CryptoError` for a failed AEAD, MAC or signature check, `DecodeError` for malformed plaintext
(including non-zero padding), `ValidationError` for a well-formed message that breaks a rule,
`SecretReuseError` for a generation already used or outside the receive window.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

from .crypto import Crypto, SignaturePrivateKey
from .errors import CryptoError, ValidationError
from .framing import (
    AuthenticatedContent,
    ContentType,
    FramedContent,
    FramedContentAuthData,
    PrivateContentAAD,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
    SenderDataAAD,
    SenderType,
    WireFormat,
)
from .group_context import GroupContext, ProtocolVersion
from .proposals import EXTERNAL_SENDER_PROPOSAL_TYPES, ProposalType
from .secret_tree import PendingKey, RatchetType, SecretTree
from .tls import Reader, Writer

__all__ = [
    "DecryptedPrivateMessage",
    "GroupContextLike",
    "SignatureKeyLookup",
    "decrypt_private",
    "framed_content_tbs",
    "membership_tag",
    "protect_private",
    "protect_public",
    "ratchet_type_for",
    "sender_data_key_nonce",
    "sign_framed_content",
    "unprotect_private",
    "unprotect_public",
    "verify_framed_content",
    "verify_membership_tag",
]

GroupContextLike = GroupContext | bytes
# Leaf index -> that member's signature public key, or None if the leaf is blank.
SignatureKeyLookup = Callable[[int], bytes | None]

REUSE_GUARD_LENGTH = 4
_SIGN_LABEL = b"FramedContentTBS"


# --- §6.1 content authentication ----------------------------------------------------------------


def _encoded_context(group_context: GroupContextLike) -> bytes:
    return group_context if isinstance(group_context, bytes) else group_context.encode()


def _context_group_id_epoch(group_context: GroupContextLike) -> tuple[bytes, int]:
    if isinstance(group_context, GroupContext):
        return group_context.group_id, group_context.epoch
    # §8.1: version, cipher_suite, then group_id<V> and epoch; no need to decode the rest.
    r = Reader(group_context)
    r.uint16("GroupContext.version")
    r.uint16("GroupContext.cipher_suite")
    group_id = r.opaque("GroupContext.group_id")
    return group_id, r.uint64("GroupContext.epoch")


def _check_group_and_epoch(group_id: bytes, epoch: int, group_context: GroupContextLike) -> None:
    expected_id, expected_epoch = _context_group_id_epoch(group_context)
    if group_id != expected_id:
        raise ValidationError("message is for another group (group_id differs from this group's)")
    if epoch != expected_epoch:
        raise ValidationError(
            f"message is for epoch {epoch} but the group context is at epoch {expected_epoch}"
        )


def _covers_context(sender: Sender) -> bool:
    # §6.1: member and new_member_commit signatures cover the GroupContext, others do not.
    return sender.sender_type in (SenderType.member, SenderType.new_member_commit)


def _write_tbs(
    w: Writer, wire_format: WireFormat, content: FramedContent, group_context: GroupContextLike
) -> None:
    """FramedContentTBS (§6.1), writing the context as given (bytes or struct)."""
    w.uint16(ProtocolVersion.mls10)
    w.uint16(wire_format)
    content.write(w)
    if _covers_context(content.sender):
        w.raw(_encoded_context(group_context))


def framed_content_tbs(
    wire_format: WireFormat, content: FramedContent, group_context: GroupContextLike
) -> bytes:
    """The encoded FramedContentTBS; the context is included only for the senders that need it."""
    w = Writer()
    _write_tbs(w, wire_format, content, group_context)
    return w.getvalue()


def sign_framed_content(
    crypto: Crypto,
    wire_format: WireFormat,
    content: FramedContent,
    signature_private_key: bytes | SignaturePrivateKey,
    group_context: GroupContextLike,
) -> AuthenticatedContent:
    """SignWithLabel(., "FramedContentTBS", FramedContentTBS) (§6.1).

    For a commit the returned `auth.confirmation_tag` is None: set it before protecting.
    """
    if wire_format not in (WireFormat.mls_public_message, WireFormat.mls_private_message):
        raise ValidationError(f"content cannot be framed as {wire_format.name}")
    tbs = framed_content_tbs(wire_format, content, group_context)
    signature = crypto.sign_with_label(signature_private_key, _SIGN_LABEL, tbs)
    return AuthenticatedContent(wire_format, content, FramedContentAuthData(signature))


def verify_framed_content(
    crypto: Crypto,
    authenticated_content: AuthenticatedContent,
    signature_public_key: bytes,
    group_context: GroupContextLike,
) -> None:
    """VerifyWithLabel over the FramedContentTBS; CryptoError if the signature is not valid."""
    ac = authenticated_content
    tbs = framed_content_tbs(ac.wire_format, ac.content, group_context)
    if not crypto.verify_with_label(signature_public_key, _SIGN_LABEL, tbs, ac.auth.signature):
        raise CryptoError("the message signature does not verify with the sender's signature key")


# --- §6.2 PublicMessage -------------------------------------------------------------------------


def membership_tag(
    crypto: Crypto,
    membership_key: bytes,
    authenticated_content: AuthenticatedContent,
    group_context: GroupContextLike,
) -> bytes:
    """MAC(membership_key, AuthenticatedContentTBM) (§6.2)."""
    ac = authenticated_content
    w = Writer()
    _write_tbs(w, ac.wire_format, ac.content, group_context)  # content_tbs
    ac.auth.write_for(w, ac.content.content_type)
    return crypto.mac(membership_key, w.getvalue())


def verify_membership_tag(
    crypto: Crypto, membership_key: bytes, message: PublicMessage, group_context: GroupContextLike
) -> None:
    if message.membership_tag is None:
        raise ValidationError("a PublicMessage from a member must carry a membership_tag")
    expected = membership_tag(
        crypto, membership_key, message.authenticated_content(), group_context
    )
    if not hmac.compare_digest(expected, message.membership_tag):
        raise CryptoError(
            "membership_tag does not verify: the sender does not hold this epoch's membership_key"
        )


def _check_sender_content(content: FramedContent) -> None:
    """§6.1: what a non-member sender may send (external: a proposal of a type §12.1.8 allows;
    new_member_proposal: an Add; new_member_commit: a Commit)."""
    sender_type = content.sender.sender_type
    if sender_type == SenderType.member:
        return
    content_type = content.content_type
    if sender_type == SenderType.new_member_commit:
        if content_type != ContentType.commit:
            raise ValidationError(
                f"a new_member_commit sender can only send a commit, not {content_type.name}"
            )
        return
    proposal = content.proposal
    if content_type != ContentType.proposal or proposal is None:
        raise ValidationError(
            f"a {sender_type.name} sender can only send a proposal, not {content_type.name}"
        )
    if sender_type == SenderType.new_member_proposal:
        allowed: frozenset[ProposalType] = frozenset({ProposalType.add})
    else:
        allowed = EXTERNAL_SENDER_PROPOSAL_TYPES
    if proposal.proposal_type not in allowed:
        raise ValidationError(
            f"a {sender_type.name} sender cannot propose {proposal.proposal_type.name}"
        )


def _check_auth_shape(ac: AuthenticatedContent) -> None:
    is_commit = ac.content.content_type == ContentType.commit
    if is_commit and ac.auth.confirmation_tag is None:
        raise ValidationError("a commit needs its confirmation_tag set before it is protected")
    if not is_commit and ac.auth.confirmation_tag is not None:
        raise ValidationError("only commits carry a confirmation_tag")


def protect_public(
    crypto: Crypto,
    authenticated_content: AuthenticatedContent,
    group_context: GroupContextLike,
    membership_key: bytes | None,
) -> PublicMessage:
    """Encode signed content as a PublicMessage (§6.2), adding the membership tag for members."""
    ac = authenticated_content
    if ac.wire_format != WireFormat.mls_public_message:
        raise ValidationError(
            "content signed for a PrivateMessage cannot be sent as a PublicMessage"
        )
    if ac.content.content_type == ContentType.application:
        raise ValidationError("application messages must be sent as PrivateMessage (§6)")
    _check_sender_content(ac.content)
    _check_auth_shape(ac)
    tag = None
    if ac.content.sender.sender_type == SenderType.member:
        if membership_key is None:
            raise ValidationError("a member's PublicMessage needs the epoch's membership_key")
        tag = membership_tag(crypto, membership_key, ac, group_context)
    return PublicMessage(ac.content, ac.auth, tag)


def unprotect_public(
    crypto: Crypto,
    message: PublicMessage,
    group_context: GroupContextLike,
    signature_public_key: bytes,
    membership_key: bytes | None,
) -> AuthenticatedContent:
    """Check a PublicMessage and return its AuthenticatedContent (§6.2).

    The caller finds `signature_public_key` from `message.content.sender` (§6.1). For member
    senders the membership tag is checked with `membership_key`; passing None skips that check,
    which only a party without the group's secrets (the delivery service) may do. A non-member
    sender may only send what §6.1 allows it (`ValidationError` otherwise).
    """
    content = message.content
    if content.content_type == ContentType.application:
        raise ValidationError("application messages must not be sent as PublicMessage (§6)")
    _check_group_and_epoch(content.group_id, content.epoch, group_context)
    _check_sender_content(content)
    if content.sender.sender_type == SenderType.member:
        if membership_key is not None:
            verify_membership_tag(crypto, membership_key, message, group_context)
    elif message.membership_tag is not None:
        raise ValidationError("only a member's PublicMessage carries a membership_tag")
    ac = message.authenticated_content()
    verify_framed_content(crypto, ac, signature_public_key, group_context)
    return ac


# --- §6.3 PrivateMessage ------------------------------------------------------------------------


def ratchet_type_for(content_type: ContentType) -> RatchetType:
    """Proposals and commits use the handshake ratchet, application data the application one."""
    if content_type == ContentType.application:
        return RatchetType.APPLICATION
    return RatchetType.HANDSHAKE


def sender_data_key_nonce(
    crypto: Crypto, sender_data_secret: bytes, ciphertext: bytes
) -> tuple[bytes, bytes]:
    """`sender_data_key` and `sender_data_nonce` from the ciphertext sample (§6.3.2)."""
    # The first KDF.Nh bytes of the content ciphertext, or all of it if it is shorter.
    ciphertext_sample = ciphertext[: crypto.hash_length]
    key = crypto.expand_with_label(
        sender_data_secret, b"key", ciphertext_sample, crypto.aead_key_length
    )
    nonce = crypto.expand_with_label(
        sender_data_secret, b"nonce", ciphertext_sample, crypto.aead_nonce_length
    )
    return key, nonce


def _guarded_nonce(nonce: bytes, reuse_guard: bytes) -> bytes:
    """§6.3.1: the reuse guard is XORed into the first four bytes of the ratchet nonce."""
    head = bytes(a ^ b for a, b in zip(nonce[:REUSE_GUARD_LENGTH], reuse_guard, strict=True))
    return head + nonce[REUSE_GUARD_LENGTH:]


def protect_private(
    crypto: Crypto,
    authenticated_content: AuthenticatedContent,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    padding: int = 0,
    reuse_guard: bytes | None = None,
) -> PrivateMessage:
    """Encrypt signed content as a PrivateMessage (§6.3), consuming one generation of the
    sender's ratchet. `padding` zero bytes are appended to the plaintext (§15.1); `reuse_guard`
    is fresh randomness unless given (only tests should give it)."""
    ac = authenticated_content
    content = ac.content
    if ac.wire_format != WireFormat.mls_private_message:
        raise ValidationError(
            "content signed for a PublicMessage cannot be sent as a PrivateMessage"
        )
    # §6.3.2: only members send PrivateMessages; SenderData carries their leaf index.
    if content.sender.sender_type != SenderType.member or content.sender.leaf_index is None:
        raise ValidationError(
            f"a {content.sender.sender_type.name} sender cannot send a PrivateMessage"
        )
    if padding < 0:
        raise ValidationError(f"padding must be non-negative, got {padding}")
    _check_auth_shape(ac)
    if reuse_guard is None:
        reuse_guard = os.urandom(REUSE_GUARD_LENGTH)
    elif len(reuse_guard) != REUSE_GUARD_LENGTH:
        raise ValidationError(f"reuse_guard must be 4 bytes, got {len(reuse_guard)}")
    plaintext = PrivateMessageContent(
        content.content_type,
        ac.auth,
        content.application_data,
        content.proposal,
        content.commit,
        padding,
    ).encode()
    content_aad = PrivateContentAAD(
        content.group_id, content.epoch, content.content_type, content.authenticated_data
    ).encode()
    leaf_index = content.sender.leaf_index
    ratchet_key = secret_tree.next_key(leaf_index, ratchet_type_for(content.content_type))
    ciphertext = crypto.aead_seal(
        ratchet_key.key, _guarded_nonce(ratchet_key.nonce, reuse_guard), content_aad, plaintext
    )
    generation = ratchet_key.generation
    del ratchet_key  # consumed (§9.2): the tree already forgot it, so does this function
    sender_data = SenderData(leaf_index, generation, reuse_guard)
    sd_key, sd_nonce = sender_data_key_nonce(crypto, sender_data_secret, ciphertext)
    sd_aad = SenderDataAAD(content.group_id, content.epoch, content.content_type).encode()
    encrypted_sender_data = crypto.aead_seal(sd_key, sd_nonce, sd_aad, sender_data.encode())
    return PrivateMessage(
        content.group_id,
        content.epoch,
        content.content_type,
        content.authenticated_data,
        encrypted_sender_data,
        ciphertext,
    )


@dataclass(frozen=True, slots=True)
class DecryptedPrivateMessage:
    """A decrypted and verified PrivateMessage whose ratchet generation is not yet consumed.

    Call `secret_tree.consume(pending_key)` once the caller's own checks have passed.
    """

    authenticated_content: AuthenticatedContent
    sender_data: SenderData
    pending_key: PendingKey


def decrypt_private(
    crypto: Crypto,
    message: PrivateMessage,
    group_context: GroupContextLike,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    signature_key_for: SignatureKeyLookup,
) -> DecryptedPrivateMessage:
    """Decrypt a PrivateMessage and verify its signature (§6.3), changing no state.

    `signature_key_for(leaf_index)` returns the sender's signature key, or None for a blank
    leaf (§6.3.2: the sender must be a non-blank leaf).
    """
    _check_group_and_epoch(message.group_id, message.epoch, group_context)

    sd_key, sd_nonce = sender_data_key_nonce(crypto, sender_data_secret, message.ciphertext)
    sd_aad = SenderDataAAD(message.group_id, message.epoch, message.content_type).encode()
    try:
        sender_data_bytes = crypto.aead_open(
            sd_key, sd_nonce, sd_aad, message.encrypted_sender_data
        )
    except CryptoError:
        raise CryptoError(
            "cannot decrypt the PrivateMessage's sender data with this epoch's sender_data_secret"
        ) from None
    sender_data = SenderData.decode(sender_data_bytes)
    leaf_index = sender_data.leaf_index
    if leaf_index >= secret_tree.n_leaves:
        raise ValidationError(f"PrivateMessage sender leaf {leaf_index} is outside the tree")
    signature_public_key = signature_key_for(leaf_index)
    if signature_public_key is None:
        raise ValidationError(f"PrivateMessage sender leaf {leaf_index} is blank")

    pending = secret_tree.key_for(
        leaf_index, ratchet_type_for(message.content_type), sender_data.generation
    )
    content_aad = PrivateContentAAD(
        message.group_id, message.epoch, message.content_type, message.authenticated_data
    ).encode()
    try:
        plaintext = crypto.aead_open(
            pending.key,
            _guarded_nonce(pending.nonce, sender_data.reuse_guard),
            content_aad,
            message.ciphertext,
        )
    except CryptoError:
        raise CryptoError(
            f"cannot decrypt the PrivateMessage content from leaf {leaf_index} "
            f"(generation {sender_data.generation})"
        ) from None
    private_content = PrivateMessageContent.decode(plaintext, message.content_type)
    content = private_content.framed_content(message, Sender.member(leaf_index))
    ac = AuthenticatedContent(WireFormat.mls_private_message, content, private_content.auth)
    verify_framed_content(crypto, ac, signature_public_key, group_context)
    return DecryptedPrivateMessage(ac, sender_data, pending)


def unprotect_private(
    crypto: Crypto,
    message: PrivateMessage,
    group_context: GroupContextLike,
    secret_tree: SecretTree,
    sender_data_secret: bytes,
    signature_key_for: SignatureKeyLookup,
) -> AuthenticatedContent:
    """`decrypt_private`, then consume the generation (§9.2): the key cannot be used again."""
    decrypted = decrypt_private(
        crypto, message, group_context, secret_tree, sender_data_secret, signature_key_for
    )
    secret_tree.consume(decrypted.pending_key)
    return decrypted.authenticated_content
