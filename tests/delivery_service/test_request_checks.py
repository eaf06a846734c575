"""Requests the service must refuse with a 4xx, the same on SQLite and PostgreSQL, before
anything reaches the database: a Welcome of another cipher suite or with too many secrets, an
identity the databases cannot hold (U+0000), a group that cannot advance its epoch, a query
integer padded with zeros."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import cbor2
import pytest

from delivery_service.errors import RequestFailed
from delivery_service.server import MAX_INT, MAX_WELCOME_SECRETS
from delivery_service.wire import parse_key_package
from mls.client import Client
from mls.commit import HPKECiphertext
from mls.framing import MLSMessage
from mls.group import Group
from mls.welcome import EncryptedGroupSecrets, Welcome

from . import mlsmsg
from .conftest import MakeClient, Served
from .mlsgroups import people
from .test_api import new_group

CBOR = {"Content-Type": "application/cbor"}


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, session: str | None = None,
    body: dict[str, Any] | None = None,
) -> tuple[int, Any]:
    headers = dict(CBOR) if body is not None else {}
    if session:
        headers["Authorization"] = f"Bearer {session}"
    data = cbor2.dumps(body) if body is not None else None
    async with http.request(method, url, data=data, headers=headers) as r:
        return r.status, cbor2.loads(await r.read())


def _welcome(refs: list[bytes], suite: int = 1) -> bytes:
    # Small secrets, so that many fit in a test service's body limit.
    secrets = [EncryptedGroupSecrets(r, HPKECiphertext(b"k", b"c")) for r in refs]
    return MLSMessage(Welcome(suite, secrets, b"x")).encode()


async def _no_500(http: aiohttp.ClientSession, url: str) -> None:
    async with http.get(url + "/metrics") as r:
        assert 'status="500"' not in await r.text()


async def test_a_welcome_of_another_cipher_suite_than_the_groups_is_refused(url: str) -> None:
    alice, carol = await people(url, "alice", "carol")
    gid = os.urandom(16)
    alice.group = Group.create(alice.mls, gid)
    await alice.ds.create_group(gid, alice.group.group_info())
    kp = await alice.ds.claim_key_package("carol")
    res = alice.group.add([kp])
    await alice.ds.send(gid, res.commit, group_info=res.group_info)
    alice.group.merge_pending_commit()
    ref = parse_key_package(kp).ref
    seq = (await alice.ds.group(gid))["seq"]
    for suite in (3, 0xFFFF):
        with pytest.raises(RequestFailed) as info:
            await alice.ds.send_welcome(gid, _welcome([ref], suite))
        assert info.value.status == 400
        assert f"cipher suite {suite}, the group's is 1" in info.value.reason
    assert (await alice.ds.group(gid))["seq"] == seq
    assert await carol.ds.welcomes() == []
    assert res.welcome is not None  # the real one, of the group's suite, goes through
    assert await alice.ds.send_welcome(gid, res.welcome) == seq + 1


async def test_a_welcome_with_too_many_secrets_is_refused_and_repeated_refs_count_once(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _), (bob, bob_mls)] = await new_group(make_client, "alice", "bob")
    await bob.upload_key_packages([bob_mls.key_package()])
    ref = parse_key_package(await alice.claim_key_package("bob")).ref
    with pytest.raises(RequestFailed) as info:
        await alice.send_welcome(gid, _welcome([ref] * (MAX_WELCOME_SECRETS + 1)))
    assert info.value.status == 400
    assert f"at most {MAX_WELCOME_SECRETS}" in info.value.reason
    with pytest.raises(RequestFailed) as info:  # one unknown ref among known ones
        await alice.send_welcome(gid, _welcome([ref, os.urandom(32), ref]))
    assert info.value.status == 400 and "not claimed" in info.value.reason
    assert (await alice.group(gid))["seq"] == 1
    async with aiohttp.ClientSession() as http:
        status, body = await _call(
            http, "POST", f"{served.url}/v1/groups/{gid.hex()}/welcomes", alice.session,
            {"welcome": _welcome([ref] * MAX_WELCOME_SECRETS)},
        )
    assert (status, body) == (201, {"seq": 2, "recipients": ["bob"]})
    assert [w.seq for w in await bob.welcomes()] == [2]


async def test_identities_with_a_control_character_are_a_400_everywhere(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    base = served.url
    async with aiohttp.ClientSession() as http:
        answers = [
            await _call(http, "POST", f"{base}/v1/identities/a%00b/key_package", alice.session),
            await _call(http, "POST", f"{base}/v1/identities/a%07b/key_package", alice.session),
            await _call(http, "POST", f"{base}/v1/sessions", None,
                        {"identity": "a\x00b", "challenge": os.urandom(32), "signature": b"x"}),
            await _call(http, "POST", f"{base}/v1/groups/{gid.hex()}/messages", alice.session,
                        {"message": mlsmsg.commit(gid, 0), "adds": ["a\x00b"]}),
            await _call(http, "POST", f"{base}/v1/groups/{gid.hex()}/messages", alice.session,
                        {"message": mlsmsg.commit(gid, 0), "removes": ["a\x00b"]}),
        ]
        for status, body in answers:
            assert (status, body["error"]) == (400, "bad_request"), body
            assert "control characters" in body["reason"]
        await _no_500(http, base)
    assert (await alice.group(gid))["seq"] == 0


async def test_a_leaf_whose_identity_has_a_control_character_is_a_400(url: str) -> None:
    (alice,) = await people(url, "alice")
    gid = os.urandom(16)
    group = Group.create(alice.mls, gid)
    res = group.add([Client(b"x\x00y", 1).key_package()])
    group.merge_pending_commit()
    with pytest.raises(RequestFailed) as info:
        await alice.ds.create_group(gid, res.group_info or group.group_info())
    assert info.value.status == 400
    assert "leaf for 'x\\x00y'" in info.value.reason and "control" in info.value.reason
    async with aiohttp.ClientSession() as http:
        await _no_500(http, url)


async def test_a_knock_for_an_identity_with_a_control_character_is_a_400(url: str) -> None:
    alice, bob = await people(url, "alice", "bob")
    gid = os.urandom(16)
    alice.group = Group.create(alice.mls, gid)
    gi = alice.group.group_info()
    await alice.ds.create_group(gid, gi)
    knock = Group.new_member_add_proposal(Client(b"b\x00b", 1), gi)
    with pytest.raises(RequestFailed) as info:
        await bob.ds.send(gid, knock)
    assert info.value.status == 400 and "control characters" in info.value.reason
    assert (await alice.ds.group(gid))["seq"] == 0
    async with aiohttp.ClientSession() as http:
        await _no_500(http, url)


async def test_a_group_whose_epoch_cannot_advance_is_refused(
    make_client: MakeClient, served: Served
) -> None:
    alice, _ = await make_client("alice")
    gid = os.urandom(16)
    with pytest.raises(RequestFailed) as info:
        await alice.create_group(gid, mlsmsg.group_info(gid, MAX_INT))
    assert info.value.status == 400 and "advance" in info.value.reason
    # One below: it reaches the last epoch, and the commit after that is refused, not a 500.
    assert await alice.create_group(gid, mlsmsg.group_info(gid, MAX_INT - 1)) == MAX_INT - 1
    assert (await alice.send(gid, mlsmsg.commit(gid, MAX_INT - 1))).epoch == MAX_INT
    with pytest.raises(RequestFailed) as info:
        await alice.send(gid, mlsmsg.commit(gid, MAX_INT))
    assert info.value.status == 400 and "cannot advance" in info.value.reason
    view = await alice.group(gid)
    assert (view["epoch"], view["seq"]) == (MAX_INT, 1)


async def test_query_integers_are_read_whole(make_client: MakeClient, served: Served) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    for epoch in range(3):
        await alice.send(gid, mlsmsg.commit(gid, epoch))
    base = f"{served.url}/v1/groups/{gid.hex()}/messages?after="
    async with aiohttp.ClientSession() as http:
        for after, seqs in (("0" * 41 + "2", [3]), ("0" * 3000 + "1", [2, 3]), ("-0", [1, 2, 3]),
                            ("0" * 50 + str(MAX_INT), [])):
            status, body = await _call(http, "GET", base + after, alice.session)
            assert status == 200, (after[-30:], body)
            assert [m["seq"] for m in body["messages"]] == seqs
        for after in ("1" + "0" * 19, "0" * 41 + "1" + "0" * 19, str(MAX_INT + 1), "-1"):
            status, body = await _call(http, "GET", base + after, alice.session)
            assert (status, body["error"]) == (400, "bad_request"), after
            assert "'after'" in body["reason"]
