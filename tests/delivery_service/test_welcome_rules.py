"""Who may post a Welcome and a GroupInfo, with the verifying tracker, on both storage backends.

A Welcome is for the KeyPackages a commit of the group added, and comes from that commit's poster
(RFC 9420 §12.4.3.1: the committer sends it); a GroupInfo is posted by the member whose leaf
signed it (§12.4.3), so that the log names who vouches for it. Anything else is refused, and
nothing of a refused request is logged or delivered."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from delivery_service.errors import RequestFailed
from delivery_service.storage import NewMessage, Storage
from delivery_service.tracker import GroupState
from mls.client import Client
from mls.group import Group

from .mlsgroups import Person, people, start_group

NOW = 1_800_000_000


async def _refused(status: int, code: str, call: object) -> str:
    with pytest.raises(RequestFailed) as info:
        await call  # type: ignore[misc]
    assert (info.value.status, info.value.code) == (status, code), info.value.reason
    return info.value.reason


async def _log(member: Person, gid: bytes) -> list[tuple[int, str, str]]:
    return [(m.seq, m.kind, m.sender) for m in await member.ds.audit_log(gid)]


async def test_a_welcome_comes_from_the_commit_that_added_its_recipients(url: str) -> None:
    alice, bob, carol, dave = await people(url, "alice", "bob", "carol", "dave")
    gid = await start_group(alice, bob)
    assert alice.group is not None
    kp = await alice.ds.claim_key_package("carol")
    res = alice.group.add([kp])
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    assert res.welcome is not None
    before = await _log(alice, gid)
    # Another member cannot send it: the Welcome of alice's commit is hers to send.
    reason = await _refused(403, "forbidden", bob.ds.send_welcome(gid, res.welcome))
    assert "alice" in reason
    assert await _log(alice, gid) == before
    assert await carol.ds.welcomes() == []
    seq = await alice.ds.send_welcome(gid, res.welcome)
    [w] = await carol.ds.welcomes()
    assert (w.group_id, w.seq) == (gid, seq)

    # A Welcome before its commit: refused (409), accepted once the commit is in.
    kp = await alice.ds.claim_key_package("dave")
    res = alice.group.add([kp])
    assert res.welcome is not None
    reason = await _refused(409, "not_added", alice.ds.send_welcome(gid, res.welcome))
    assert "post the commit" in reason
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    await alice.ds.send_welcome(gid, res.welcome)
    assert len(await dave.ds.welcomes()) == 1

    # The Welcome of one group posted to another where its recipient is a member too: no commit
    # of that group added this KeyPackage.
    other = await start_group(dave, carol)
    reason = await _refused(409, "not_added", dave.ds.send_welcome(other, w.welcome))
    assert "no commit of this group added" in reason
    assert [k for _, k, _ in await _log(dave, other)].count("welcome") == 1


async def test_a_group_created_with_members_welcomes_them_from_its_creator(url: str) -> None:
    # A branch or re-initialisation starts with the members it had: no commit adds them, and
    # its creator sends their Welcome.
    alice, carol, dave = await people(url, "alice", "carol", "dave")
    gid = os.urandom(16)
    group = Group.create(alice.mls, gid)
    res = group.add([await alice.ds.claim_key_package(n) for n in ("carol", "dave")])
    group.merge_pending_commit()
    assert res.welcome is not None
    assert await alice.ds.create_group(gid, group.group_info()) == 1
    reason = await _refused(403, "forbidden", carol.ds.send_welcome(gid, res.welcome))
    assert "alice" in reason
    seq = await alice.ds.send_welcome(gid, res.welcome)
    assert [w.seq for w in await dave.ds.welcomes()] == [seq]
    assert [w.seq for w in await carol.ds.welcomes()] == [seq]


async def test_a_group_info_is_posted_by_the_member_who_signed_it(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob)
    await bob.catch_up(gid)
    assert alice.group is not None and bob.group is not None
    before = await _log(alice, gid)
    reason = await _refused(
        403, "forbidden", bob.ds.publish_group_info(gid, alice.group.group_info())
    )
    assert "signed by leaf 0" in reason and "alice" in reason
    assert await _log(alice, gid) == before
    seq = await bob.ds.publish_group_info(gid, bob.group.group_info())
    assert await _log(alice, gid) == [*before, (seq, "group_info", "bob")]

    # With a commit: a GroupInfo of the new epoch that another member signed (having been
    # shown the commit first) is refused, and the commit with it.
    res = alice.group.update()
    bob.group.process(res.commit)
    epoch = (await alice.ds.group(gid))["epoch"]
    reason = await _refused(
        403, "forbidden", alice.ds.send(gid, res.commit, group_info=bob.group.group_info())
    )
    assert "bob" in reason
    assert (await alice.ds.group(gid))["epoch"] == epoch
    await alice.ds.send(gid, res.commit, group_info=res.group_info)

    # Creating a group: its GroupInfo must be the creator's own.
    other = os.urandom(16)
    alice_view = Group.create(alice.mls, other)
    res = alice_view.add([await alice.ds.claim_key_package("carol")])
    alice_view.merge_pending_commit()
    assert res.welcome is not None
    carol_view = Group.join(carol.mls, res.welcome)
    await _refused(403, "forbidden", carol.ds.create_group(other, alice_view.group_info()))
    await _refused(404, "not_found", carol.ds.group(other))
    assert await carol.ds.create_group(other, carol_view.group_info()) == 1


async def test_the_storage_records_who_added_each_key_package(storage: Storage) -> None:
    gid = os.urandom(8)
    s0 = GroupState(gid, 0, 0, frozenset({"alice"}))
    assert await storage.create_group(s0, "alice", NOW)
    first, second = os.urandom(32), os.urandom(32)
    s1 = replace(
        s0, epoch=1, members=frozenset({"alice", "bob"}), key_package_refs=frozenset({first})
    )
    await storage.append(s0, s1, NewMessage("commit", 0, "alice", 0, NOW * 1000, b"c1"))
    assert await storage.added_by(gid, [first, second]) == {first: "alice"}
    assert await storage.added_by(os.urandom(8), [first]) == {}
    # Added again (a last-resort KeyPackage, say) by another commit: its poster is the one now.
    s1 = replace(s1, last_seq=1, key_package_refs=frozenset())
    s2 = replace(s1, epoch=2, key_package_refs=frozenset({first, second}))
    await storage.append(s1, s2, NewMessage("commit", 1, "bob", 1, NOW * 1000, b"c2"))
    assert await storage.added_by(gid, [first, second]) == {first: "bob", second: "bob"}
    # Only a commit adds: a state that still carries refs, appended with another message, does not.
    s2 = replace(s2, last_seq=2)
    await storage.append(s2, s2, NewMessage("proposal", 2, "carol", 1, NOW * 1000, b"p"))
    assert await storage.added_by(gid, [first, second]) == {first: "bob", second: "bob"}


@pytest.mark.parametrize(("name", "status", "code"), [
    (b"zed", 403, "forbidden"),  # not registered
    (b"carol", 403, "forbidden"),  # registered, with another key
    (b"\xff\xfe", 400, "bad_request"),  # no one can register it
])
async def test_an_add_proposal_must_bring_a_leaf_the_service_would_let_in(
    url: str, name: bytes, status: int, code: str
) -> None:
    # Else every commit carrying it is refused: one member could block the epoch's requests.
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob)
    await bob.catch_up(gid)
    assert alice.group is not None and bob.group is not None
    before = await _log(alice, gid)
    rogue = bob.group.propose_add(Client(name).key_package())
    reason = await _refused(status, code, bob.ds.send(gid, rogue))
    assert name.decode("utf-8", "replace") in reason or "UTF-8" in reason
    assert await _log(alice, gid) == before
    # carol's real KeyPackage is fine, and the commit of it goes through
    proposal = bob.group.propose_add(await bob.ds.claim_key_package("carol"))
    await bob.ds.send(gid, proposal)
    alice.group.process(proposal)
    res = alice.group.commit()
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    assert "carol" in (await alice.ds.group(gid))["members"]
