"""PublicGroup: a secret-free view that follows PublicMessage commits like the members do."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mls.client import Client
from mls.errors import MLSError, ValidationError
from mls.extensions import ExtensionType
from mls.framing import MLSMessage
from mls.group import Group
from mls.group_framing import parse_key_package
from mls.proposals import Add, Proposal
from mls.public_group import PublicGroup
from mls.tree_nodes import ratchet_tree_extension

from .test_group import make_group


def agrees(pub: PublicGroup, g: Group) -> None:
    assert pub.epoch == g.epoch
    assert pub.group_context == g.group_context
    assert pub.ratchet_tree() == g.ratchet_tree()
    assert pub.members == g.members


@pytest.mark.parametrize("suite", [1, 2, 5])
def test_public_group_follows_members(suite: int) -> None:
    ga, gb = make_group(2, suite)
    pub = PublicGroup.from_group_info(ga.group_info())
    agrees(pub, ga)
    carol = Client(b"carol", suite)
    result = gb.add([carol.key_package()])
    gb.merge_pending_commit()
    processed = pub.process(result.commit)
    assert processed.kind == "commit" and processed.added == (2,)
    ga.process(result.commit)
    assert result.welcome is not None
    # Whom the Welcome is for: the KeyPackageRefs of the commit's Adds.
    secrets = MLSMessage.decode(result.welcome).welcome.secrets
    assert processed.key_package_refs == tuple(s.new_member for s in secrets)
    gc = Group.join(carol, result.welcome)
    agrees(pub, ga)
    # Proposals by reference, including an Update.
    for p in (gb.propose_update(), ga.propose_remove(1)):
        assert pub.process(p).kind == "proposal"
        for g in (ga, gb, gc):
            g.process(p)
    # gb's Update and its removal touch the same leaf: the committer must drop one; here the
    # committer commits only the Remove, by value.
    commit = gc.remove([1]).commit
    gc.merge_pending_commit()
    pub_result = pub.process(commit)
    assert pub_result.removed == (1,)
    ga.process(commit)
    agrees(pub, ga)
    # An Update by reference.
    proposal = gc.propose_update()
    pub.process(proposal)
    ga.process(proposal)
    commit = ga.commit().commit
    ga.merge_pending_commit()
    pub.process(commit)
    gc.process(commit)
    agrees(pub, gc)
    # External join.
    dave = Client(b"dave", suite)
    gd, ext = Group.join_external(dave, gc.group_info())
    assert pub.process(ext).sender.sender_type.name == "new_member_commit"
    for g in (ga, gc):
        g.process(ext)
    agrees(pub, gd)
    # Restart: the state round-trips through bytes.
    restored = PublicGroup.from_bytes(pub.to_bytes())
    update = gd.update().commit
    restored.process(update)
    ga.process(update)
    agrees(restored, ga)


def test_a_commit_names_the_key_packages_it_adds_by_reference_too() -> None:
    ga, gb = make_group(2, 1)
    pub = PublicGroup.from_group_info(ga.group_info())
    proposal = gb.propose_add(Client(b"carol", 1).key_package())
    for g in (pub, ga):
        g.process(proposal)
    dave = parse_key_package(Client(b"dave", 1).key_package())
    result = ga.commit([Proposal(Add(dave))])  # carol's Add by reference, dave's inline
    processed = pub.process(result.commit)
    assert result.welcome is not None
    secrets = MLSMessage.decode(result.welcome).welcome.secrets
    assert len(secrets) == 2 and len(set(processed.key_package_refs)) == 2
    assert set(processed.key_package_refs) == {s.new_member for s in secrets}
    # Proposals and commits without Adds name none.
    gb.process(result.commit)
    assert pub.process(gb.propose_update()).key_package_refs == ()
    assert pub.process(gb.commit().commit).key_package_refs == ()


def test_public_group_refuses_bad_messages_unchanged() -> None:
    ga, gb = make_group(2)
    pub = PublicGroup.from_group_info(ga.group_info(), None)
    before = pub.to_bytes()
    commit = gb.update().commit
    # A forged signature (last bytes of the content region) and stale epochs are refused.
    for pos in range(8, len(commit), max(1, len(commit) // 61)):
        tampered = bytearray(commit)
        tampered[pos] ^= 0x04
        try:
            pub.process(bytes(tampered))
        except MLSError:
            assert pub.to_bytes() == before
        else:  # only the unverifiable membership tag / confirmation tag may change unnoticed
            pub = PublicGroup.from_bytes(before)
    with pytest.raises(ValidationError, match="PublicMessage"):
        pub.process(ga.encrypt_application(b"x"))
    pub.process(commit)
    with pytest.raises(ValidationError, match="epoch"):
        pub.process(commit)


def test_public_group_checks_group_info_signature() -> None:
    ga, _ = make_group(2)
    info = bytearray(ga.group_info())
    info[-3] ^= 1
    with pytest.raises(MLSError):
        PublicGroup.from_group_info(bytes(info))


def test_public_group_needs_a_tree() -> None:
    ga, _ = make_group(2)
    with pytest.raises(ValidationError, match="ratchet_tree"):
        PublicGroup.from_group_info(ga.group_info(with_ratchet_tree=False))
    pub = PublicGroup.from_group_info(ga.group_info(with_ratchet_tree=False), ga.ratchet_tree())
    agrees(pub, ga)


def test_public_group_applies_the_proposal_rules() -> None:
    from mls.proposals import Proposal, ProposalOrRef, Remove

    from .test_group_validation import forge_commit

    ga, gb, _ = make_group(3)
    pub = PublicGroup.from_group_info(ga.group_info())
    before = pub.to_bytes()
    for proposals, match in (
        ([ProposalOrRef.by_value(Proposal(Remove(0)))], "committer"),
        ([ProposalOrRef.by_value(Proposal(Remove(2)))], "UpdatePath"),
        ([ProposalOrRef.by_reference(b"\x00" * 32)], "has not received"),
    ):
        with pytest.raises(ValidationError, match=match):
            pub.process(forge_commit(ga, proposals))
        assert pub.to_bytes() == before


def test_public_group_from_epoch_zero() -> None:
    """§11: the creator's interim transcript hash is derived from the epoch-0 confirmation tag,
    as a verifier starting from the epoch-0 GroupInfo derives it."""
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice)
    pub = PublicGroup.from_group_info(ga.group_info())
    result = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    pub.process(result.commit)
    agrees(pub, ga)
    carol = Client(b"carol")
    gc, commit = Group.join_external(carol, Group.create(Client(b"dave")).group_info())
    assert gc.epoch == 1 and commit


def test_proposals_by_ref_lists_what_a_commit_may_name() -> None:
    ga, gb = make_group(2, 1)
    pub = PublicGroup.from_group_info(ga.group_info())
    assert pub.proposals_by_ref == {}
    proposal = gb.propose_update()
    pub.process(proposal)
    ga.process(proposal)
    cached = pub.proposals_by_ref
    assert len(cached) == 1
    (entry,) = cached.values()
    assert entry.proposal.proposal_type.name == "update" and entry.sender.leaf_index == 1
    assert list(ga.proposals_by_ref) == list(cached)  # the same ProposalRef as the member's
    cached.clear()  # a copy
    assert len(pub.proposals_by_ref) == 1
    commit = ga.commit().commit
    ga.merge_pending_commit()
    pub.process(commit)
    assert pub.proposals_by_ref == {}


def _with_tree(group_info: bytes, nodes: list[object]) -> bytes:
    """`group_info` with its ratchet_tree extension replaced by `nodes` (signature now stale)."""
    gi = MLSMessage.decode(group_info).group_info
    extensions = [
        ratchet_tree_extension(nodes) if e.extension_type == ExtensionType.ratchet_tree else e
        for e in gi.extensions
    ]
    return replace(gi, extensions=extensions).encode()


def _blank_tree(g: Group, leaves: int) -> list[object]:
    nodes: list[object] = [None] * (2 * leaves - 1)
    nodes[0] = nodes[-1] = g.tree.leaf_node(0)
    return nodes


def test_check_group_info_compares_with_the_tree_it_follows() -> None:
    ga, gb = make_group(2)
    pub = PublicGroup.from_group_info(ga.group_info())
    pub.check_group_info(ga.group_info())
    pub.check_group_info(gb.group_info())
    with pytest.raises(ValidationError, match="no ratchet_tree"):  # a joiner could not use it
        pub.check_group_info(gb.group_info(with_ratchet_tree=False))
    gi = MLSMessage.decode(ga.group_info()).group_info
    forged_tag = replace(gi, confirmation_tag=bytes(len(gi.confirmation_tag))).encode()
    with pytest.raises(ValidationError, match="confirmation_tag"):
        pub.check_group_info(forged_tag)
    old = ga.group_info()
    result = ga.update()
    ga.merge_pending_commit()
    pub.process(result.commit)
    pub.check_group_info(ga.group_info())
    with pytest.raises(ValidationError, match="GroupContext is not the group's current one"):
        pub.check_group_info(old)
    # a huge tree, mostly blank, is refused by comparison, not checked node by node
    with pytest.raises(ValidationError, match="ratchet tree is not the group's"):
        pub.check_group_info(_with_tree(ga.group_info(), _blank_tree(ga, 1 << 14)))
    info = bytearray(ga.group_info())
    info[-3] ^= 1  # in the signature
    with pytest.raises(MLSError, match="signature"):
        pub.check_group_info(bytes(info))


def test_from_group_info_refuses_a_tree_over_max_leaves_unchecked() -> None:
    ga, _ = make_group(2)
    big = _with_tree(ga.group_info(), _blank_tree(ga, 16))
    with pytest.raises(MLSError, match="more than 8 leaves"):
        PublicGroup.from_group_info(big, max_leaves=8)
    with pytest.raises(MLSError, match="signature"):  # within the limit: checked, and refused
        PublicGroup.from_group_info(big, max_leaves=16)


def test_state_keeps_a_pending_reinit_and_format_1_still_loads() -> None:
    """Format 2 stores the ReInit that ended the group (§12.4.2: no message is accepted after
    it, after a restart too). A group with none is saved in format 1, the same bytes as before
    format 2, which older service instances sharing the database still read."""
    ga, gb = make_group(2)
    pub = PublicGroup.from_group_info(ga.group_info())
    data = pub.to_bytes()
    assert data[4:6] == b"\x00\x01"  # no ReInit: format 1
    assert PublicGroup.from_bytes(data).to_bytes() == data
    with pytest.raises(MLSError, match="format 3 is not supported"):
        PublicGroup.from_bytes(data[:4] + b"\x00\x03" + data[6:])
    # format 2 with no ReInit (an empty optional) loads too
    assert PublicGroup.from_bytes(data[:4] + b"\x00\x02" + data[6:] + b"\x00").to_bytes() == data
    result = ga.reinit(group_id=b"next")
    pub.process(result.commit)
    assert pub.to_bytes()[4:6] == b"\x00\x02"
    restored = PublicGroup.from_bytes(pub.to_bytes())
    assert restored.pending_reinit is not None and restored.pending_reinit.group_id == b"next"
    assert restored.to_bytes() == pub.to_bytes()
