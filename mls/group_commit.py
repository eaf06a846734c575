"""Creating Commits (RFC 9420 §12.4.1) and their Welcomes (§12.4.3.1); the pending-commit
life cycle."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .commit import Commit, HPKECiphertext
from .commit_rules import provisional_context
from .crypto import SignaturePrivateKey
from .errors import ValidationError
from .extensions import Extension
from .framing import Sender
from .group_epoch import EpochState, PendingCommit
from .group_framing import mls_message, parse_key_package
from .group_proposals import ProposalsMixin
from .group_types import CommitResult
from .key_package import LeafNode
from .proposal_list import ProposalEffects, ProposalEntry, choose_pending
from .proposals import Add, Proposal, ProposalOrRef, Remove, Update
from .treekem import UpdatePathResult, create_update_path
from .welcome import EncryptedGroupSecrets, GroupInfo, GroupSecrets, PathSecret, Welcome


def commit_result(pending: PendingCommit) -> CommitResult:
    """The CommitResult of a pending Commit. It shares the GroupInfo (built once, on first use
    by either) but not the pending epoch's state: a caller may keep the result long after that
    epoch is over, and its tree keys must not outlive it (§7.5, §9.2)."""
    info = pending._group_info
    if callable(info):
        build = info
        built: list[bytes] = []

        def group_info() -> bytes:
            if not built:
                built.append(build())
            return built[0]

        pending._group_info = info = group_info
    return CommitResult(pending.message, pending.welcome, info)


class CommitMixin(ProposalsMixin):
    """`Group` methods that create, merge and discard this member's Commits."""

    def add(self, key_packages: Iterable[bytes]) -> CommitResult:
        """A Commit adding the members of `key_packages` (MLSMessage or bare KeyPackage bytes)."""
        kps = [parse_key_package(kp) for kp in key_packages]
        return self.commit([Proposal(Add(kp)) for kp in kps], include_pending=False)

    def remove(self, leaf_indices: Iterable[int]) -> CommitResult:
        return self.commit([Proposal(Remove(int(i))) for i in leaf_indices], include_pending=False)

    def update(self) -> CommitResult:
        """A Commit with an UpdatePath and no proposals: refreshes this member's keys."""
        return self.commit([], include_pending=False, force_path=True)

    def reinit(
        self,
        group_id: bytes | None = None,
        cipher_suite: int | None = None,
        extensions: Sequence[Extension] | None = None,
    ) -> CommitResult:
        """A Commit with a ReInit proposal (§11.2); afterwards use `reinit_group()`."""
        return self.commit(
            [Proposal(self._make_reinit(group_id, cipher_suite, extensions))],
            include_pending=False,
        )

    def commit(
        self,
        proposals: Sequence[Proposal] = (),
        *,
        include_pending: bool = True,
        force_path: bool = False,
        with_ratchet_tree: bool | None = None,
    ) -> CommitResult:
        """A Commit of `proposals` (by value) and, if `include_pending`, the proposals received
        in this epoch (by reference) but those that conflict with others (§12.2: two Removes of
        one member, say; see `choose_pending`). The new epoch stays pending until
        `merge_pending_commit()`.
        """
        self._require_active()
        if self._pending is not None:
            raise ValidationError("a Commit is already pending: merge or discard it first")
        st = self._state
        me = Sender.member(st.leaf_index)
        entries: list[ProposalEntry] = []
        own = [ProposalEntry(p, me, None) for p in proposals]
        if include_pending:
            for ref, cached in st.proposals.items():
                body = cached.proposal.body
                if isinstance(body, Update) and cached.sender == me:
                    continue  # §12.2: the committer's own Update cannot be committed by it
                if isinstance(body, Remove) and body.removed == st.leaf_index:
                    continue  # nor a Remove of itself: another member commits that one
                entries.append(ProposalEntry(cached.proposal, cached.sender, ref))
            entries = choose_pending(entries, own)
        entries += own
        pending = self._create_commit(st, entries, force_path, with_ratchet_tree)
        self._pending = pending
        return commit_result(pending)

    @property
    def pending_commit(self) -> CommitResult | None:
        """This member's Commit not yet merged or discarded (one restored by `from_bytes` too),
        with its Welcome and GroupInfo: to find it in the delivery service's log, or post its
        Welcome, once the service's answer was lost. None if there is none."""
        return None if self._pending is None else commit_result(self._pending)

    def merge_pending_commit(self) -> None:
        """Moves to the epoch of this member's pending Commit (after the DS accepted it)."""
        if self._pending is None:
            raise ValidationError("no pending Commit to merge")
        self._enter_state(self._pending.state)

    def discard_pending_commit(self) -> None:
        """Forgets this member's pending Commit (the DS refused it); the epoch does not change."""
        if self._pending is not None:
            self._pending.state.forget_secrets(keep=self._state)
        self._pending = None

    def _create_commit(
        self,
        st: EpochState,
        entries: list[ProposalEntry],
        force_path: bool,
        with_ratchet_tree: bool | None,
        *,
        validate: bool = True,
    ) -> PendingCommit:
        crypto = self._crypto
        me = st.leaf_index
        if validate:
            self._validate_proposal_list(st, entries, me, external=False)
        new = st.clone()
        effects = self._apply_proposals(new, entries)
        por = [
            ProposalOrRef.by_reference(e.ref)
            if e.ref is not None
            else ProposalOrRef.by_value(e.proposal)
            for e in entries
        ]
        commit = Commit(por)
        new_extensions = effects.group_extensions(st.context)
        path: UpdatePathResult | None = None
        commit_secret = bytes(crypto.hash_length)
        if effects.path_required or force_path or not entries:
            old_leaf = new.tree.leaf_node(me)
            assert old_leaf is not None
            path = self._create_update_path(
                st, new, old_leaf, me, effects, new_extensions, self._client.signing_key
            )
            commit.path, commit_secret = path.update_path, path.commit_secret
        ac = self._sign_commit(
            st,
            new,
            commit,
            Sender.member(me),
            self._wire_format(),
            new_extensions,
            st.secrets.init_secret,
            commit_secret,
            effects.psks,
        )
        message = self._frame(st, ac)
        if effects.reinit is not None:  # a ReInit is never undone (§12.4.2)
            new.reinit = effects.reinit
        if with_ratchet_tree is None:
            with_ratchet_tree = self.ratchet_tree_extension
        welcome = None
        group_info_bytes: bytes | Callable[[], bytes]
        if effects.added:
            group_info = self._make_group_info(new, with_ratchet_tree, True)
            welcome = self._make_welcome(new, group_info, effects, path, me)
            group_info_bytes = mls_message(group_info)
        else:
            # Built on demand: encoding the tree is the only O(N) step of most commits. What
            # it needs of the epoch's secrets is computed now, so that the builder (which a
            # CommitResult may keep long after the epoch is over) holds no secret.
            snapshot = EpochState.public(new.context, new.tree.copy(), b"")
            snapshot.leaf_index = new.leaf_index
            external_key = new.secrets.external_pub
            tag = new.secrets.confirmation_tag(new.context.confirmed_transcript_hash)
            tree_flag = with_ratchet_tree
            group_info_bytes = lambda: mls_message(  # noqa: E731
                self._make_group_info(
                    snapshot, tree_flag, True, external_key=external_key, confirmation_tag=tag
                )
            )
        # §9.2: the joiner and welcome secrets served only the Welcome.
        new.secrets.delete("joiner_secret", "welcome_secret")
        return PendingCommit(new, message, welcome, group_info_bytes)

    def _create_update_path(
        self,
        st: EpochState,
        new: EpochState,
        old_leaf: LeafNode,
        me: int,
        effects: ProposalEffects,
        new_extensions: list[Extension],
        signature_priv: bytes | SignaturePrivateKey,
    ) -> UpdatePathResult:
        """§7.4-§7.6: fresh keys for my leaf and filtered direct path, merged into `new.tree`;
        `new` takes the new private keys."""
        result = create_update_path(
            new.tree,
            me,
            group_id=st.context.group_id,
            signature_priv=signature_priv,
            provisional_context=provisional_context(st.context, new_extensions),
            new_leaves=frozenset(i for i, _ in effects.added),
            leaf_node=old_leaf,
        )
        # The committer's keys were all on the path just replaced: the new state replaces them.
        new.private_state = result.private_state
        return result

    def _make_welcome(
        self,
        new: EpochState,
        group_info: GroupInfo,
        effects: ProposalEffects,
        path: UpdatePathResult | None,
        committer: int,
    ) -> bytes:
        """The Welcome of the Commit's new members (§12.4.3.1); with an UpdatePath, each one's
        GroupSecrets carries the path secret of its lowest common ancestor with the committer."""
        crypto = self._crypto
        key, nonce = new.secrets.welcome_key_and_nonce()
        encrypted_group_info = crypto.aead_seal(key, nonce, b"", group_info.encode())
        secrets = []
        for index, kp in effects.added:
            path_secret = None
            if path is not None:
                path_secret = PathSecret(path.path_secret_for(committer, index))
            gs = GroupSecrets(new.secrets.joiner_secret, path_secret, list(effects.psks))
            kem_output, ct = crypto.encrypt_with_label(
                kp.init_key, b"Welcome", encrypted_group_info, gs.encode()
            )
            secrets.append(
                EncryptedGroupSecrets(
                    crypto.make_key_package_ref(kp.encode()), HPKECiphertext(kem_output, ct)
                )
            )
        return mls_message(Welcome(new.context.cipher_suite, secrets, encrypted_group_info))
