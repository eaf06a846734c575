"""A proposal replayed to a member or to the public view (RFC 9420 §6, §12.1, §12.4).

Proposals are cached by ProposalRef (§5.2: the hash of the AuthenticatedContent, §12.1: "cached
in such a way that it can be retrieved by hash"), so the same PublicMessage processed again in
its epoch is the same cache entry: harmless, and the next Commit references it once (a Commit
naming one ProposalRef twice is invalid for every member, see test_group_validation). In a later
epoch the FramedContent's epoch no longer matches (§12.1) and the replay is refused, changing
nothing. A PrivateMessage replay finds its ratchet generation used and is refused too.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from mls.client import Client
from mls.errors import MLSError, SecretReuseError, ValidationError
from mls.framing import MLSMessage
from mls.group import Group
from mls.proposals import ProposalOrRefType
from mls.public_group import PublicGroup

from .test_group import make_group, same_epoch, snapshot


def committed_refs(commit: bytes) -> list[bytes]:
    pm = MLSMessage.decode(commit).public_message
    assert pm.content.commit is not None
    return [
        p.reference for p in pm.content.commit.proposals
        if p.type == ProposalOrRefType.reference and p.reference is not None
    ]


def proposals_of(groups: list[Group], suite: int) -> list[bytes]:
    """An Add, an Update and a Remove, each by another member of `groups` (4 members)."""
    _, gb, gc, gd = groups
    return [
        gb.propose_add(Client(b"eve", suite).key_package()),
        gc.propose_update(),
        gd.propose_remove(1),
    ]


@pytest.mark.parametrize("suite", [1, 2])
def test_replay_in_the_same_epoch_is_idempotent_and_committed_once(suite: int) -> None:
    groups = make_group(4, suite)
    ga, gb, gc, gd = groups
    pub = PublicGroup.from_group_info(ga.group_info())
    proposals = proposals_of(groups, suite)
    for p in proposals:
        for g in groups:
            g.process(p)
        pub.process(p)
    members_before = [snapshot(g) for g in groups]
    pub_before = pub.to_bytes()
    # The same bytes again, twice: the same answer, and nothing changes (one entry per ref).
    for p in proposals * 2:
        for g in groups:
            processed = g.process(p)
            assert processed.kind == "proposal"
        assert pub.process(p).kind == "proposal"
    assert [snapshot(g) for g in groups] == members_before
    assert pub.to_bytes() == pub_before
    assert len(ga.pending_proposals) == len(proposals)
    # The Commit of a member who saw every proposal three times names each once; the Remove of
    # leaf 1 wins over nothing else, so all three are taken.
    result = ga.commit()
    refs = committed_refs(result.commit)
    assert len(refs) == len(set(refs)) == len(proposals)
    ga.merge_pending_commit()
    # Every member and the public view take it.
    for g in (gc, gd):
        assert g.process(result.commit).kind == "commit"
    assert gb.process(result.commit).removed
    assert pub.process(result.commit).removed == (1,)
    same_epoch(ga, gc, gd)
    assert pub.group_context == ga.group_context
    assert pub.ratchet_tree() == ga.ratchet_tree()


def test_members_who_saw_a_proposal_once_or_replayed_agree_on_the_commit() -> None:
    ga, gb, gc = make_group(3)
    p = gc.propose_update()
    ga.process(p)
    ga.process(p)
    gb.process(p)  # once
    # Either one's Commit names the Update once and the other takes it.
    for committer, other in ((gb, ga), (ga, gb)):
        result = committer.commit()
        assert len(committed_refs(result.commit)) == 1
        if committer is gb:
            before = snapshot(other)
            other_copy = Group.from_bytes(other.to_bytes(), other._client)
            assert other_copy.process(result.commit).kind == "commit"
            assert snapshot(other) == before
            committer.discard_pending_commit()
    ga.merge_pending_commit()
    gb.process(result.commit)
    gc.process(result.commit)
    same_epoch(ga, gb, gc)


def test_replay_keeps_the_arrival_order() -> None:
    """§12.2: of two Updates of one leaf the committer takes the most recent. A replay of the
    older one does not make it the more recent: it keeps its place in the cache."""
    ga, gb, gc = make_group(3)
    older, newer = gc.propose_update(), gc.propose_update()
    for p in (older, newer):
        ga.process(p)
        gb.process(p)
    ga.process(older)
    assert [p.proposal for p in ga.pending_proposals] == [
        MLSMessage.decode(p).public_message.content.proposal for p in (older, newer)
    ]
    result = ga.commit()
    ga.merge_pending_commit()
    gb.process(result.commit)
    gc.process(result.commit)
    same_epoch(ga, gb, gc)
    newer_leaf = MLSMessage.decode(newer).public_message.content.proposal.body.leaf_node
    assert ga.tree.leaf_node(2).encryption_key == newer_leaf.encryption_key


def test_own_proposal_echoed_twice_stays_cached_once() -> None:
    ga, gb = make_group(2)
    p = gb.propose_remove(0)
    for _ in range(2):
        processed = gb.process(p)
        assert processed.own and processed.kind == "proposal"
    assert len(gb.pending_proposals) == 1
    ga.process(p)
    result = ga.commit()  # a Remove of the committer: left for another member to commit
    assert committed_refs(result.commit) == []
    ga.discard_pending_commit()


def test_replay_with_another_membership_tag() -> None:
    """The membership tag is outside the ProposalRef: the public view, which cannot check it,
    caches the re-tagged copy under the same ref; a member refuses the bad tag."""
    ga, gb, gc = make_group(3)
    pub = PublicGroup.from_group_info(ga.group_info())
    p = gc.propose_remove(1)
    pub.process(p)
    ga.process(p)
    msg = MLSMessage.decode(p)
    pm = msg.public_message
    assert pm.membership_tag is not None
    bad_tag = bytes(b ^ 0xFF for b in pm.membership_tag)
    retagged = replace(msg, body=replace(pm, membership_tag=bad_tag)).encode()
    assert retagged != p
    pub_before = pub.to_bytes()
    pub.process(retagged)
    assert pub.to_bytes() == pub_before
    before = snapshot(ga)
    with pytest.raises(MLSError):
        ga.process(retagged)
    assert snapshot(ga) == before


def test_replay_after_a_restart_is_still_idempotent() -> None:
    ga, gb, gc = make_group(3)
    pub = PublicGroup.from_group_info(ga.group_info())
    p = gc.propose_update()
    ga.process(p)
    pub.process(p)
    ga2 = Group.from_bytes(ga.to_bytes(), ga._client)
    pub2 = PublicGroup.from_bytes(pub.to_bytes())
    before, pub_before = snapshot(ga2), pub2.to_bytes()
    ga2.process(p)
    pub2.process(p)
    assert snapshot(ga2) == before
    assert pub2.to_bytes() == pub_before
    assert len(committed_refs(ga2.commit().commit)) == 1


def test_replay_in_a_later_epoch_is_refused_and_changes_nothing() -> None:
    groups = make_group(4)
    ga, gb, gc, gd = groups
    pub = PublicGroup.from_group_info(ga.group_info())
    proposals = proposals_of(groups, 1)
    for p in proposals:
        for g in groups:
            g.process(p)
        pub.process(p)
    result = ga.commit()
    ga.merge_pending_commit()
    for g in (gc, gd):
        g.process(result.commit)
    pub.process(result.commit)
    for p in proposals:
        for g in (ga, gc, gd):
            before = snapshot(g)
            with pytest.raises(ValidationError, match="epoch"):
                g.process(p)
            assert snapshot(g) == before
            assert g.pending_proposals == []
        pub_before = pub.to_bytes()
        with pytest.raises(ValidationError, match="epoch"):
            pub.process(p)
        assert pub.to_bytes() == pub_before
    # The next Commit carries none of them: the epoch moves on with an empty proposal list.
    nxt = gc.commit()
    assert committed_refs(nxt.commit) == []
    gc.merge_pending_commit()
    ga.process(nxt.commit)
    gd.process(nxt.commit)
    same_epoch(ga, gc, gd)


def test_private_message_proposal_replay_is_refused_and_changes_nothing() -> None:
    ga, gb, gc = make_group(3, handshake="private")
    p = gc.propose_remove(1)
    ga.process(p)
    before = snapshot(ga)
    with pytest.raises(SecretReuseError, match="already been used"):
        ga.process(p)
    assert snapshot(ga) == before
    gb.process(p)
    result = ga.commit()
    ga.merge_pending_commit()
    assert gb.process(result.commit).removed
    gc.process(result.commit)
    same_epoch(ga, gc)
