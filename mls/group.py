"""The MLS group state machine (RFC 9420 §8, §11, §12): proposals, commits, Welcome, external
joins, application messages.

Every operation is all-or-nothing: a received message is checked and applied to a copy of the
group state (`EpochState.clone()`, O(N) references, no hashing), and the copy replaces the state
only when every check has passed. A rejected message raises an `mls.errors.MLSError` and leaves
the group exactly as it was. The committer's own Commit stays pending (`merge_pending_commit()` /
`discard_pending_commit()`) until the delivery service has accepted it.

`Group` is assembled from one class per concern, each in its own module:

    group_core        state, settings, properties; framing, epoch transition, GroupInfo, PSKs
    group_proposals   proposals and application messages sent
    group_commit      Commits created, with their Welcomes; the pending Commit
    group_receive     `process`: messages and Commits received
    group_join        joining by Welcome
    group_external    joining by external Commit; Add proposals from new members
    group_resumption  branch and reinit
    commit_rules      what `Group` shares with `PublicGroup`: the §12.2/§12.3 proposal-list
                      rules, sender checks, the public steps of processing a Commit
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .extensions import Extension, check_unique_extension_types
from .group_commit import CommitMixin
from .group_context import GroupContext
from .group_core import GroupCore
from .group_epoch import EpochState
from .group_external import ExternalJoinMixin
from .group_join import JoinMixin
from .group_proposals import ProposalsMixin, external_proposal
from .group_receive import ReceiveMixin
from .group_resumption import ResumptionMixin
from .group_state import dump_group, load_group
from .group_types import CommitResult, Member, PendingProposal, ProcessedMessage
from .key_schedule import EpochSecrets
from .leaf_validation import CredentialValidator, sign_leaf_node
from .proposal_list import check_external_senders
from .proposal_validation import (
    check_group_extensions_supported,
    check_required,
    required_capabilities,
)
from .ratchet_tree import RatchetTree
from .secret_tree import DEFAULT_WINDOW, RatchetWindow
from .transcript import interim_transcript_hash
from .treekem import NodeKeyPair, TreeKEMPrivateState

if TYPE_CHECKING:
    from .client import Client


__all__ = [
    "CommitResult",
    "Group",
    "Member",
    "PendingProposal",
    "ProcessedMessage",
    "external_proposal",
]


class Group(
    ResumptionMixin,
    ExternalJoinMixin,
    JoinMixin,
    ReceiveMixin,
    CommitMixin,
    ProposalsMixin,
    GroupCore,
):
    """One client's view of one MLS group (RFC 9420). See the module docstring.

    Settings (constructor keywords of `create`, `join`, `join_external`, kept by `to_bytes`):
    `handshake` "public" (default: proposals and commits as PublicMessage, which a delivery
    service can check) or "private"; `ratchet_tree_extension` (default True: GroupInfo and
    Welcome carry the tree; else pass `ratchet_tree()` out of band); `psks` external PSKs by id;
    `ratchet_window` (a `mls.secret_tree.RatchetWindow`) how far received messages may arrive
    out of order or ahead (§15.3), the attribute of that name changes it from the next epoch.
    The attribute `check_lifetimes` (default True) checks the lifetime of added KeyPackages.

    Application policy on the leaves that enter the group (keywords of `create`, `join`,
    `join_external` and `from_bytes`, and attributes of the same name; not stored by
    `to_bytes`, so pass them again on restore):
    `max_lifetime` (seconds, default None: no limit) refuses a KeyPackage leaf whose lifetime
    spans longer (§7.2: "Applications MUST define a maximum total lifetime"), in Adds received
    or sent and in the tree of a group joined; `credential_validator`, a callable
    `(credential, signature_key)` that raises or returns False to refuse (default None: accept
    all), is the Authentication Service of §5.3.1, asked before any state change about each
    added KeyPackage, each Update or UpdatePath leaf with a new credential or signature key,
    the joiner's leaf of an external Commit, every leaf and external sender of a group joined,
    and the new entries of an external_senders extension.
    """

    # --- creation --------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        client: Client,
        group_id: bytes | None = None,
        *,
        extensions: Sequence[Extension] = (),
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        psks: dict[bytes, bytes] | None = None,
        ratchet_window: RatchetWindow = DEFAULT_WINDOW,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> Group:
        """A one-member group (§11) with `client` at leaf 0, epoch 0."""
        crypto = client.crypto
        group_id = os.urandom(16) if group_id is None else bytes(group_id)
        extensions = list(extensions)
        check_unique_extension_types(extensions, "GroupContext.extensions")
        enc_priv, enc_pub = crypto.hpke_key_pair()
        leaf = sign_leaf_node(crypto, client.leaf_node(enc_pub), client.signing_key)
        tree = RatchetTree(crypto, [leaf])
        req = required_capabilities(extensions)
        if req is not None:
            check_required(leaf, req, "the creator's leaf")
        # §13.4: every extension in use by the group is supported by all members.
        check_group_extensions_supported(leaf, extensions, "the creator's leaf")
        # §12.1.8.1; §5.3.1: external senders are validated with the AS when added to the group.
        check_external_senders(crypto, extensions, (), credential_validator)
        context = GroupContext(int(crypto.suite), group_id, 0, tree.tree_hash(), b"", extensions)
        secrets = EpochSecrets.from_init_secret(
            crypto, crypto.random_secret(), bytes(crypto.hash_length), context.encode()
        )
        # §11: the interim transcript hash starts from a confirmation tag over the empty
        # confirmed transcript hash (as a joiner from this epoch's GroupInfo computes it), not
        # from the "" that §8.2's equations suggest.
        interim = interim_transcript_hash(crypto, b"", secrets.confirmation_tag(b""))
        secrets.delete("joiner_secret", "welcome_secret")  # §9.2: epoch 0 has no Welcome
        private = TreeKEMPrivateState(0, NodeKeyPair(enc_priv, enc_pub))
        state = EpochState(context, tree, private, 0, secrets, interim, ratchet_window)
        return cls(
            client,
            state,
            handshake=handshake,
            ratchet_tree_extension=ratchet_tree_extension,
            psks=psks,
            ratchet_window=ratchet_window,
            max_lifetime=max_lifetime,
            credential_validator=credential_validator,
        )

    # --- persistence -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return dump_group(self)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        client: Client | None = None,
        *,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> Group:
        """The group `to_bytes` saved; the policy settings it does not store are given again."""
        group = load_group(cls, data, client)
        group.max_lifetime = max_lifetime
        group.credential_validator = credential_validator
        return group
