"""A member removed by another member cannot come back on its own; one that left by itself can.

Real MLS groups on the default (verifying) tracker, on SQLite and PostgreSQL (the `url` fixture).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from delivery_service.errors import RequestFailed
from delivery_service.storage import SQLiteStorage
from mls.group import Group

from .conftest import drop_schema, require_postgres
from .mlsgroups import Person, add, people, start_group

REASON = "removed from this group; a member must add you again"


def assert_refused_as_removed(info: pytest.ExceptionInfo[RequestFailed]) -> None:
    assert (info.value.status, info.value.code, info.value.reason) == (
        403, "removed_from_group", REASON
    )


async def snapshot(member: Person, gid: bytes) -> tuple[object, ...]:
    view = await member.ds.group(gid)
    log = [(m.seq, m.kind) for m in await member.ds.audit_log(gid)]
    return view["epoch"], view["seq"], view["members"], log


async def remove(committer: Person, gid: bytes, leaver: Person, *others: Person) -> None:
    """`committer` removes `leaver` by value; `others` process the commit."""
    assert committer.group is not None and leaver.group is not None
    res = committer.group.remove([leaver.group.leaf_index])
    await committer.ds.send(gid, res.commit, group_info=res.group_info)
    committer.group.merge_pending_commit()
    for p in others:
        await p.catch_up(gid)


async def leave_and_rejoin(
    leaver: Person, committer: Person, gid: bytes, remaining: list[str]
) -> None:
    """`leaver` asks to leave (a Remove proposal of its own leaf), `committer` commits it by
    reference, leaving `remaining` as the members; then `leaver` joins again by an external
    commit."""
    assert leaver.group is not None and committer.group is not None
    await leaver.ds.send(gid, leaver.group.leave())
    await committer.catch_up(gid)
    res = committer.group.commit([], include_pending=True)
    await committer.ds.send(gid, res.commit, group_info=res.group_info)
    committer.group.merge_pending_commit()
    assert (await committer.ds.group(gid))["members"] == remaining
    leaver.group, commit = Group.join_external(leaver.mls, await leaver.ds.fetch_group_info(gid))
    await leaver.ds.send(gid, commit, group_info=leaver.group.group_info())


async def test_removed_member_cannot_rejoin_by_itself(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    assert alice.group is not None
    # Carol kept a GroupInfo from her time in the group (or got one from someone).
    await remove(alice, gid, carol, bob)
    leaked = alice.group.group_info()
    before = await snapshot(alice, gid)

    with pytest.raises(RequestFailed) as info:
        await carol.ds.fetch_group_info(gid)
    assert_refused_as_removed(info)
    _, commit = Group.join_external(carol.mls, leaked)
    with pytest.raises(RequestFailed) as info:
        await carol.ds.send(gid, commit)
    assert_refused_as_removed(info)
    # An Add proposal of her own would be committed on sight by members' clients: refused too.
    knock = Group.new_member_add_proposal(carol.mls, leaked)
    with pytest.raises(RequestFailed) as info:
        await carol.ds.send(gid, knock)
    assert_refused_as_removed(info)
    with pytest.raises(RequestFailed) as info:
        await carol.ds.room_token(gid)
    assert info.value.status == 403 and "not a member" in info.value.reason
    assert await snapshot(alice, gid) == before  # nothing stored
    # Someone never in the group may still join from the same GroupInfo.
    [dave] = await people(url, "dave")
    _, commit = Group.join_external(dave.mls, await dave.ds.fetch_group_info(gid))
    assert (await dave.ds.send(gid, commit)).epoch == before[0] + 1


async def test_removal_requested_by_another_member_is_an_expulsion(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    assert alice.group and bob.group and carol.group
    # bob asks for carol's removal; alice commits his proposal by reference.
    await bob.ds.send(gid, bob.group.propose_remove(carol.group.leaf_index))
    await alice.catch_up(gid)
    res = alice.group.commit([], include_pending=True)
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob"]
    with pytest.raises(RequestFailed) as info:
        await carol.ds.fetch_group_info(gid)
    assert_refused_as_removed(info)


async def test_member_who_left_may_rejoin(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    assert alice.group and bob.group and carol.group
    await leave_and_rejoin(carol, alice, gid, remaining=["alice", "bob"])
    await alice.catch_up(gid)
    assert alice.group.epoch_authenticator == carol.group.epoch_authenticator
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob", "carol"]


async def test_added_again_by_a_member_lifts_the_ban(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    assert alice.group and bob.group
    await remove(alice, gid, carol, bob)
    with pytest.raises(RequestFailed):
        await carol.ds.fetch_group_info(gid)
    await add(bob, gid, carol)  # bob's Add commit with carol's KeyPackage, then the Welcome
    await alice.catch_up(gid)
    assert carol.group is not None
    assert carol.group.epoch_authenticator == alice.group.epoch_authenticator
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob", "carol"]
    # A member again: she may resync by external commit (removing her own old leaf)...
    old_leaf = carol.group.leaf_index
    carol.group, commit = Group.join_external(
        carol.mls, await carol.ds.fetch_group_info(gid), remove_leaf=old_leaf
    )
    await carol.ds.send(gid, commit, group_info=carol.group.group_info())
    await alice.catch_up(gid)
    assert alice.group.epoch_authenticator == carol.group.epoch_authenticator
    # ...and after leaving on her own, rejoin.
    await leave_and_rejoin(carol, bob, gid, remaining=["alice", "bob"])
    assert (await bob.ds.group(gid))["members"] == ["alice", "bob", "carol"]
    # Removed by a member once more: banned once more.
    await alice.catch_up(gid)
    await remove(alice, gid, carol)
    with pytest.raises(RequestFailed) as info:
        await carol.ds.fetch_group_info(gid)
    assert_refused_as_removed(info)


async def test_current_member_resync_is_not_refused(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = await start_group(alice, bob)
    assert alice.group and bob.group
    old_leaf = bob.group.leaf_index
    bob.group, commit = Group.join_external(
        bob.mls, await bob.ds.fetch_group_info(gid), remove_leaf=old_leaf
    )
    await bob.ds.send(gid, commit)
    await alice.catch_up(gid)
    assert alice.group.epoch_authenticator == bob.group.epoch_authenticator
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob"]


async def test_an_external_commit_cannot_remove_another_member(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """§12.2: an external commit's Remove is of the joiner's own old leaf. With anyone else's,
    mallory (never a member, reading the GroupInfo as anyone may) would expel alice."""
    alice, bob, mallory = await people(url, "alice", "bob", "mallory")
    gid = await start_group(alice, bob)
    assert alice.group is not None
    before = await snapshot(alice, gid)
    # her client would not build it: forged without that check
    monkeypatch.setattr("mls.group_external.check_credential_successor", lambda *a: None)
    _, commit = Group.join_external(
        mallory.mls, await mallory.ds.fetch_group_info(gid), remove_leaf=alice.group.leaf_index
    )
    monkeypatch.undo()
    with pytest.raises(RequestFailed) as info:
        await mallory.ds.send(gid, commit)
    assert info.value.status == 400 and "another identity" in info.value.reason
    assert await snapshot(alice, gid) == before


async def test_a_second_identity_cannot_bring_back_a_removed_one(url: str) -> None:
    alice, bob, carol = await people(url, "alice", "bob", "carol")
    gid = await start_group(alice, bob, carol)
    await remove(alice, gid, carol, bob)
    # carol2, never in the group, may read the GroupInfo; carol is refused it.
    [carol2, dave] = await people(url, "carol2", "dave")
    gi = await carol2.ds.fetch_group_info(gid)
    before = await snapshot(alice, gid)
    # carol2 posts carol's own Add proposal (signed by carol): carol is still removed.
    with pytest.raises(RequestFailed) as info:
        await carol2.ds.send(gid, Group.new_member_add_proposal(carol.mls, gi))
    assert_refused_as_removed(info)
    # Nor may anyone knock for another identity, removed or not.
    with pytest.raises(RequestFailed) as info:
        await carol2.ds.send(gid, Group.new_member_add_proposal(dave.mls, gi))
    assert info.value.status == 403 and "must add its poster" in info.value.reason
    # A member posting carol's external commit does not bring her back either.
    _, commit = Group.join_external(carol.mls, gi)
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send(gid, commit)
    assert info.value.status == 403 and "another identity" in info.value.reason
    assert await snapshot(alice, gid) == before  # nothing stored
    # A member's Add is still how she comes back.
    await add(bob, gid, carol)
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob", "carol"]


async def test_a_knock_is_committed_and_its_welcome_delivered(url: str) -> None:
    alice, bob, dave = await people(url, "alice", "bob", "dave")
    gid = await start_group(alice, bob)
    assert alice.group is not None
    # dave asks to join with a KeyPackage he made for it, never uploaded.
    knock = Group.new_member_add_proposal(dave.mls, await dave.ds.fetch_group_info(gid))
    await dave.ds.send(gid, knock)
    await alice.catch_up(gid)
    res = alice.group.commit([], include_pending=True)
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    assert res.welcome is not None
    await alice.ds.send_welcome(gid, res.welcome)  # addressed to the knock's KeyPackage
    [w] = await dave.ds.welcomes()
    dave.group = Group.join(dave.mls, w.welcome)
    assert dave.group.epoch_authenticator == alice.group.epoch_authenticator
    assert (await alice.ds.group(gid))["members"] == ["alice", "bob", "dave"]


# -- databases made before removals recorded who asked for them


OLD_REMOVALS = (
    "CREATE TABLE removals (group_id {blob} NOT NULL, identity TEXT NOT NULL, seq {int} NOT "
    "NULL, PRIMARY KEY (group_id, identity, seq))"
)


async def test_sqlite_migration_counts_old_removals_as_expulsions(tmp_path: Path) -> None:

    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as db:
        db.execute(OLD_REMOVALS.format(blob="BLOB", int="INTEGER"))
        db.execute("INSERT INTO removals VALUES (?, 'carol', 3)", (b"g",))
    storage = SQLiteStorage(path)
    await storage.open()
    try:
        assert await storage.is_expelled(b"g", "carol")
        assert not await storage.is_expelled(b"g", "bob")
    finally:
        await storage.close()
    reopened = SQLiteStorage(path)  # a second open finds the column and leaves it be
    await reopened.open()
    await reopened.close()


async def test_postgres_migration_counts_old_removals_as_expulsions() -> None:
    from delivery_service.storage.postgres import PostgresStorage

    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute(OLD_REMOVALS.format(blob="BYTEA", int="BIGINT"))
        await conn.execute("INSERT INTO removals VALUES ($1, 'carol', 3)", b"g")
    finally:
        await conn.close()
    storage = PostgresStorage(dsn, schema=schema)
    try:
        await storage.open()
        assert await storage.is_expelled(b"g", "carol")
        assert not await storage.is_expelled(b"g", "bob")
        await storage.close()
        await storage.open()  # the migration runs again harmlessly
        await storage.close()
    finally:
        await drop_schema(dsn, schema)
