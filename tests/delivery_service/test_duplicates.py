"""A handshake message is logged once: a retry by its poster gets the first answer, a copy from
anyone else a 409 `duplicate`, and nothing is stored again (the auditor takes a message logged
twice for a replay by the service). Both storage backends."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from delivery_service.errors import DuplicateMessage, RequestFailed
from delivery_service.storage import NewMessage, Storage
from delivery_service.storage.base import HANDSHAKE_KINDS, message_digest
from delivery_service.tracker import GroupState

from .conftest import Database, run_sql
from .mlsgroups import people, start_group

NOW = 1_800_000_000


def _message(kind: str, data: bytes, recipients: tuple[str, ...] | None = None) -> NewMessage:
    return NewMessage(kind, 0, "alice", 0, NOW * 1000, data, recipients)


async def test_storage_keeps_each_handshake_message_once(
    database: Database, storage: Storage
) -> None:
    gid = os.urandom(8)
    s0 = GroupState(gid, 0, 0, frozenset({"alice", "bob"}))
    assert await storage.create_group(s0, "alice", NOW)
    data = os.urandom(40)
    assert await storage.append(s0, s0, _message("proposal", data)) == 1
    s1 = replace(s0, last_seq=1)
    dropped = replace(s1, epoch=1, members=frozenset({"bob"}))
    for kind in HANDSHAKE_KINDS:  # the same bytes, whatever they are posted as
        again = _message(kind, data, ("bob",) if kind == "welcome" else None)
        with pytest.raises(DuplicateMessage) as info:
            await storage.append(s1, dropped, again)
        assert info.value.seq == 1
    # Nothing of the refused appends stayed: not the state, not a removal, not a Welcome.
    assert await storage.get_group(gid) == s1
    assert await storage.removed_at(gid, "alice") is None
    assert await storage.welcomes_after("bob", 0) == []
    assert [m.seq for m in await storage.audit_log(gid, 0, 100)] == [1]
    found = await storage.find_handshake(gid, message_digest(data))
    assert found is not None and (found.seq, found.kind, found.data) == (1, "proposal", data)
    assert await storage.find_handshake(gid, message_digest(b"other")) is None
    # Application data is not in the audit log: it may repeat. Another group may hold the bytes.
    assert await storage.append(s1, s1, _message("application", data)) == 2
    other_gid = os.urandom(8)
    t0 = GroupState(other_gid, 0, 0, frozenset({"alice"}))
    assert await storage.create_group(t0, "alice", NOW)
    assert await storage.append(t0, t0, _message("proposal", data)) == 1
    # A second instance on the same database is held to the same unique key.
    second = database.storage(another=True)
    await second.open()
    try:
        s2 = replace(s1, last_seq=2)
        with pytest.raises(DuplicateMessage) as info:
            await second.append(s2, s2, _message("proposal", data))
        assert info.value.seq == 1
    finally:
        await second.close()
    assert (await storage.get_group(gid)) == replace(s1, last_seq=2)


async def test_a_database_from_before_the_digests_gets_them_when_opened(
    database: Database,
) -> None:
    storage = database.storage()
    await storage.open()
    gid = os.urandom(8)
    state = GroupState(gid, 0, 0, frozenset({"alice"}))
    first, second = os.urandom(30), os.urandom(30)
    try:
        assert await storage.create_group(state, "alice", NOW)
        assert await storage.append(state, state, _message("proposal", first)) == 1
        state = replace(state, last_seq=1)
        assert await storage.append(state, state, _message("group_info", second)) == 2
    finally:
        await storage.close()
    # Before: no digest table, and a repeat (seq 3 = seq 1) could be logged.
    await run_sql(
        database,
        "DROP TABLE handshake_digests",
        "INSERT INTO messages SELECT group_id, 3, kind, epoch, sender, sender_index, created_ms,"
        " data, restricted FROM messages WHERE seq = 1",
        "UPDATE groups SET last_seq = 3",
    )
    storage = database.storage()
    await storage.open()
    try:
        found = [await storage.find_handshake(gid, message_digest(d)) for d in (first, second)]
        assert [m.seq if m else None for m in found] == [1, 2]
        state = replace(state, last_seq=3)
        for data, seq in ((first, 1), (second, 2)):
            with pytest.raises(DuplicateMessage) as info:
                await storage.append(state, state, _message("commit", data))
            assert info.value.seq == seq
        assert await storage.append(state, state, _message("commit", os.urandom(30))) == 4
    finally:
        await storage.close()


async def test_a_retried_handshake_message_is_answered_as_before_and_logged_once(
    url: str,
) -> None:
    alice, bob, carol, dave = await people(url, "alice", "bob", "carol", "dave")
    gid = await start_group(alice, bob)
    assert alice.group is not None
    # A GroupInfo PUT again (a client retrying after a timeout): the first answer, once logged.
    gi = alice.group.group_info()
    seq = await alice.ds.publish_group_info(gid, gi)
    assert await alice.ds.publish_group_info(gid, gi) == seq
    # A commit and its Welcome, each posted twice.
    kp = await alice.ds.claim_key_package("carol")
    res = alice.group.add([kp])
    accepted = await alice.ds.send(gid, res.commit, group_info=res.group_info)
    assert await alice.ds.send(gid, res.commit, group_info=res.group_info) == accepted
    alice.group.merge_pending_commit()
    assert res.welcome is not None
    welcome_seq = await alice.ds.send_welcome(gid, res.welcome)
    assert await alice.ds.send_welcome(gid, res.welcome) == welcome_seq
    assert [w.seq for w in await carol.ds.welcomes()] == [welcome_seq]
    # Another member posting the same Welcome: 409 duplicate, naming the original.
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send_welcome(gid, res.welcome)
    assert (info.value.status, info.value.code) == (409, "duplicate")
    assert info.value.extra["seq"] == welcome_seq and str(welcome_seq) in info.value.reason
    # A non-member learns nothing of the log: refused as any non-member is.
    with pytest.raises(RequestFailed) as info:
        await dave.ds.send_welcome(gid, res.welcome)
    assert (info.value.status, info.value.code) == (403, "forbidden")
    # A proposal posted twice, then by another member.
    await bob.catch_up(gid)
    assert bob.group is not None
    proposal = bob.group.leave()
    first = await bob.ds.send(gid, proposal)
    assert await bob.ds.send(gid, proposal) == first
    last_seq = (await alice.ds.group(gid))["seq"]
    with pytest.raises(RequestFailed) as info:
        await alice.ds.send(gid, proposal)
    assert (info.value.status, info.value.code, info.value.extra["seq"]) == (
        409, "duplicate", first.seq
    )
    view = await alice.ds.group(gid)
    assert (view["seq"], view["epoch"]) == (last_seq, accepted.epoch)
    log = await alice.ds.audit_log(gid)
    assert len({m.message for m in log}) == len(log)
    assert [m.seq for m in log].count(first.seq) == 1
