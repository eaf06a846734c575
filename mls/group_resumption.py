"""Branching (RFC 9420 §11.3) and reinitialisation (§11.2): new groups tied to this one by a
resumption PSK."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .errors import ValidationError
from .extensions import Extension
from .framing import Sender
from .group_commit import CommitMixin, commit_result
from .group_framing import parse_key_package
from .group_types import CommitResult
from .key_package import KeyPackage
from .proposal_list import ProposalEntry
from .proposals import Add, PreSharedKey, PreSharedKeyID, Proposal, ResumptionPSKUsage

if TYPE_CHECKING:
    from .client import Client
    from .group import Group


class ResumptionMixin(CommitMixin):
    """`Group.branch`, `Group.reinit_group`."""

    def _resumption_group(
        self,
        client: Client,
        key_packages: Iterable[bytes],
        group_id: bytes,
        cipher_suite: int,
        extensions: Sequence[Extension],
        usage: ResumptionPSKUsage,
    ) -> tuple[Group, CommitResult]:
        """A new group seeded with this group's resumption PSK, adding `key_packages`."""
        self._require_member()  # a removed or forgotten group's resumption PSKs are deleted
        if cipher_suite != int(client.cipher_suite):
            raise ValidationError("the client's cipher suite differs from the new group's")
        new_group = type(self).create(  # type: ignore[attr-defined]
            client,
            group_id,
            extensions=extensions,
            handshake=self.handshake,
            ratchet_tree_extension=self.ratchet_tree_extension,
            psks=self._external_psks,
            ratchet_window=self.ratchet_window,
            max_lifetime=self.max_lifetime,
            credential_validator=self.credential_validator,
        )
        new_group.add_resumption_psk(self.group_id, self.epoch, self.resumption_psk())
        pid = PreSharedKeyID.resumption(
            usage, self.group_id, self.epoch, new_group.crypto.random_secret()
        )
        kps = [parse_key_package(kp) for kp in key_packages]
        result = new_group._commit_with_special_psk(pid, kps)
        new_group.merge_pending_commit()
        return new_group, result

    def _commit_with_special_psk(self, pid: PreSharedKeyID, kps: list[KeyPackage]) -> CommitResult:
        st = self._state
        me = Sender.member(st.leaf_index)
        entries = [ProposalEntry(Proposal(PreSharedKey(pid)), me, None)] + [
            ProposalEntry(Proposal(Add(kp)), me, None) for kp in kps
        ]
        # The reinit/branch PSK is not allowed in an ordinary PSK proposal (§12.2); here it is
        # the defining input of the new group, so validate the Adds alone.
        self._validate_proposal_list(st, entries[1:], st.leaf_index, external=False)
        pending = self._create_commit(st, entries, False, None, validate=False)
        self._pending = pending
        return commit_result(pending)

    def branch(
        self, key_packages: Iterable[bytes], group_id: bytes | None = None
    ) -> tuple[Group, CommitResult]:
        """A subgroup (§11.3) with some of the members, tied to this group by a branch PSK."""
        return self._resumption_group(
            self._client,
            key_packages,
            os.urandom(16) if group_id is None else group_id,
            self.cipher_suite,
            self.group_context.extensions,
            ResumptionPSKUsage.branch,
        )

    def reinit_group(
        self, client: Client | None, key_packages: Iterable[bytes]
    ) -> tuple[Group, CommitResult]:
        """After a ReInit Commit (§11.2): the new group with the ReInit's parameters."""
        self._require_member()
        reinit = self._state.reinit
        if reinit is None:
            raise ValidationError("the last Commit did not hold a ReInit proposal")
        return self._resumption_group(
            client or self._client,
            key_packages,
            reinit.group_id,
            reinit.cipher_suite,
            reinit.extensions,
            ResumptionPSKUsage.reinit,
        )
