"""The core of `mls.Group`: its state and settings, properties, and the helpers that sending,
committing, receiving and joining share (framing, epoch transition, GroupInfo, PSKs)."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Self

from .commit import Commit
from .commit_rules import CommitRules
from .errors import CryptoError, SecretReuseError, ValidationError
from .extensions import Extension, ExtensionType, ExternalPub
from .framing import (
    AuthenticatedContent,
    ContentType,
    FramedContent,
    PublicMessage,
    Sender,
    WireFormat,
)
from .group_epoch import RESUMPTION_PSK_EPOCHS, EpochState, PendingCommit
from .group_framing import membership_tag, mls_message, seal_private, sign_content
from .key_schedule import EpochSecrets, derive_psk_secret
from .leaf_validation import CredentialValidator
from .proposals import PreSharedKeyID, PSKType
from .ratchet_tree import RatchetTree
from .secret_tree import DEFAULT_WINDOW, RatchetWindow, SecretTree
from .tls import Writer, encode_varint
from .transcript import interim_transcript_hash
from .tree_nodes import write_node
from .welcome import GroupInfo

if TYPE_CHECKING:
    from .client import Client


class GroupCore(CommitRules):
    """The state, settings and helpers every part of `Group` uses (see `mls.group`)."""

    def __init__(
        self,
        client: Client,
        state: EpochState,
        *,
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        psks: dict[bytes, bytes] | None = None,
        ratchet_window: RatchetWindow = DEFAULT_WINDOW,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> None:
        if handshake not in ("public", "private"):
            raise ValueError('handshake must be "public" or "private"')
        self._client = client
        self._crypto = client.crypto
        self._state = state
        self._pending: PendingCommit | None = None
        self.handshake = handshake
        self.ratchet_tree_extension = ratchet_tree_extension
        # id(node) -> (node, encoded optional<Node>): see `_encode_tree`.
        self._node_encodings: dict[int, tuple[object, bytes]] = {}
        # External PSKs (§8.4) by psk_id; values are secrets.
        self._external_psks: dict[bytes, bytes] = dict(psks or {})
        # §10.1: the lifetime of a KeyPackage being added must cover the current time.
        self.check_lifetimes = True
        # §7.2: the longest total lifetime (seconds) of a KeyPackage leaf this application
        # accepts (None: no limit). Not stored by `to_bytes`: the application's policy.
        self.max_lifetime = max_lifetime
        # §5.3.1: the application's Authentication Service, asked about each credential that
        # enters the group (None accepts all). Code, so not stored by `to_bytes` either.
        self.credential_validator = credential_validator
        # Resumption PSKs of other groups (branch / reinit), by (group_id, epoch).
        self._other_resumption_psks: dict[tuple[bytes, int], bytes] = {}
        # How far received messages may be reordered (§15.3); applies to each new epoch's tree.
        self.ratchet_window = ratchet_window

    @classmethod
    def _unjoined(
        cls,
        client: Client,
        handshake: str,
        ratchet_tree_extension: bool,
        psks: dict[bytes, bytes] | None,
        ratchet_window: RatchetWindow = DEFAULT_WINDOW,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> Self:
        """A group object without state yet, for a join to fill in."""
        return cls(
            client,
            None,  # type: ignore[arg-type]
            handshake=handshake,
            ratchet_tree_extension=ratchet_tree_extension,
            psks=psks,
            ratchet_window=ratchet_window,
            max_lifetime=max_lifetime,
            credential_validator=credential_validator,
        )

    def __repr__(self) -> str:
        st = self._state
        return (
            f"Group(group_id={st.context.group_id.hex()}, epoch={st.context.epoch}, "
            f"leaf_index={st.leaf_index}, members={st.tree.member_count})"
        )

    # --- public properties -----------------------------------------------------------------------

    @property
    def client(self) -> Client:
        return self._client

    @property
    def cipher_suite(self) -> int:
        return self._state.context.cipher_suite

    @property
    def leaf_index(self) -> int:
        return self._state.leaf_index

    @property
    def epoch_authenticator(self) -> bytes:
        return self._state.secrets.epoch_authenticator

    @property
    def active(self) -> bool:
        """False once this member has been removed, or after a ReInit commit (§11.2)."""
        return self._state.active and self._state.reinit is None

    @property
    def has_pending_commit(self) -> bool:
        return self._pending is not None

    def add_external_psk(self, psk_id: bytes, psk: bytes) -> None:
        self._require_member()  # a forgotten group keeps no PSK (nor would use one)
        self._external_psks[bytes(psk_id)] = bytes(psk)

    def add_resumption_psk(self, group_id: bytes, epoch: int, psk: bytes) -> None:
        """A resumption PSK of another group (for branch and reinit Welcomes)."""
        self._require_member()
        self._other_resumption_psks[(bytes(group_id), epoch)] = bytes(psk)

    def resumption_psk(self, epoch: int | None = None) -> bytes:
        self._require_member()  # else "no resumption PSK kept": say why
        e = self.epoch if epoch is None else epoch
        try:
            return self._state.resumption_psks[e]
        except KeyError:
            raise ValidationError(f"no resumption PSK kept for epoch {e}") from None

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        """MLS-Exporter(label, context, length) of the current epoch (§8.5)."""
        if not self._state.active:  # say why the exporter secret is gone
            raise SecretReuseError(
                "this member has been removed from the group: its epoch secrets are deleted"
                " (RFC 9420 §12.4.2)"
            )
        return self._state.secrets.export(label, context, length)

    def ratchet_tree(self) -> bytes:
        """The public ratchet tree, `optional<Node> ratchet_tree<V>` (§12.4.3.3)."""
        return self._encode_tree(self._state.tree)

    def _encode_tree(self, tree: RatchetTree) -> bytes:
        """`tree.encode()`, reusing the encodings of nodes seen before: nodes are immutable
        values (a change puts a new object in the tree), so a node's bytes never change."""
        cache = self._node_encodings
        nodes = tree.nodes
        end = len(nodes)
        while end > 0 and nodes[end - 1] is None:
            end -= 1
        parts = []
        for node in nodes[:end]:
            if node is None:
                parts.append(b"\x00")
                continue
            hit = cache.get(id(node))
            if hit is None or hit[0] is not node:
                w = Writer()
                w.uint8(1)
                write_node(w, node)
                hit = cache[id(node)] = (node, w.getvalue())
            parts.append(hit[1])
        if len(cache) > 2 * end + 64:
            live = {id(n) for n in nodes if n is not None}
            for key in [k for k in cache if k not in live]:
                del cache[key]
        body = b"".join(parts)
        return encode_varint(len(body)) + body

    def group_info(
        self, *, with_ratchet_tree: bool | None = None, external_pub: bool = True
    ) -> bytes:
        """A signed GroupInfo (MLSMessage) of the current epoch, for external joins."""
        self._require_member()  # its external_pub and confirmation tag need deleted secrets
        st = self._state
        return mls_message(
            self._make_group_info(
                st,
                self.ratchet_tree_extension if with_ratchet_tree is None else with_ratchet_tree,
                external_pub,
            )
        )

    # --- sending helpers -------------------------------------------------------------------------

    def _require_member(self) -> None:
        """Refuses what needs the epoch's secrets once this member was removed or `forget()` was
        called (§12.4.2): the reason, not which deleted secret is missing. (A group being joined
        has no state yet.)"""
        if self._state is not None and not self._state.active:
            raise ValidationError("this member has been removed from the group")

    def _require_active(self) -> None:
        self._require_member()
        if self._state.reinit is not None:
            raise ValidationError("the group was reinitialised (§11.2); use the new group")

    def _wire_format(self) -> WireFormat:
        return (
            WireFormat.mls_private_message
            if self.handshake == "private"
            else WireFormat.mls_public_message
        )

    def _frame(self, st: EpochState, ac: AuthenticatedContent) -> bytes:
        if ac.wire_format == WireFormat.mls_private_message:
            return mls_message(
                seal_private(self._crypto, ac, st.secret_tree, st.secrets.sender_data_secret)
            )
        tag = membership_tag(self._crypto, st.secrets.membership_key, ac, st.context)
        return mls_message(PublicMessage(ac.content, ac.auth, tag))

    # --- epoch transitions -----------------------------------------------------------------------

    def forget(self) -> None:
        """Leave the group without a Commit, as a member whose removal was committed does
        (§12.4.2: it "SHOULD promptly delete its group state and secret tree"): the group keeps
        its public state, inactive, and of its secrets only the epoch authenticator; those of
        the epoch and of any pending Commit are deleted. For an application whose member cannot
        be removed by anyone else (the group's only member): MLS has no Commit for leaving."""
        new = self._state.clone()
        new.forget_removed()
        self._enter_state(new)

    def _enter_state(self, new: EpochState) -> None:
        """Makes `new` the group's state and drops any pending Commit. The superseded epoch's
        secrets (init_secret, sender data, membership, confirmation, exporter, external,
        secret tree) and the dropped Commit's are deleted (§9.2); what a new state still needs
        it holds itself (resumption PSKs are copied into it)."""
        old, pending = self._state, self._pending
        self._state, self._pending = new, None
        if not new.active:
            # Removed or forgotten: the PSKs given for this group are of no more use (§12.4.2
            # "delete its group state"), and would otherwise stay in memory and in `to_bytes`.
            self._external_psks = {}
            self._other_resumption_psks = {}
        if old is not None:
            old.forget_secrets(keep=new)
        if pending is not None:
            pending.state.forget_secrets(keep=new)


    def _sign_commit(
        self,
        st: EpochState,
        new: EpochState,
        commit: Commit,
        sender: Sender,
        wire_format: WireFormat,
        new_extensions: list[Extension],
        init_secret: bytes,
        commit_secret: bytes,
        psks: list[PreSharedKeyID],
    ) -> AuthenticatedContent:
        """Signs this member's Commit in epoch `st` and moves `new` to the next epoch; the
        result carries the confirmation tag (§12.4.1)."""
        content = FramedContent(
            st.context.group_id, st.context.epoch, sender, b"", ContentType.commit, commit=commit
        )
        ac = sign_content(
            self._crypto, self._client.signing_key, wire_format, content, st.context
        )
        psk_secret = self._psk_secret(psks, st)
        self._finish_epoch(st, new, ac, new_extensions, init_secret, commit_secret, psk_secret)
        return ac

    def _finish_epoch(
        self,
        st: EpochState,
        new: EpochState,
        ac: AuthenticatedContent,
        new_extensions: list[Extension],
        init_secret: bytes,
        commit_secret: bytes,
        psk_secret: bytes,
        *,
        verify_tag: bool = False,
    ) -> None:
        """Transcript hashes, the new GroupContext and key schedule, the confirmation tag."""
        crypto = self._crypto
        new.context = self._next_context(st, new.tree, ac, new_extensions)
        confirmed = new.context.confirmed_transcript_hash
        secrets = EpochSecrets.from_init_secret(
            crypto, init_secret, commit_secret, new.context.encode(), psk_secret
        )
        tag = secrets.confirmation_tag(confirmed)
        if verify_tag:
            if ac.auth.confirmation_tag is None or not hmac.compare_digest(
                tag, ac.auth.confirmation_tag
            ):
                raise CryptoError("invalid confirmation_tag: the Commit does not match this epoch")
        else:
            ac.auth.confirmation_tag = tag
        new.secrets = secrets
        new.interim_transcript_hash = interim_transcript_hash(crypto, confirmed, tag)
        new.secret_tree = SecretTree(
            crypto, secrets.encryption_secret, new.tree.n_leaves, self.ratchet_window
        )
        secrets.delete("encryption_secret")  # §9.2: the secret tree holds what derives from it
        new.proposals = {}
        new.own_update_privs = {}
        new.sent_proposals = {}
        psks = dict(new.resumption_psks)
        psks[new.context.epoch] = secrets.resumption_psk
        for e in sorted(psks)[:-RESUMPTION_PSK_EPOCHS]:
            del psks[e]
        new.resumption_psks = psks

    def _make_group_info(
        self,
        st: EpochState,
        with_tree: bool,
        external_pub: bool,
        *,
        external_key: bytes | None = None,
        confirmation_tag: bytes | None = None,
    ) -> GroupInfo:
        """The signed GroupInfo of epoch `st`. `external_key` and `confirmation_tag`, if given,
        stand for what `st.secrets` would give (for a GroupInfo built after they are deleted)."""
        extensions: list[Extension] = []
        if external_pub:
            if external_key is None:
                external_key = st.secrets.external_pub
            extensions.append(ExternalPub(external_key).to_extension())
        if with_tree:
            extensions.append(Extension(ExtensionType.ratchet_tree, self._encode_tree(st.tree)))
        if confirmation_tag is None:
            confirmation_tag = st.secrets.confirmation_tag(st.context.confirmed_transcript_hash)
        gi = GroupInfo(st.context, extensions, confirmation_tag, st.leaf_index)
        gi.signature = self._crypto.sign_with_label(
            self._client.signing_key, b"GroupInfoTBS", gi.tbs()
        )
        return gi

    # --- PSKs (§8.4) -----------------------------------------------------------------------------

    def _psk_value(self, st: EpochState, pid: PreSharedKeyID) -> bytes:
        if pid.psktype == PSKType.external:
            psk = self._external_psks.get(pid.psk_id)
            if psk is None:
                raise ValidationError(f"external PSK {pid.psk_id.hex()} is not available")
            return psk
        if pid.psk_group_id == st.context.group_id:
            psk = st.resumption_psks.get(pid.psk_epoch)
        else:
            psk = self._other_resumption_psks.get((pid.psk_group_id, pid.psk_epoch))
        if psk is None:
            raise ValidationError(
                f"resumption PSK of group {pid.psk_group_id.hex()} epoch {pid.psk_epoch} is not "
                "available"
            )
        return psk

    def _psk_secret(self, psks: list[PreSharedKeyID], st: EpochState | None = None) -> bytes:
        st = self._state if st is None else st
        pairs = [(pid.encode(), self._psk_value(st, pid)) for pid in psks]
        return derive_psk_secret(self._crypto, pairs)
