"""One epoch of a group's state (`EpochState`), the committer's pending Commit, and the
bookkeeping of the private tree keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .group_context import GroupContext
from .group_types import PendingProposal
from .key_schedule import EpochSecrets
from .proposals import ReInit
from .ratchet_tree import RatchetTree
from .secret_tree import DEFAULT_WINDOW, RatchetWindow, SecretTree
from .treekem import TreeKEMPrivateState

# How many past epochs' resumption PSKs a group keeps (§8.6) for PSK proposals and branching.
RESUMPTION_PSK_EPOCHS = 8


class EpochState:
    """One epoch of group state. `clone()` gives a copy that can be changed independently."""

    __slots__ = (
        "context",
        "tree",
        "private_state",
        "leaf_index",
        "secrets",
        "secret_tree",
        "interim_transcript_hash",
        "proposals",
        "own_update_privs",
        "resumption_psks",
        "reinit",
        "active",
        "sent_proposals",
    )

    def __init__(
        self,
        context: GroupContext,
        tree: RatchetTree,
        private_state: TreeKEMPrivateState | None,
        leaf_index: int,
        secrets: EpochSecrets,
        interim_transcript_hash: bytes,
        window: RatchetWindow = DEFAULT_WINDOW,
    ) -> None:
        self.context = context
        self.tree = tree
        # This member's HPKE keys for its leaf and the parent nodes it knows (§4.2); None in a
        # state without secrets. Immutable: a change puts a new object here.
        self.private_state = private_state
        self.leaf_index = leaf_index
        self.secrets = secrets
        self.secret_tree = SecretTree(
            secrets.crypto, secrets.encryption_secret, tree.n_leaves, window
        )
        secrets.delete("encryption_secret")  # §9.2: the secret tree holds what derives from it
        self.interim_transcript_hash = interim_transcript_hash
        self.proposals: dict[bytes, PendingProposal] = {}
        # encryption_key -> private key of leaves proposed in my own Update proposals.
        self.own_update_privs: dict[bytes, bytes] = {}
        self.resumption_psks: dict[int, bytes] = {context.epoch: secrets.resumption_psk}
        self.reinit: ReInit | None = None
        self.active = True
        # MLSMessage bytes of proposals this member sent in this epoch -> their reference.
        self.sent_proposals: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"EpochState(epoch={self.context.epoch}, leaf_index={self.leaf_index})"

    @classmethod
    def public(
        cls, context: GroupContext, tree: RatchetTree, interim_transcript_hash: bytes
    ) -> EpochState:
        """A state without secrets: for external joiners and the PublicGroup."""
        new = cls.__new__(cls)
        new.context = context
        new.tree = tree
        new.private_state = None
        new.leaf_index = -1
        new.secrets = None  # type: ignore[assignment]
        new.secret_tree = None  # type: ignore[assignment]
        new.interim_transcript_hash = interim_transcript_hash
        new.proposals = {}
        new.own_update_privs = {}
        new.resumption_psks = {}
        new.reinit = None
        new.active = True
        new.sent_proposals = {}
        return new

    def forget_secrets(self, keep: EpochState | None = None) -> None:
        """Deletes this epoch's secrets and secret tree (§9.2), unless `keep` shares them (a
        clone of this state that is still in use), and drops this state's references to its
        tree keys, Update keys and resumption PSKs (§7.5: replaced key pairs are deleted), so
        that whoever still holds this superseded state finds no secret in it."""
        if keep is self:
            return
        if self.secrets is not None and (keep is None or keep.secrets is not self.secrets):
            self.secrets.delete_all()
        if self.secret_tree is not None and (
            keep is None or keep.secret_tree is not self.secret_tree
        ):
            self.secret_tree.delete_all()
        # Only references are dropped: key pairs still in use are held by `keep` too.
        self.private_state = None
        self.own_update_privs = {}
        self.resumption_psks = {}

    def forget_removed(self) -> None:
        """What a member removed from the group keeps (§12.4.2: it "SHOULD promptly delete its
        group state and secret tree"): the public state and the epoch authenticator, which is
        no key, to compare out of band. Call on a clone of the last state: the clone gets
        empty secrets of its own, so that entering it deletes the shared ones (`forget_secrets`)."""
        self.active = False
        self.private_state = None
        self.own_update_privs = {}
        self.resumption_psks = {}
        # Cached proposals (decrypted private handshakes among them), this member's sent ones
        # and a ReInit are of no use to a member that can neither commit nor follow the group.
        self.proposals = {}
        self.sent_proposals = {}
        self.reinit = None
        self.secrets = self.secrets.subset("epoch_authenticator")
        self.secret_tree = SecretTree.deleted(
            self.secrets.crypto, self.tree.n_leaves, self.secret_tree.window
        )

    def clone(self) -> EpochState:
        new = EpochState.__new__(EpochState)
        new.context = self.context
        new.tree = self.tree.copy()
        new.private_state = self.private_state
        new.leaf_index = self.leaf_index
        new.secrets = self.secrets
        new.secret_tree = self.secret_tree
        new.interim_transcript_hash = self.interim_transcript_hash
        new.proposals = dict(self.proposals)
        new.own_update_privs = dict(self.own_update_privs)
        new.resumption_psks = dict(self.resumption_psks)
        new.reinit = self.reinit
        new.active = self.active
        new.sent_proposals = dict(self.sent_proposals)
        return new


@dataclass(slots=True)
class PendingCommit:
    state: EpochState = field(repr=False)
    message: bytes = field(repr=False)
    welcome: bytes | None = field(repr=False)
    # The encoded GroupInfo, or a function that builds it on first use.
    _group_info: bytes | Callable[[], bytes] = field(repr=False)

    @property
    def group_info(self) -> bytes:
        if callable(self._group_info):
            self._group_info = self._group_info()
        return self._group_info
