"""Can a member get an honest delivery service to log something that `conclave audit` then
blames on the service? Each case here is one that could: the service now refuses it.

Real MLS members on a service with the verifying tracker, on both storage backends; the log is
read and audited as `conclave audit` does (`read_log`, `audit`)."""

from __future__ import annotations

import os

import pytest

from conclave.audit import AuditReport, audit, read_log
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
