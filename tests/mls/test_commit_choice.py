"""A committer takes along the received proposals that can go together (RFC 9420 §12.2)."""

from __future__ import annotations

from mls.client import Client
from mls.commit import Commit
from mls.framing import MLSMessage
from mls.group import Group
from mls.proposals import Proposal, ProposalOrRefType, Remove, Update

from .test_group import make_group, same_epoch, snapshot


def committed(result_commit: bytes, group: Group) -> list[Proposal]:
    """The proposals a Commit message carries, resolved against `group`'s received ones."""
    commit = MLSMessage.decode(result_commit).public_message.content.commit
    assert isinstance(commit, Commit)
    cache = {ref: p.proposal for ref, p in group._state.proposals.items()}
    return [
        cache[p.reference] if p.type == ProposalOrRefType.reference else p.proposal  # type: ignore[index,misc]
        for p in commit.proposals
    ]


def broadcast(message: bytes, groups: list[Group]) -> None:
    for g in groups:
        assert g.process(message).kind == "proposal"


def test_two_removes_of_one_member_are_committed_once() -> None:
    ga, gb, gc, gd = make_group(4)
    for proposer in (gb, gc):
        broadcast(proposer.propose_remove(3), [ga, gb, gc, gd])
    result = ga.commit()
    carried = committed(result.commit, ga)
    assert [p.body for p in carried] == [Remove(3)]
    ga.merge_pending_commit()
    for g in (gb, gc):
        g.process(result.commit)
    assert gd.process(result.commit).removed
    same_epoch(ga, gb, gc)
    assert len(list(ga.members)) == 3


def test_a_remove_wins_over_an_update_of_its_leaf_and_the_latest_update_over_earlier_ones() -> None:
    ga, gb, gc, gd = make_group(4)
    broadcast(gb.propose_update(), [ga, gb, gc, gd])
    broadcast(gc.propose_update(), [ga, gb, gc, gd])
    latest = gc.propose_update()
    broadcast(latest, [ga, gb, gc, gd])
    broadcast(gd.propose_remove(1), [ga, gb, gc, gd])
    result = ga.commit()
    carried = [p.body for p in committed(result.commit, ga)]
    assert Remove(1) in carried
    updates = [b for b in carried if isinstance(b, Update)]
    assert len(updates) == 1  # carol's latest, not her first; none of bob's
    latest_proposal = MLSMessage.decode(latest).public_message.content.proposal
    assert latest_proposal is not None and updates[0] == latest_proposal.body
    ga.merge_pending_commit()
    assert gb.process(result.commit).removed
    for g in (gc, gd):
        g.process(result.commit)
    same_epoch(ga, gc, gd)


def test_the_committers_own_remove_wins_over_a_received_one() -> None:
    ga, gb, gc = make_group(3)
    broadcast(gb.propose_remove(2), [ga, gb, gc])
    result = ga.commit([Proposal(Remove(2))])
    assert [p.body for p in committed(result.commit, ga)] == [Remove(2)]
    ga.merge_pending_commit()
    gb.process(result.commit)
    same_epoch(ga, gb)


def test_of_two_adds_of_one_client_the_first_is_committed() -> None:
    ga, gb, gc = make_group(3)
    dave = Client(b"dave", 1)
    kp = dave.key_package()
    broadcast(gb.propose_add(kp), [ga, gb, gc])
    broadcast(gc.propose_add(dave.key_package()), [ga, gb, gc])  # same signature key
    result = ga.commit()
    adds = [p for p in committed(result.commit, ga)]
    assert len(adds) == 1
    ga.merge_pending_commit()
    for g in (gb, gc):
        g.process(result.commit)
    assert result.welcome is not None
    gd = Group.join(dave, result.welcome)
    same_epoch(ga, gb, gc, gd)


def test_a_reinit_waits_while_there_is_anything_else_to_commit() -> None:
    ga, gb, gc = make_group(3)
    broadcast(gb.propose_reinit(), [ga, gb, gc])
    broadcast(gb.propose_reinit(b"another"), [ga, gb, gc])
    broadcast(gc.propose_update(), [ga, gb, gc])
    result = ga.commit()
    assert [type(p.body) for p in committed(result.commit, ga)] == [Update]
    ga.merge_pending_commit()
    for g in (gb, gc):
        g.process(result.commit)
    same_epoch(ga, gb, gc)
    # with nothing else, one ReInit (the first) is committed
    broadcast(gb.propose_reinit(b"first"), [ga, gb, gc])
    broadcast(gc.propose_reinit(b"second"), [ga, gb, gc])
    carried = committed(ga.commit().commit, ga)
    assert len(carried) == 1 and carried[0].body.group_id == b"first"  # type: ignore[union-attr]


def test_of_two_group_context_extensions_proposals_the_first_is_committed() -> None:
    ga, gb, gc = make_group(3)
    broadcast(gb.propose_group_context_extensions([]), [ga, gb, gc])
    broadcast(gc.propose_group_context_extensions([]), [ga, gb, gc])
    result = ga.commit()
    carried = committed(result.commit, ga)
    assert len(carried) == 1
    ga.merge_pending_commit()
    for g in (gb, gc):
        g.process(result.commit)
    same_epoch(ga, gb, gc)


def test_a_withdrawn_proposal_is_not_committed() -> None:
    ga, gb, gc = make_group(3)
    before = snapshot(ga)
    update = ga.propose_update()
    remove = ga.propose_remove(2)
    ga.withdraw_proposal(update)
    ga.withdraw_proposal(remove)
    ga.withdraw_proposal(b"not a proposal of ours")
    assert ga.pending_proposals == [] and snapshot(ga) == before
    assert not ga._state.own_update_privs and not ga._state.sent_proposals
    broadcast(gb.propose_remove(1), [ga, gb, gc])  # received ones stay
    result = ga.commit()
    assert [p.body for p in committed(result.commit, ga)] == [Remove(1)]
    ga.merge_pending_commit()
    gc.process(result.commit)
    same_epoch(ga, gc)
