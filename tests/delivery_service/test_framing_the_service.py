"""Can a member get an honest delivery service to log something that `conclave audit` then
blames on the service? Each case here is one that could: the service now refuses it, or the
audit tells what the log shows without calling it the service's doing.

Real MLS members on a service with the verifying tracker, on both storage backends; the log is
read and audited as `conclave audit` does (`read_log`, `audit`)."""

from __future__ import annotations

import os

import pytest

from conclave.audit import AuditReport, audit, read_log
from conclave.errors import AuditFailure
from delivery_service.errors import RequestFailed
from mls.client import Client
from mls.credential import Credential
from mls.extensions import ExternalSender, external_senders_extension
from mls.group import Group, external_proposal
from mls.proposals import Proposal, Remove

from .mlsgroups import Person, add, people


async def _audited(member: Person, gid: bytes) -> AuditReport:
    return audit(gid, await read_log(member.ds, gid))


async def _published(creator: Person, group: Group) -> bytes:
    """Create the group on the service and publish its GroupInfo, as `conclave` does: the
    audit log's starting point."""
    creator.group = group
    await creator.ds.create_group(group.group_id, group.group_info())
    await creator.ds.publish_group_info(group.group_id, group.group_info())
    return group.group_id


async def test_a_proposal_from_an_external_sender_is_refused(url: str) -> None:
    # A member can create a group (or commit a GroupContextExtensions) naming a key of its own
    # as an external sender. Before: such a proposal verified against the public view, was
    # logged, and every audit of the log failed on "a sender of type external, which the
    # delivery service does not accept".
    mallory, bob = await people(url, "mallory", "bob")
    outsider = Client(b"outsider", 1)
    ext = external_senders_extension(
        [ExternalSender(outsider.signature_key, Credential.basic(b"outsider"))]
    )
    gid = await _published(mallory, Group.create(mallory.mls, os.urandom(16), extensions=[ext]))
    await add(mallory, gid, bob)
    assert mallory.group is not None
    bob_leaf = next(m.leaf_index for m in mallory.group.members if m.identity == b"bob")
    proposal = external_proposal(1, outsider.signature_priv, 0, gid, mallory.group.epoch,
                                 Proposal(Remove(bob_leaf)))
    before = [m.seq for m in await mallory.ds.audit_log(gid)]
    with pytest.raises(RequestFailed) as info:
        await mallory.ds.send(gid, proposal)
    assert info.value.status == 403 and "external sender" in info.value.reason
    assert [m.seq for m in await mallory.ds.audit_log(gid)] == before
    report = await _audited(mallory, gid)
    assert report.members == ["bob", "mallory"]


async def test_entries_before_the_first_group_info_are_left_out_with_a_note(url: str) -> None:
    # The service does not log the GroupInfo a group is created with: the creator publishes it
    # (`conclave` does at once). A creator that does not, or does only later, starts the log
    # with commits. Before: every audit of that log failed on "a commit before any GroupInfo"
    # (the service's fault, by the audit's account), for good.
    alice, bob, carol, dave = await people(url, "alice", "bob", "carol", "dave")
    gid = os.urandom(16)
    alice.group = Group.create(alice.mls, gid)
    await alice.ds.create_group(gid, alice.group.group_info())
    await add(alice, gid, bob)
    res = alice.group.add([await alice.ds.claim_key_package("carol")])
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    await bob.catch_up(gid)
    assert bob.group is not None
    first = await bob.ds.publish_group_info(gid, bob.group.group_info())
    rotation = alice.group.update()
    await alice.ds.send(gid, rotation.commit, group_info=rotation.group_info)
    alice.group.merge_pending_commit()
    # The Welcome of a commit before the first GroupInfo, after a later commit: the service
    # takes it from that commit's poster. Before: "which no commit of this log added".
    assert res.welcome is not None
    await alice.ds.send_welcome(gid, res.welcome)
    await add(alice, gid, dave)
    report = await _audited(alice, gid)
    assert report.first_epoch == 2 and report.welcomes_seen == 2
    assert report.members == ["alice", "bob", "carol", "dave"]
    assert [r.reasons for r in report.rotations] == [["periodic"], ["add"]]
    [note] = report.notes
    assert f"3 entries before seq {first}" in note and "not checked" in note


async def test_a_log_whose_entries_all_precede_any_group_info_says_so(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = os.urandom(16)
    alice.group = Group.create(alice.mls, gid)
    await alice.ds.create_group(gid, alice.group.group_info())
    await add(alice, gid, bob)
    with pytest.raises(AuditFailure, match="2 entries are all before any GroupInfo: no member"):
        await _audited(alice, gid)
