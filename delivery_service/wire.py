"""What the delivery service reads of the MLS messages clients post, decoded with `mls`.

The service decodes every MLSMessage fully (`mls.framing.MLSMessage`), so malformed bytes are
refused before anything is stored, and keeps only the public parts it needs: the group id, epoch,
sender and content type of a PublicMessage or PrivateMessage (§6.2, §6.3), the KeyPackageRefs a
Welcome is addressed to (§12.4.3.1), the group id, epoch and signer of a GroupInfo (§12.4.3), and
the credential, lifetime and signature of a KeyPackage (§10). Checking a commit's signature and
UpdatePath against the public tree belongs to the `GroupTracker` (see `tracker.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mls.credential import CredentialType
from mls.crypto import get_crypto
from mls.errors import MLSError
from mls.framing import ContentType, MLSMessage, PrivateMessage, PublicMessage, SenderType
from mls.framing import WireFormat as WireFormat
from mls.key_package import KeyPackage
from mls.proposals import Proposal, ProposalType
from mls.welcome import GroupInfo, Welcome

from .errors import BadRequest
from .signatures import SUPPORTED_SUITES, verify_with_label


@dataclass(frozen=True)
class FramedMessage:
    """The public header of a PublicMessage or PrivateMessage."""

    wire_format: WireFormat
    group_id: bytes
    epoch: int
    content_type: ContentType
    # Only a PublicMessage shows its sender; a PrivateMessage encrypts it (§6.3.2).
    sender_type: SenderType | None
    sender_index: int | None
    message: MLSMessage


@dataclass(frozen=True)
class KeyPackageInfo:
    cipher_suite: int
    signature_key: bytes
    identity: bytes
    not_before: int
    not_after: int
    ref: bytes


@dataclass(frozen=True)
class GroupInfoHeader:
    cipher_suite: int
    group_id: bytes
    epoch: int
    signer: int  # leaf index


def decode(data: bytes, what: str) -> MLSMessage:
    try:
        return MLSMessage.decode(data)
    except (MLSError, ValueError) as exc:
        raise BadRequest(f"malformed {what}: {exc}") from None


def parse_framed(data: bytes) -> FramedMessage:
    """The header of an MLSMessage holding a PublicMessage or PrivateMessage."""
    msg = decode(data, "MLSMessage")
    body = msg.body
    if isinstance(body, PublicMessage):
        c = body.content
        index = c.sender.leaf_index if c.sender.leaf_index is not None else c.sender.sender_index
        return FramedMessage(msg.wire_format, c.group_id, c.epoch, c.content_type,
                             c.sender.sender_type, index, msg)
    if isinstance(body, PrivateMessage):
        return FramedMessage(msg.wire_format, body.group_id, body.epoch, body.content_type,
                             None, None, msg)
    raise BadRequest(
        f"expected a PublicMessage or PrivateMessage, got {msg.wire_format.name}; Welcome and "
        "GroupInfo have their own endpoints"
    )


def _proposal(framed: FramedMessage) -> Proposal | None:
    """The proposal a PublicMessage carries, if it is one."""
    body = framed.message.body
    return body.content.proposal if isinstance(body, PublicMessage) else None


def proposed_key_package(framed: FramedMessage) -> KeyPackageInfo:
    """The KeyPackage of the Add in a PublicMessage proposal from a `new_member_proposal` sender
    (RFC 9420 §12.1.8: such a proposal can only be an Add of the sender itself), unverified: the
    tracker checks the proposal's signature."""
    proposal = _proposal(framed)
    if proposal is None or proposal.proposal_type != ProposalType.add:
        raise BadRequest("a proposal from a new_member_proposal sender must be an Add")
    kp = proposal.body.key_package  # type: ignore[union-attr]
    if kp.cipher_suite not in SUPPORTED_SUITES:
        raise BadRequest(f"unsupported cipher suite {kp.cipher_suite}")
    return _key_package_info(kp)


def proposed_leaf(framed: FramedMessage) -> tuple[bytes, bytes] | None:
    """(identity, signature key) of the leaf a PublicMessage Add or Update proposal brings into
    the tree (unverified: the tracker checks the proposal), or None for other messages."""
    proposal = _proposal(framed)
    if proposal is None:
        return None
    if proposal.proposal_type == ProposalType.add:
        leaf = proposal.body.key_package.leaf_node  # type: ignore[union-attr]
    elif proposal.proposal_type == ProposalType.update:
        leaf = proposal.body.leaf_node  # type: ignore[union-attr]
    else:
        return None
    return leaf.credential.identity, leaf.signature_key


def _key_package_info(kp: KeyPackage) -> KeyPackageInfo:
    """What the service keeps of a KeyPackage of a supported suite; the ref is over the
    KeyPackage itself, without the MLSMessage header (§5.2)."""
    leaf = kp.leaf_node
    lifetime = leaf.lifetime
    return KeyPackageInfo(
        kp.cipher_suite,
        leaf.signature_key,
        leaf.credential.identity,
        lifetime.not_before if lifetime is not None else 0,
        lifetime.not_after if lifetime is not None else 0,
        get_crypto(kp.cipher_suite).make_key_package_ref(kp.encode()),
    )


def parse_welcome(data: bytes) -> tuple[int, list[bytes]]:
    """The cipher suite of a Welcome and the KeyPackageRefs it is addressed to."""
    body = decode(data, "Welcome").body
    if not isinstance(body, Welcome):
        raise BadRequest("expected an MLSMessage holding a Welcome")
    if not body.secrets:
        raise BadRequest("the Welcome addresses no new member")
    return body.cipher_suite, [s.new_member for s in body.secrets]


def parse_group_info(data: bytes) -> GroupInfoHeader:
    body = decode(data, "GroupInfo").body
    if not isinstance(body, GroupInfo):
        raise BadRequest("expected an MLSMessage holding a GroupInfo")
    ctx = body.group_context
    return GroupInfoHeader(ctx.cipher_suite, ctx.group_id, ctx.epoch, body.signer)


def parse_key_package(data: bytes) -> KeyPackageInfo:
    """Decode a KeyPackage and check its signature (§10.1)."""
    body = decode(data, "KeyPackage").body
    if not isinstance(body, KeyPackage):
        raise BadRequest("expected an MLSMessage holding a KeyPackage")
    if body.cipher_suite not in SUPPORTED_SUITES:
        raise BadRequest(f"unsupported cipher suite {body.cipher_suite}")
    leaf = body.leaf_node
    if leaf.credential.credential_type != CredentialType.basic:
        raise BadRequest("only basic credentials are supported by this delivery service")
    if leaf.lifetime is None:
        raise BadRequest("a KeyPackage's leaf must have a lifetime (source key_package)")
    if not verify_with_label(body.cipher_suite, leaf.signature_key, b"KeyPackageTBS", body.tbs(),
                             body.signature):
        raise BadRequest("the KeyPackage's signature does not verify (§10.1)")
    return _key_package_info(body)
