"""Joining a group by Welcome (RFC 9420 §12.4.3.1): decrypting it, verifying the GroupInfo and
its ratchet tree, checks on reinit and branch Welcomes (§11.2, §11.3)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .errors import ValidationError
from .group_core import GroupCore
from .group_epoch import EpochState
from .group_framing import decode_message
from .group_info import (
    verified_ratchet_tree,
    verify_group_info_confirmation,
    verify_group_info_signature,
)
from .key_package import KeyPackage, LeafNode
from .key_schedule import derive_psk_secret, derive_welcome_secret, welcome_key_and_nonce
from .leaf_validation import CredentialValidator
from .proposal_validation import check_group_extensions_supported
from .proposals import PreSharedKeyID, PSKType, ResumptionPSKUsage
from .ratchet_tree import RatchetTree
from .secret_tree import DEFAULT_WINDOW, RatchetWindow
from .transcript import interim_transcript_hash
from .treekem import NodeKeyPair, TreeKEMPrivateState
from .welcome import GroupInfo, GroupSecrets

if TYPE_CHECKING:
    from .client import Client, KeyPackagePrivate
    from .group import Group


class JoinMixin(GroupCore):
    """`Group.join` and the Welcome and GroupInfo checks it is made of."""

    @classmethod
    def join(
        cls,
        client: Client,
        welcome: bytes,
        ratchet_tree: bytes | None = None,
        *,
        psks: dict[bytes, bytes] | None = None,
        resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
        handshake: str = "public",
        ratchet_tree_extension: bool = True,
        check_lifetimes: bool = False,
        previous: Group | None = None,
        ratchet_window: RatchetWindow = DEFAULT_WINDOW,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> Group:
        """Joins a group from a Welcome (§12.4.3.1) with a KeyPackage `client` made.

        `ratchet_tree`: the tree when the Welcome's GroupInfo does not carry it. `psks`: external
        PSKs by id; `resumption_psks`: resumption PSKs of other groups by (group_id, epoch).
        `previous`: the group a reinit or branch Welcome continues, required for such a Welcome;
        its resumption PSKs are used and §12.4.3.1's checks against it (ReInit parameters,
        version, suite, members) are made. `max_lifetime`, `credential_validator`: see `Group`;
        they apply to the tree joined (§7.2, §5.3.1) and stay with the group.
        """
        group = cls._unjoined(
            client, handshake, ratchet_tree_extension, psks, ratchet_window, max_lifetime,
            credential_validator,
        )
        for (gid, ep), v in (resumption_psks or {}).items():
            group.add_resumption_psk(gid, ep, v)
        if previous is not None:
            for ep, v in previous._state.resumption_psks.items():
                group.add_resumption_psk(previous.group_id, ep, v)
        opened = cls.open_welcome(
            client, welcome, group._external_psks, group._other_resumption_psks
        )
        gs, gi, psk_secret, kp, kp_private, ref = opened
        crypto = client.crypto
        special = [
            p
            for p in gs.psks
            if p.psktype == PSKType.resumption
            and p.usage in (ResumptionPSKUsage.reinit, ResumptionPSKUsage.branch)
        ]
        if len(special) > 1:
            raise ValidationError("a Welcome may name at most one reinit or branch PSK")
        if special and previous is None:
            # §12.4.3.1's checks on a reinit or branch group (a ReInit was committed, the same
            # suite and members...) need the group it continues: the PSK alone (through
            # `resumption_psks`) would let one member start a "reinit" of a group on its own.
            raise ValidationError(
                f"the Welcome names a {special[0].usage.name} resumption PSK: pass the group it"
                " continues as `previous` so that §12.4.3.1's checks can be made"
            )
        state = cls._state_from_group_info(
            client, gi, ratchet_tree, kp.leaf_node, check_lifetimes, max_lifetime,
            credential_validator,
        )
        context = gi.group_context
        if context.cipher_suite != kp.cipher_suite:
            raise ValidationError("the GroupInfo's cipher suite differs from the KeyPackage's")
        # §13.4: a joiner supports every extension in the GroupContext, or does not join.
        check_group_extensions_supported(kp.leaf_node, context.extensions, "this client's leaf")
        secrets = cls.verify_group_info_confirmation(crypto, gi, gs.joiner_secret, psk_secret)
        tree, my_leaf = state
        private = TreeKEMPrivateState(
            my_leaf, NodeKeyPair(kp_private.encryption_priv, kp.leaf_node.encryption_key)
        )
        if gs.path_secret is not None:
            private = private.with_welcome_path_secret(
                crypto, tree, gi.signer, gs.path_secret.path_secret
            )
        if special and context.epoch != 1:
            raise ValidationError("a group joined with a reinit or branch PSK must be at epoch 1")
        if special and previous is not None:  # None was refused above
            cls._check_resumption(special[0], gi, tree, previous)
        st = EpochState(
            context,
            tree,
            private,
            my_leaf,
            secrets,
            interim_transcript_hash(crypto, context.confirmed_transcript_hash, gi.confirmation_tag),
            ratchet_window,
        )
        secrets.delete("joiner_secret", "welcome_secret")
        group._state = st
        client.consume_key_package(ref)
        return group

    @staticmethod
    def _check_resumption(
        pid: PreSharedKeyID, gi: GroupInfo, tree: RatchetTree, previous: Group
    ) -> None:
        """§12.4.3.1: a reinit or branch group must match the group it continues."""
        if pid.psk_group_id != previous.group_id:
            raise ValidationError("the Welcome's resumption PSK names another group than previous")
        context = gi.group_context
        if pid.usage == ResumptionPSKUsage.reinit:
            reinit = previous.pending_reinit
            if reinit is None or pid.psk_epoch != previous.epoch:
                raise ValidationError(
                    "the previous group's last Commit held no ReInit for this Welcome"
                )
            if (
                reinit.group_id != context.group_id
                or int(reinit.version) != int(context.version)
                or reinit.cipher_suite != context.cipher_suite
                or reinit.extensions != context.extensions
            ):
                raise ValidationError("the new group does not match the ReInit proposal")
            old_members = {m.signature_key for m in previous.members}
            new_members = {leaf.signature_key for _, leaf in tree.members()}
            old_ids = {m.identity for m in previous.members}
            new_ids = {leaf.credential.identity for _, leaf in tree.members()}
            if not old_ids <= new_ids and not old_members <= new_members:
                raise ValidationError("a member of the reinitialised group is missing")
        else:
            if context.cipher_suite != previous.cipher_suite:
                raise ValidationError("a branch must keep the cipher suite of its group")
            old_ids = {m.identity for m in previous.members}
            new_ids = {leaf.credential.identity for _, leaf in tree.members()}
            if not new_ids <= old_ids:
                raise ValidationError("a branch may only hold members of the group it branches")

    @staticmethod
    def open_welcome(
        client: Client,
        welcome: bytes,
        psks: dict[bytes, bytes] | None = None,
        resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
    ) -> tuple[GroupSecrets, GroupInfo, bytes, KeyPackage, KeyPackagePrivate, bytes]:
        """Decrypts a Welcome addressed to one of the client's KeyPackages: (GroupSecrets,
        GroupInfo, psk_secret, KeyPackage, its private keys, its reference). The GroupInfo's
        signature and confirmation tag are not checked here (see `join`)."""
        psks = psks or {}
        resumption_psks = resumption_psks or {}
        crypto = client.crypto
        w = decode_message(welcome).welcome
        if w.cipher_suite != int(client.cipher_suite):
            raise ValidationError(
                f"the Welcome uses cipher suite {w.cipher_suite}, the client "
                f"{int(client.cipher_suite)}"
            )
        entry = None
        kp_private = None
        for e in w.secrets:
            kp_private = client.find_key_package(e.new_member)
            if kp_private is not None:
                entry = e
                break
        if entry is None or kp_private is None:
            raise ValidationError("the Welcome is not addressed to any KeyPackage of this client")
        kp = KeyPackage.decode(kp_private.key_package)
        if kp.cipher_suite != w.cipher_suite:
            raise ValidationError("the Welcome's cipher suite differs from the KeyPackage's")
        gs = GroupSecrets.decode(
            crypto.decrypt_with_label(
                kp_private.init_priv,
                b"Welcome",
                w.encrypted_group_info,
                entry.encrypted_group_secrets.kem_output,
                entry.encrypted_group_secrets.ciphertext,
            )
        )
        if len(gs.joiner_secret) != crypto.hash_length:
            raise ValidationError("GroupSecrets.joiner_secret has the wrong length")
        pairs = []
        for pid in gs.psks:
            if pid.psktype == PSKType.external:
                value = psks.get(pid.psk_id)
            else:
                value = resumption_psks.get((pid.psk_group_id, pid.psk_epoch))
            if value is None:
                raise ValidationError("the Welcome needs a PSK this client does not have")
            pairs.append((pid.encode(), value))
        psk_secret = derive_psk_secret(crypto, pairs)
        welcome_secret = derive_welcome_secret(crypto, gs.joiner_secret, psk_secret)
        key, nonce = welcome_key_and_nonce(crypto, welcome_secret)
        gi = GroupInfo.decode(crypto.aead_open(key, nonce, b"", w.encrypted_group_info))
        return gs, gi, psk_secret, kp, kp_private, entry.new_member

    # Kept as Group methods: tests and tools call them as `Group.verify_group_info_*`.
    verify_group_info_signature = staticmethod(verify_group_info_signature)
    verify_group_info_confirmation = staticmethod(verify_group_info_confirmation)

    @staticmethod
    def _state_from_group_info(
        client: Client,
        gi: GroupInfo,
        ratchet_tree: bytes | None,
        my_leaf_node: LeafNode | None,
        check_lifetimes: bool,
        max_lifetime: int | None = None,
        credential_validator: CredentialValidator | None = None,
    ) -> tuple[RatchetTree, int]:
        """The verified tree of a GroupInfo (§12.4.3.1) and my leaf index in it."""
        if gi.group_context.cipher_suite != int(client.cipher_suite):
            raise ValidationError("the GroupInfo's cipher suite differs from the client's")
        tree = verified_ratchet_tree(
            client.crypto, gi, ratchet_tree, now=int(time.time()) if check_lifetimes else None,
            max_lifetime=max_lifetime, credential_validator=credential_validator,
        )
        if my_leaf_node is None:
            return tree, -1
        my_leaf = tree.find_leaf(my_leaf_node)
        if my_leaf is None:
            raise ValidationError("the ratchet tree does not hold this client's KeyPackage leaf")
        return tree, my_leaf
