"""Logs a dishonest delivery service could make that the auditor once accepted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from conclave.audit import LogEntry, audit
from conclave.errors import AuditFailure
from mls import Client, Group
from tests.conclave.test_audit import GID, LogBuilder, build_log


@pytest.fixture(scope="module")
def built() -> tuple[list[LogEntry], dict[str, int]]:
    return build_log()


def test_a_proposal_replayed_with_another_membership_tag_is_a_replay(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    # The membership tag is a MAC no one can check without the epoch's secrets: changing it
    # makes other bytes of the same signed message (a member's client sends one tag only).
    entries, seqs = built
    at = next(i for i, e in enumerate(entries) if e.seq == seqs["remove_request"])
    tag_changed = bytearray(entries[at].message)
    tag_changed[-1] ^= 0x01  # the membership tag ends the PublicMessage
    again = replace(entries[at], seq=entries[at].seq + 1, message=bytes(tag_changed))
    log = [*entries[: at + 1], again, *(replace(e, seq=e.seq + 1) for e in entries[at + 1 :])]
    with pytest.raises(AuditFailure, match=f"a replay: the same message as seq {again.seq - 1}") as info:
        audit(GID, log)
    assert info.value.seq == again.seq


def test_leaves_whose_identities_are_not_utf8_are_refused() -> None:
    # Two names that read alike once decoded ("bob\ufffd"), each with its own key: the report
    # would show one name with one key. The service refuses identities that are not UTF-8.
    ga = Group.create(Client(b"alice"), GID)
    log = LogBuilder()
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    r = ga.add([Client(b"bob\xff").key_package(), Client(b"bob\xfe").key_package()])
    log.add("commit", 0, "alice", 1100, r.commit)
    with pytest.raises(AuditFailure, match="an identity that is not UTF-8") as info:
        audit(GID, log.entries)
    assert info.value.seq == 2


def test_a_join_request_under_a_members_name_with_another_key_is_a_forgery() -> None:
    # Never committed, it is no leaf; but the service refuses a KeyPackage of a name with
    # another key than the one it registered, so only a forger logs one.
    ga = Group.create(Client(b"alice"), GID)
    log = LogBuilder()
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    log.add("proposal", 0, "alice", 2000, Group.new_member_add_proposal(Client(b"alice"), ga.group_info()))
    with pytest.raises(AuditFailure, match="'alice' with another signature key") as info:
        audit(GID, log.entries)
    assert info.value.seq == 2


def test_an_add_proposal_of_a_members_name_with_another_key_is_a_forgery() -> None:
    # The service refuses a member's proposal that brings such a leaf (else every commit
    # carrying it would be refused): a log that shows one, committed or not, is forged.
    bob = Client(b"bob")
    ga = Group.create(Client(b"alice"), GID)
    log = LogBuilder()
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    log.add("commit", 0, "alice", 1100, ga.add([bob.key_package()]).commit)
    ga.merge_pending_commit()
    log.add("proposal", 1, "alice", 1200, ga.propose_add(Client(b"bob").key_package()))
    with pytest.raises(AuditFailure, match="'bob' with another signature key") as info:
        audit(GID, log.entries)
    assert info.value.seq == 3


def test_a_welcome_before_the_first_commit_of_a_log_from_epoch_0_is_tied_to_no_commit() -> None:
    # Epoch 0 is the group's creation: no commit before the log can have added anyone.
    ga = Group.create(Client(b"alice"), GID)
    elsewhere = Group.create(Client(b"alice"), GID).add([Client(b"erin").key_package()]).welcome
    assert elsewhere is not None
    log = LogBuilder()
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    log.add("welcome", 0, "alice", 1100, elsewhere)
    with pytest.raises(AuditFailure, match="which no commit of this log added") as info:
        audit(GID, log.entries)
    assert info.value.seq == 2


def test_a_welcome_logged_after_its_recipient_was_removed_is_refused() -> None:
    # The service takes a Welcome only for members of the group as it stands: one logged after
    # a later commit removed its recipient was never posted to it.
    ga = Group.create(Client(b"alice"), GID)
    log = LogBuilder()
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    r = ga.add([Client(b"bob").key_package()])
    log.add("commit", 0, "alice", 1100, r.commit)
    ga.merge_pending_commit()
    assert r.welcome is not None
    bob_leaf = next(m.leaf_index for m in ga.members if m.identity == b"bob")
    removal = ga.remove([bob_leaf])
    log.add("commit", 1, "alice", 1200, removal.commit)
    ga.merge_pending_commit()
    log.add("welcome", 2, "alice", 1300, r.welcome)
    with pytest.raises(AuditFailure, match="a Welcome for 'bob', who is no longer a member") as info:
        audit(GID, log.entries)
    assert info.value.seq == 4
    # logged before the removal, as the service would, it passes
    honest = [log.entries[0], log.entries[1], replace(log.entries[3], seq=3, epoch=1, time_ms=1150),
              replace(log.entries[2], seq=4)]
    audit(GID, honest)
