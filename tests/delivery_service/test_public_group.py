"""The default tracker with real MLS groups: every commit is verified against the public tree."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from delivery_service.errors import RequestFailed, StaleEpochRejected
from delivery_service.server import Config, DeliveryService
from delivery_service.storage import Storage
from mls.client import Client
from mls.framing import MLSMessage
from mls.group import Group

from .conftest import serving
from .mlsgroups import people, start_group


async def test_real_group_add_update_remove(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    view = await alice.ds.group(gid)
    assert (view["epoch"], view["members"]) == (2, ["alice", "bob", "carol"])
    assert alice.group and bob.group and carol.group
    assert alice.group.epoch_authenticator == bob.group.epoch_authenticator
    # bob updates; the others process it from the log.
    res = bob.group.update()
    assert (await bob.ds.send(gid, res.commit)).epoch == 3
    bob.group.merge_pending_commit()
    await alice.catch_up(gid)
    await carol.catch_up(gid)
    assert {p.group.epoch for p in (alice, bob, carol)} == {3}  # type: ignore[union-attr]
    # alice removes carol: the service's members follow the tree, not any hint.
    res = alice.group.remove([2])
    await alice.ds.send(gid, res.commit, adds=["carol"])  # a lying hint is ignored
    alice.group.merge_pending_commit()
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob"]
    with pytest.raises(RequestFailed) as info:
        await carol.ds.room_token(gid)
    assert info.value.status == 403


async def test_racing_commits_one_wins_and_loser_retries(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = await start_group(alice, bob)
    assert alice.group and bob.group
    a, b = alice.group.update(), bob.group.update()
    results = await asyncio.gather(alice.ds.send(gid, a.commit), bob.ds.send(gid, b.commit),
                                   return_exceptions=True)
    winner, loser = (alice, bob) if not isinstance(results[0], BaseException) else (bob, alice)
    lost = results[1] if winner is alice else results[0]
    assert isinstance(lost, StaleEpochRejected) and lost.current_epoch == 2
    assert winner.group and loser.group
    winner.group.merge_pending_commit()
    loser.group.discard_pending_commit()
    await loser.catch_up(gid)
    retry = loser.group.update()
    assert (await loser.ds.send(gid, retry.commit)).epoch == 3
    loser.group.merge_pending_commit()
    await winner.catch_up(gid)
    assert winner.group.epoch_authenticator == loser.group.epoch_authenticator


async def test_forged_and_misattributed_commits_are_refused(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob)
    assert alice.group and bob.group
    res = bob.group.update()
    msg = MLSMessage.decode(res.commit)
    sig = bytearray(msg.public_message.auth.signature)
    sig[0] ^= 1
    msg.public_message.auth.signature = bytes(sig)
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send(gid, msg.encode())
    assert info.value.status == 400 and "does not verify" in info.value.reason
    # alice posts bob's genuine commit: the sender leaf is not hers.
    with pytest.raises(RequestFailed) as info:
        await alice.ds.send(gid, res.commit)
    assert info.value.status == 403
    with pytest.raises(RequestFailed) as info:
        await carol.ds.send(gid, res.commit)
    assert info.value.status == 403
    assert (await alice.ds.group(gid))["epoch"] == 1
    assert [m.kind for m in await bob.ds.messages(gid)] == ["commit", "welcome"]  # nothing new
    # The genuine one from its author is accepted.
    assert (await bob.ds.send(gid, res.commit)).epoch == 2


async def test_leaf_with_another_identitys_name_is_refused(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = await start_group(alice)
    assert alice.group
    impostor = Client(b"bob", 1)  # bob's name, another key, never registered
    res = alice.group.add([impostor.key_package()])
    with pytest.raises(RequestFailed) as info:
        await alice.ds.send(gid, res.commit)
    assert info.value.status == 403 and "signature key" in info.value.reason
    assert (await alice.ds.group(gid))["members"] == ["alice"]


async def test_group_creation_is_verified(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = os.urandom(16)
    group = Group.create(alice.mls, gid)
    with pytest.raises(RequestFailed) as info:  # no GroupInfo: nothing to verify against
        await alice.ds.create_group(gid)
    assert info.value.status == 400
    with pytest.raises(RequestFailed) as info:  # bob is not in alice's group
        await bob.ds.create_group(gid, group.group_info())
    assert info.value.status == 403
    with pytest.raises(RequestFailed) as info:
        await alice.ds.create_group(os.urandom(16), group.group_info())
    assert info.value.status == 400
    assert await alice.ds.create_group(gid, group.group_info()) == 0


async def test_external_join(url: str) -> None:
    alice, dave = await people(url, "alice", "dave")
    gid = await start_group(alice)
    assert alice.group
    # A GroupInfo must verify and match the group's state before it is handed to joiners.
    forged = MLSMessage.decode(alice.group.group_info())
    forged.group_info.signature = bytes(len(forged.group_info.signature))
    stale_tree = MLSMessage.decode(alice.group.group_info())
    stale_tree.group_info.group_context.tree_hash = bytes(32)
    for bad in (forged.encode(), stale_tree.encode()):
        with pytest.raises(RequestFailed) as info:
            await alice.ds.publish_group_info(gid, bad)
        assert info.value.status == 400
    await alice.ds.publish_group_info(gid, alice.group.group_info())
    dave.group, commit = Group.join_external(dave.mls, await dave.ds.fetch_group_info(gid))
    assert (await dave.ds.send(gid, commit)).epoch == 1
    await alice.catch_up(gid)
    assert alice.group.epoch_authenticator == dave.group.epoch_authenticator
    assert (await alice.ds.group(gid))["members"] == ["alice", "dave"]
    # An application message round-trips through the service.
    ct = alice.group.encrypt_application(b"hello")
    await alice.ds.send(gid, ct)
    [m] = [m for m in await dave.ds.messages(gid) if m.kind == "application"]
    assert dave.group.process(m.message).data == b"hello"


async def test_group_info_is_served_only_for_its_own_epoch(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob)
    assert alice.group
    res = alice.group.update()
    accepted = await alice.ds.send(gid, res.commit)  # without the new epoch's GroupInfo
    alice.group.merge_pending_commit()
    with pytest.raises(RequestFailed) as info:
        await carol.ds.fetch_group_info(gid)
    assert info.value.status == 404
    assert f"current epoch {accepted.epoch}" in info.value.reason
    # A member publishes it: served again, and good for an external join.
    await alice.ds.publish_group_info(gid, alice.group.group_info())
    carol.group, commit = Group.join_external(carol.mls, await carol.ds.fetch_group_info(gid))
    assert (await carol.ds.send(gid, commit, group_info=carol.group.group_info())).epoch == 3
    assert MLSMessage.decode(await bob.ds.fetch_group_info(gid)).group_info.group_context.epoch == 3


async def test_proposal_then_commit_by_reference(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    assert alice.group and bob.group and carol.group
    bye = carol.group.leave()  # a Remove proposal of her own leaf, for someone else to commit
    forged = MLSMessage.decode(bye)
    forged.public_message.auth.signature = bytes(len(forged.public_message.auth.signature))
    with pytest.raises(RequestFailed) as info:
        await carol.ds.send(gid, forged.encode())
    assert info.value.status == 400
    assert (await carol.ds.send(gid, bye)).epoch == 2  # a proposal does not change the epoch
    await alice.catch_up(gid)
    await bob.catch_up(gid)
    res = alice.group.commit([], include_pending=True)
    # The service resolves the commit's proposal reference from the proposal it accepted.
    assert (await alice.ds.send(gid, res.commit)).epoch == 3
    alice.group.merge_pending_commit()
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob"]
    await bob.catch_up(gid)
    assert bob.group.epoch_authenticator == alice.group.epoch_authenticator
    # A proposal of the past epoch, logged already: refused as a repeat, and where it is said.
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send(gid, bye)
    assert (info.value.status, info.value.code, info.value.extra["seq"]) == (409, "duplicate", 5)


async def test_fifty_concurrent_real_commits_one_wins_all_converge(url: str) -> None:
    names = [f"m{i}" for i in range(10)]
    members = await people(url, *names)
    gid = await start_group(members[0], *members[1:])
    for p in members:
        await p.catch_up(gid)
    epoch = members[0].group.epoch  # type: ignore[union-attr]
    # Five independent commits per member (each from its own copy of the member's state).
    posts = []
    for p in members:
        assert p.group is not None
        saved = p.group.to_bytes()
        for _ in range(5):
            copy = Group.from_bytes(saved, p.mls)
            posts.append((p, copy, copy.update().commit))
    results = await asyncio.gather(*(p.ds.send(gid, c) for p, _, c in posts),
                                   return_exceptions=True)
    won = [(post, r) for post, r in zip(posts, results, strict=True)
           if not isinstance(r, BaseException)]
    assert len(won) == 1 and won[0][1].epoch == epoch + 1
    assert all(isinstance(r, StaleEpochRejected) and r.current_epoch == epoch + 1
               for r in results if isinstance(r, BaseException))
    # The winner merges its commit; everyone else processes it from the log.
    (author, copy, _), accepted = won[0]
    copy.merge_pending_commit()
    author.group, author.cursor = copy, accepted.seq
    for p in members:
        await p.catch_up(gid)
    assert {p.group.epoch for p in members} == {epoch + 1}  # type: ignore[union-attr]
    assert len({p.group.epoch_authenticator for p in members}) == 1  # type: ignore[union-attr]


async def test_a_commit_parses_the_public_tree_once(url: str, monkeypatch) -> None:
    from mls.public_group import PublicGroup

    alice, bob = await people(url, "alice", "bob")
    gid = await start_group(alice, bob)
    assert alice.group and bob.group
    parses = []
    original = PublicGroup.from_bytes.__func__  # type: ignore[attr-defined]

    def counting(cls, data: bytes, **kwargs: Any) -> PublicGroup:  # type: ignore[no-untyped-def]
        parses.append(len(data))
        return original(cls, data, **kwargs)

    monkeypatch.setattr(PublicGroup, "from_bytes", classmethod(counting))
    res = bob.group.update()
    assert (await bob.ds.send(gid, res.commit, group_info=res.group_info)).epoch == 2
    bob.group.merge_pending_commit()
    # accept's own copy to process; the member-key and GroupInfo checks use the cached view
    assert len(parses) == 1
    await alice.catch_up(gid)
    assert alice.group.epoch_authenticator == bob.group.epoch_authenticator


def test_create_refuses_a_tree_over_the_limit_before_checking_it() -> None:
    """Checking a tree costs ~2 us per node, 1 byte each when blank: a creator's GroupInfo
    with a huge mostly blank tree is refused by its size alone."""
    from dataclasses import replace

    from delivery_service.errors import BadRequest
    from delivery_service.tracker import PublicGroupTracker
    from mls.extensions import ExtensionType
    from mls.tree_nodes import ratchet_tree_extension

    gid = os.urandom(16)
    group = Group.create(Client(b"alice", 1), gid)
    tracker = PublicGroupTracker(max_create_leaves=8)
    assert tracker.create(gid, "alice", group.group_info()).members == frozenset({"alice"})
    gi = MLSMessage.decode(group.group_info()).group_info
    nodes: list[object] = [None] * 31
    nodes[0] = nodes[-1] = group.tree.leaf_node(0)
    extensions = [
        ratchet_tree_extension(nodes) if e.extension_type == ExtensionType.ratchet_tree else e
        for e in gi.extensions
    ]
    with pytest.raises(BadRequest, match="more than 8 leaves"):
        tracker.create(gid, "alice", replace(gi, extensions=extensions).encode())


async def test_a_proposal_under_another_membership_tag_is_not_logged_twice(url: str) -> None:
    # Before: the copy verified (the public view cannot check the tag) and was logged beside
    # the original, and every audit of the log then failed on "a replay" by the service.
    alice, bob = await people(url, "alice", "bob")
    gid = await start_group(alice, bob)
    assert bob.group is not None
    epoch = bob.group.epoch
    bye = bob.group.leave()
    assert (await bob.ds.send(gid, bye)).epoch == epoch  # a proposal: the same epoch
    retagged = MLSMessage.decode(bye)
    tag = retagged.public_message.membership_tag
    assert tag is not None
    retagged.public_message.membership_tag = bytes(b ^ 1 for b in tag)
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send(gid, retagged.encode())
    assert info.value.status == 400 and "not stored twice" in info.value.reason
    log = await alice.ds.messages(gid)
    assert sum(m.kind == "proposal" for m in log) == 1
    assert (await bob.ds.send(gid, bye)).epoch == epoch  # the poster's retry: the first answer


async def test_a_reinit_is_refused_so_that_no_member_can_close_the_room(url: str) -> None:
    """A committed ReInit ends a group for good (RFC 9420 §12.4.2) and a room's group id is
    fixed by its name: the service takes neither a ReInit commit nor a ReInit proposal, and the
    group goes on (here: someone joins by external commit)."""
    alice, mallory, carol = await people(url, "alice", "mallory", "carol")
    gid = await start_group(alice, mallory)
    assert mallory.group is not None
    res = mallory.group.reinit(group_id=b"elsewhere")
    with pytest.raises(RequestFailed) as info:
        await mallory.ds.send(gid, res.commit, group_info=res.group_info)
    assert info.value.status == 400 and "ReInit" in info.value.reason
    mallory.group.discard_pending_commit()
    with pytest.raises(RequestFailed) as info:
        await mallory.ds.send(gid, mallory.group.propose_reinit(group_id=b"elsewhere"))
    assert info.value.status == 400 and "ReInit" in info.value.reason
    carol.group, commit = Group.join_external(carol.mls, await carol.ds.fetch_group_info(gid))
    assert (await carol.ds.send(gid, commit)).epoch == 2
    assert (await alice.ds.group(gid))["members"] == ["alice", "carol", "mallory"]


async def test_a_copy_logged_while_it_was_checked_is_told_as_a_copy(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The poster's retry read the log before its first post was stored (a slow database).
    # Before: it went on to the tracker, which refused it as "under another membership tag",
    # untrue; now it is a duplicate, as the storage's unique key would say.
    service = DeliveryService(storage, Config())
    async with serving(service) as url:
        alice, bob = await people(url, "alice", "bob")
        gid = await start_group(alice, bob)
        assert bob.group is not None
        bye = bob.group.leave()
        first = await bob.ds.send(gid, bye)
        logged = service._logged
        calls = 0

        async def late(group_id: bytes, data: bytes) -> Any:
            nonlocal calls
            calls += 1
            return None if calls == 1 else await logged(group_id, data)  # the first read missed

        monkeypatch.setattr(service, "_logged", late)
        with pytest.raises(RequestFailed) as info:
            await bob.ds.send(gid, bye)
        assert (info.value.status, info.value.code, info.value.extra["seq"]) == (
            409, "duplicate", first.seq)
