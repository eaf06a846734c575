"""The /v1/ API end to end, through the client library, on both storage backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

import aiohttp
import cbor2
import pytest

from delivery_service.client import Message, PushError, Removed, WelcomeMessage
from delivery_service.errors import RequestFailed, StaleEpochRejected
from delivery_service.ratelimit import RateLimiter
from mls.crypto import get_crypto
from sfu.tokens import verify_room_token

from . import mlsmsg
from .conftest import MakeClient, Served


async def new_group(make_client: MakeClient, *names: str):  # type: ignore[no-untyped-def]
    """A group created by the first name, with the others added by one commit (epoch 1)."""
    clients = [await make_client(n) for n in names]
    owner = clients[0][0]
    gid = os.urandom(16)
    assert await owner.create_group(gid) == 0
    if len(names) > 1:
        accepted = await owner.send(gid, mlsmsg.commit(gid, 0), adds=list(names[1:]))
        assert (accepted.seq, accepted.epoch) == (1, 1)
    return gid, clients


async def test_register_login_and_logout(make_client: MakeClient) -> None:
    alice, _ = await make_client("alice")
    first = alice.session
    await alice.login()
    assert alice.session != first
    assert await alice.key_package_count() == 0
    await alice.logout()
    assert alice.session is None


async def test_identity_cannot_be_taken_over(make_client: MakeClient, served: Served) -> None:
    await make_client("alice")
    mallory, _ = await make_client("mallory", register=False)
    # Mallory registers "alice" with her own key: refused, and no session for alice.
    mallory.identity = "alice"
    with pytest.raises(RequestFailed) as info:
        await mallory.register()
    assert (info.value.status, info.value.code) == (409, "conflict")
    # Nor can she log in as alice: her key does not verify.
    with pytest.raises(RequestFailed) as info:
        await mallory.login()
    assert info.value.status == 401
    assert mallory.session is None


async def test_registration_refuses_bad_keys_and_suites(
    make_client: MakeClient, served: Served
) -> None:
    zed, _ = await make_client("zed", register=False)
    for key in (b"abc", bytes(32) + b"x", b""):
        zed.signature_public = key
        with pytest.raises(RequestFailed) as info:
            await zed.register()
        assert info.value.status == 400 and "public key" in info.value.reason
    with pytest.raises(RequestFailed) as info:
        await zed.login()
    assert info.value.status == 401  # never registered
    body = {**await zed._proof(), "cipher_suite": 99, "signature_key": bytes(32)}
    async with aiohttp.ClientSession() as http:
        async with http.post(served.url + "/v1/identities", data=cbor2.dumps(body),
                             headers={"Content-Type": "application/cbor"}) as resp:
            assert resp.status == 400
            assert "cipher suite" in cbor2.loads(await resp.read())["reason"]


async def test_replayed_challenge_is_refused(make_client: MakeClient, served: Served) -> None:
    alice, _ = await make_client("alice")
    proof = await alice._proof()
    async with aiohttp.ClientSession() as http:
        for expected in (201, 401):
            async with http.post(served.url + "/v1/sessions", data=cbor2.dumps(proof),
                                 headers={"Content-Type": "application/cbor"}) as resp:
                body = cbor2.loads(await resp.read())
                assert resp.status == expected, body
    assert body["error"] == "unauthorized" and "challenge" in body["reason"]


async def test_expired_and_revoked_sessions(make_client: MakeClient, served: Served) -> None:
    alice, _ = await make_client("alice")
    token = alice.session
    async with aiohttp.ClientSession() as http:
        async def count(tok: str | None) -> int:
            async with http.get(served.url + "/v1/key_packages/count",
                                headers={"Authorization": f"Bearer {tok}"}) as resp:
                return resp.status

        assert await count(token) == 200
        served.service.config.session_ttl = -1
        await alice.login()  # a session that is born expired
        assert await count(alice.session) == 401
        served.service.config.session_ttl = 3600
        await alice.logout()
        # logout revoked only the expired one; revoke the first too and check it is refused
        alice.session = token
        await alice.logout()
        assert await count(token) == 401
        assert await count("garbage") == 401
        assert await count(None) == 401


async def test_key_packages_claim_once_last_resort_and_count(make_client: MakeClient) -> None:
    alice, alice_mls = await make_client("alice")
    bob, _ = await make_client("bob")
    kps = [alice_mls.key_package() for _ in range(5)]
    last = alice_mls.key_package()
    assert await alice.upload_key_packages(kps, last_resort=last) == 5
    # Re-uploading the same packages adds nothing.
    assert await alice.upload_key_packages(kps[:2]) == 5
    claimed = await asyncio.gather(*(bob.claim_key_package("alice") for _ in range(8)))
    assert sorted(c for c in claimed if c != last) == sorted(kps)
    assert claimed.count(last) == 3
    assert await alice.key_package_count() == 0
    with pytest.raises(RequestFailed) as info:
        await bob.claim_key_package("carol")
    assert info.value.status == 410


async def test_expired_key_packages_are_refused(make_client: MakeClient) -> None:
    alice, alice_mls = await make_client("alice")
    expired = alice_mls.key_package(lifetime=-7200)
    with pytest.raises(RequestFailed) as info:
        await alice.upload_key_packages([expired])
    assert info.value.status == 400 and "expired" in info.value.reason


async def test_key_packages_that_live_longer_than_members_accept_are_refused(
    make_client: MakeClient,
) -> None:
    from mls.client import _CLOCK_SKEW, MAX_LEAF_LIFETIME

    alice, alice_mls = await make_client("alice")
    longest = alice_mls.key_package(lifetime=MAX_LEAF_LIFETIME - _CLOCK_SKEW)
    await alice.upload_key_packages([longest])
    too_long = alice_mls.key_package(lifetime=MAX_LEAF_LIFETIME - _CLOCK_SKEW + 1)
    with pytest.raises(RequestFailed) as info:
        await alice.upload_key_packages([too_long])
    assert info.value.status == 400 and "§7.2" in info.value.reason
    assert await alice.key_package_count() == 1


async def test_key_package_of_another_identity_is_refused(make_client: MakeClient) -> None:
    alice, _ = await make_client("alice")
    _, bob_mls = await make_client("bob")
    with pytest.raises(RequestFailed) as info:
        await alice.upload_key_packages([bob_mls.key_package()])
    assert info.value.status == 403
    tampered = bytearray(bob_mls.key_package())
    tampered[-1] ^= 1
    bob, _ = await make_client("bob2")
    with pytest.raises(RequestFailed) as info:
        await bob.upload_key_packages([bytes(tampered)])
    assert info.value.status in (400, 403)


async def test_commits_are_ordered_one_per_epoch(make_client: MakeClient) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    assert (await bob.send(gid, mlsmsg.commit(gid, 1, 1))).epoch == 2
    with pytest.raises(StaleEpochRejected) as info:
        await alice.send(gid, mlsmsg.commit(gid, 1, 0))
    assert (info.value.status, info.value.current_epoch) == (409, 2)
    with pytest.raises(StaleEpochRejected):
        await alice.send(gid, mlsmsg.commit(gid, 5, 0))  # a future epoch is as wrong
    # Proposals and application messages do not change the epoch.
    assert (await alice.send(gid, mlsmsg.proposal(gid, 2))).epoch == 2
    assert (await alice.send(gid, mlsmsg.application(gid, 2))).epoch == 2
    info_group = await alice.group(gid)
    assert (info_group["epoch"], info_group["seq"], info_group["members"]) == (2, 4, ["alice", "bob"])


async def test_fifty_concurrent_commits_one_wins(make_client: MakeClient, served: Served) -> None:
    names = [f"m{i}" for i in range(10)]
    gid, clients = await new_group(make_client, *names)
    results = await asyncio.gather(
        *(clients[i % 10][0].send(gid, mlsmsg.commit(gid, 1, i % 10)) for i in range(50)),
        return_exceptions=True,
    )
    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(accepted) == 1 and accepted[0].epoch == 2
    assert all(isinstance(r, StaleEpochRejected) and r.current_epoch == 2 for r in refused)
    # Everyone sees the same log: create's epoch 0 commit, then the winner.
    logs = [await c.messages(gid) for c, _ in clients]
    assert all([m.seq for m in log] == [1, 2] for log in logs)
    assert len({log[-1].message for log in logs}) == 1
    # Per-group locks live only while in use: the table does not grow with the groups served.
    assert served.service._group_locks == {}


async def test_not_members_and_wrong_groups(make_client: MakeClient) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    eve, _ = await make_client("eve")
    for call in (
        eve.send(gid, mlsmsg.commit(gid, 0)),
        eve.messages(gid),
        eve.room_token(gid),
        eve.group(gid),
        eve.audit_log(gid),
    ):
        with pytest.raises(RequestFailed) as info:
            await call
        assert info.value.status == 403
    unknown = os.urandom(16)
    with pytest.raises(RequestFailed) as info:
        await alice.send(unknown, mlsmsg.commit(unknown, 0))
    assert info.value.status == 404
    other = os.urandom(16)
    with pytest.raises(RequestFailed) as info:
        await alice.send(gid, mlsmsg.commit(other, 0))  # header names another group
    assert info.value.status == 400
    with pytest.raises(RequestFailed) as info:
        await alice.send(gid, mlsmsg.private_commit(gid, 0))
    assert info.value.status == 400 and "PublicMessage" in info.value.reason
    with pytest.raises(RequestFailed) as info:
        await alice.create_group(gid)
    assert info.value.status == 409
    assert [m.seq for m in await alice.messages(gid)] == []


async def test_welcome_reaches_only_its_recipient(make_client: MakeClient) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    bob, bob_mls = await make_client("bob")
    carol, _ = await make_client("carol")
    await bob.upload_key_packages([bob_mls.key_package()])
    kp = await alice.claim_key_package("bob")
    ref = get_crypto(1).make_key_package_ref(mlsmsg.MLSMessage.decode(kp).key_package.encode())
    welcome = mlsmsg.welcome([ref])
    with pytest.raises(RequestFailed) as info:  # Welcome before the commit that adds bob
        await alice.send_welcome(gid, welcome)
    assert info.value.status == 409
    await alice.send(gid, mlsmsg.commit(gid, 0), adds=["bob"])
    seq = await alice.send_welcome(gid, welcome)
    assert seq == 2
    [w] = await bob.welcomes()
    assert (w.group_id, w.seq, w.welcome) == (gid, 2, welcome)
    assert await carol.welcomes() == []
    # In the group log the Welcome is visible to bob, not to other members' catch-up.
    assert [m.kind for m in await bob.messages(gid)] == ["commit", "welcome"]
    assert [m.kind for m in await alice.messages(gid)] == ["commit"]
    with pytest.raises(RequestFailed) as info:  # addressed to a KeyPackage nobody claimed here
        await alice.send_welcome(gid, mlsmsg.welcome([os.urandom(32)]))
    assert info.value.status == 400


async def test_group_info_for_external_join(make_client: MakeClient) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    dave, _ = await make_client("dave")
    with pytest.raises(RequestFailed) as info:
        await dave.fetch_group_info(gid)
    assert info.value.status == 404
    gi1 = mlsmsg.group_info(gid, 1)
    await alice.send(gid, mlsmsg.commit(gid, 0), group_info=gi1)
    assert await dave.fetch_group_info(gid) == gi1
    with pytest.raises(StaleEpochRejected):
        await alice.publish_group_info(gid, mlsmsg.group_info(gid, 0))
    gi1b = mlsmsg.group_info(gid, 1)
    await alice.publish_group_info(gid, gi1b)
    assert await dave.fetch_group_info(gid) == gi1b
    # Dave joins by an external commit and becomes a member.
    accepted = await dave.send(gid, mlsmsg.commit(gid, 1, external=True))
    assert accepted.epoch == 2
    assert (await dave.group(gid))["members"] == ["alice", "dave"]


async def test_audit_log_lists_handshakes_only(make_client: MakeClient) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    await alice.send(gid, mlsmsg.application(gid, 1))
    await bob.send(gid, mlsmsg.proposal(gid, 1, 1))
    await bob.send(gid, mlsmsg.commit(gid, 1, 1), removes=["alice"])
    auditor, _ = await make_client("auditor")
    entries = await auditor.audit_log(gid)
    assert [(e.seq, e.kind, e.epoch, e.sender, e.sender_index) for e in entries] == [
        (1, "commit", 0, "alice", 0),
        (3, "proposal", 1, "bob", 1),
        (4, "commit", 1, "bob", 1),
    ]
    assert all(e.time_ms > 0 for e in entries)
    assert [e.seq for e in await auditor.audit_log(gid, after=3)] == [4]
    # alice was removed: she reads up to the commit that removed her, then nothing more.
    await bob.send(gid, mlsmsg.application(gid, 2))
    assert [m.seq for m in await alice.messages(gid, after=1)] == [2, 3, 4]
    for call in (alice.audit_log(gid), alice.group(gid), alice.send(gid, mlsmsg.commit(gid, 2))):
        with pytest.raises(RequestFailed) as info:
            await call
        assert info.value.status == 403


async def test_room_tokens_only_for_members(make_client: MakeClient, served: Served) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    asked = time.time()
    token = await bob.room_token(gid)
    assert token.room == gid.hex()
    expires_at = verify_room_token(
        served.service.config.room_secret, token.token, gid.hex(), "bob"
    )
    # ttl: what a client times its renewal by, whatever its own clock says
    assert token.ttl == served.service.config.room_token_ttl
    assert expires_at == token.expires_at
    assert expires_at >= asked + token.ttl  # at least the lifetime renewals are timed by
    await alice.send(gid, mlsmsg.commit(gid, 1), removes=["bob"])
    with pytest.raises(RequestFailed) as info:
        await bob.room_token(gid)
    assert info.value.status == 403


async def test_push_and_catch_up(make_client: MakeClient) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    stream = await bob.connect()
    await stream.subscribe(gid, after=0)
    first = await stream.next(timeout=5)
    assert isinstance(first, Message) and (first.seq, first.kind) == (1, "commit")
    app = mlsmsg.application(gid, 1)
    await alice.send(gid, app)
    pushed = await stream.next(timeout=5)
    assert isinstance(pushed, Message) and pushed.message == app and pushed.seq == 2
    await stream.close()
    # Offline while three messages arrive; a new stream from seq 2 gets exactly those.
    sent = [mlsmsg.application(gid, 1) for _ in range(3)]
    for m in sent:
        await alice.send(gid, m)
    stream = await bob.connect()
    await stream.subscribe(gid, after=2)
    got = [await stream.next(timeout=5) for _ in range(3)]
    assert [(g.seq, g.message) for g in got] == list(zip([3, 4, 5], sent, strict=True))  # type: ignore[union-attr]
    await stream.close()


async def test_stream_reconnects_without_gaps(make_client: MakeClient, served: Served) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    stream = await bob.connect()
    await stream.subscribe(gid, after=1)
    await alice.send(gid, mlsmsg.application(gid, 1))
    assert (await stream.next(timeout=5)).seq == 2  # type: ignore[union-attr]
    # The server drops every socket; messages sent meanwhile arrive after the reconnect.
    for conn in list(served.service.hub.connections):
        await conn.ws.close()
    for _ in range(3):
        await alice.send(gid, mlsmsg.application(gid, 1))
    seqs = [(await stream.next(timeout=5)).seq for _ in range(3)]  # type: ignore[union-attr]
    assert seqs == [3, 4, 5]
    await stream.close()


async def test_push_welcome_and_removal(make_client: MakeClient) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    carol, carol_mls = await make_client("carol")
    await carol.upload_key_packages([carol_mls.key_package()])
    carol_stream = await carol.connect()
    await carol_stream.subscribe_welcomes()
    bob_stream = await bob.connect()
    await bob_stream.subscribe(gid, after=1)
    kp = await alice.claim_key_package("carol")
    ref = get_crypto(1).make_key_package_ref(mlsmsg.MLSMessage.decode(kp).key_package.encode())
    await alice.send(gid, mlsmsg.commit(gid, 1), adds=["carol"])
    await alice.send_welcome(gid, mlsmsg.welcome([ref]))
    w = await carol_stream.next(timeout=5)
    assert isinstance(w, WelcomeMessage) and w.group_id == gid and w.seq == 3
    assert (await bob_stream.next(timeout=5)).seq == 2  # type: ignore[union-attr]
    await carol_stream.subscribe(gid, after=w.seq)
    removal = mlsmsg.commit(gid, 2)
    await alice.send(gid, removal, removes=["bob"])
    # bob gets the commit that removes him (he learns it by processing it), then the end.
    last = await bob_stream.next(timeout=5)
    assert isinstance(last, Message) and (last.seq, last.message) == (4, removal)
    removed = await bob_stream.next(timeout=5)
    assert isinstance(removed, Removed) and (removed.group_id, removed.seq) == (gid, 4)
    await alice.send(gid, mlsmsg.application(gid, 3))
    got = await carol_stream.next(timeout=5)
    assert isinstance(got, Message) and (got.seq, got.epoch) == (4, 2)
    assert (await carol_stream.next(timeout=5)).seq == 5  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):  # nothing after the removal reaches bob
        await bob_stream.next(timeout=0.2)
    # A non-member cannot subscribe to the group's messages.
    eve, _ = await make_client("eve")
    eve_stream = await eve.connect()
    await eve_stream.subscribe(gid)
    refused = await eve_stream.next(timeout=5)
    assert isinstance(refused, PushError) and refused.code == "forbidden"
    for s in (bob_stream, carol_stream, eve_stream):
        await s.close()


async def test_bad_requests_leave_nothing_stored(make_client: MakeClient, served: Served) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    auth = {"Authorization": f"Bearer {alice.session}"}
    url = f"{served.url}/v1/groups/{gid.hex()}/messages"
    cases = [
        (b"\xff\x00garbage", "application/cbor", 400),
        (cbor2.dumps([1, 2]), "application/cbor", 400),
        (cbor2.dumps({"message": "text"}), "application/cbor", 400),
        (cbor2.dumps({"message": b"\x00\x01\x00\x01\x05"}), "application/cbor", 400),
        (cbor2.dumps({"message": mlsmsg.commit(gid, 0)}), "application/json", 415),
        (cbor2.dumps({"message": b"x" * 70_000}), "application/cbor", 413),
    ]
    async with aiohttp.ClientSession() as http:
        for data, ctype, status in cases:
            async with http.post(url, data=data, headers={**auth, "Content-Type": ctype}) as r:
                body = cbor2.loads(await r.read())
                assert r.status == status, body
                assert set(body) == {"error", "reason"} and body["reason"]
        async with http.get(served.url + "/v1/nowhere") as r:
            assert r.status == 404 and cbor2.loads(await r.read())["error"] == "not_found"
        async with http.get(f"{served.url}/v1/groups/zz/messages", headers=auth) as r:
            assert r.status == 400
    assert await alice.messages(gid) == []
    # Still serving.
    assert (await alice.send(gid, mlsmsg.commit(gid, 0))).seq == 1


async def test_healthz_and_metrics(make_client: MakeClient, served: Served) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    await alice.send(gid, mlsmsg.commit(gid, 0))
    with pytest.raises(StaleEpochRejected):
        await alice.send(gid, mlsmsg.commit(gid, 0))
    async with aiohttp.ClientSession() as http:
        async with http.get(served.url + "/healthz") as r:
            assert r.status == 200
        async with http.get(served.url + "/metrics") as r:
            text = await r.text()
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert 'ds_messages_accepted_total{kind="commit"} 1' in text
    assert 'ds_messages_rejected_total{error="stale_epoch"} 1' in text
    assert "# TYPE ds_http_requests_total counter" in text


async def test_websocket_refuses_bad_frames_and_keeps_serving(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    await alice.send(gid, mlsmsg.commit(gid, 0))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer x"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(served.url + "/v1/ws", headers=headers)
            assert info.value.status == 401
        async with http.ws_connect(served.url + "/v1/ws",
                                   headers={"Authorization": f"Bearer {alice.session}"}) as ws:
            for frame in (b"\xff\xfe", cbor2.dumps([1]), cbor2.dumps({"type": "dance"}),
                          cbor2.dumps({"type": "subscribe", "group_id": "text"})):
                await ws.send_bytes(frame)
                reply = cbor2.loads((await ws.receive(timeout=5)).data)
                assert reply["type"] == "error" and reply["error"] == "bad_request"
            await ws.send_str("hello")
            assert cbor2.loads((await ws.receive(timeout=5)).data)["type"] == "error"
            await ws.send_bytes(cbor2.dumps({"type": "subscribe", "group_id": gid, "after": 0}))
            kinds = [cbor2.loads((await ws.receive(timeout=5)).data)["type"] for _ in range(2)]
            assert kinds == ["subscribed", "message"]


async def test_concurrent_senders_push_in_order_without_gaps(make_client: MakeClient) -> None:
    names = ["alice", "bob", "carol", "dave"]
    gid, clients = await new_group(make_client, *names)
    streams = []
    for ds, _ in clients:
        s = await ds.connect()
        await s.subscribe(gid, after=0)
        streams.append(s)
    sent = await asyncio.gather(
        *(clients[i % 4][0].send(gid, mlsmsg.application(gid, 1)) for i in range(40))
    )
    assert sorted(a.seq for a in sent) == list(range(2, 42))
    for s in streams:
        got = [await s.next(timeout=5) for _ in range(41)]
        assert [g.seq for g in got] == list(range(1, 42))  # type: ignore[union-attr]
        await s.close()


async def post_challenges(url: str, n: int) -> tuple[list[int], Any, Any]:
    """POST /v1/challenges n times: the statuses, and the last answer's body and headers."""
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.post(url + "/v1/challenges") as r:
                statuses.append(r.status)
                body, headers = cbor2.loads(await r.read()), r.headers
    return statuses, body, headers


async def test_challenges_are_rate_limited_per_address(
    make_client: MakeClient, served: Served
) -> None:
    alice, _ = await make_client("alice")
    served.service.challenge_limiter = RateLimiter(rate=1, burst=2)
    statuses, body, headers = await post_challenges(served.url, 3)
    assert statuses == [201, 201, 429]
    assert body["error"] == "too_many_requests" and body["retry_after"] == 1
    assert headers["Retry-After"] == "1"
    # Other endpoints keep serving; the client waits out a short Retry-After by itself.
    assert await alice.key_package_count() == 0
    await alice.login()
    assert alice.session is not None


async def test_outstanding_challenges_are_bounded(served: Served) -> None:
    served.service.config.max_challenges = 2
    statuses, body, _ = await post_challenges(served.url, 3)
    assert statuses == [201, 201, 429]
    assert "outstanding" in body["reason"] and body["retry_after"] == 120


async def test_unreachable_database_is_a_503(
    make_client: MakeClient, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, _ = await make_client("alice")

    async def down(*args: object) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(served.service.storage, "get_group", down)
    monkeypatch.setattr(served.service.storage, "get_session", down)
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/v1/key_packages/count"):
            async with http.get(served.url + path,
                                headers={"Authorization": f"Bearer {alice.session}"}) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                if path == "/healthz":  # text, as its `ok`
                    error, _, reason = (await r.text()).partition(": ")
                    body = {"error": error, "reason": reason}
                else:
                    body = cbor2.loads(await r.read())
                assert body["error"] == "unavailable" and "retry" in body["reason"]
    monkeypatch.undo()
    assert await alice.key_package_count() == 0


async def test_websocket_ends_with_its_session(make_client: MakeClient, served: Served) -> None:
    served.service.config.session_check_interval = 0.05
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(served.url + "/v1/ws",
                                   headers={"Authorization": f"Bearer {bob.session}"}) as ws:
            await bob.logout()
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
    # The client library logs in again and resumes where it was.
    stream = await bob.connect()
    await stream.subscribe(gid, after=1)
    first, before = bob.session, set(served.service.hub.connections)
    await served.service.storage.delete_session(
        hashlib.sha256(bob.session.encode()).digest()  # type: ignore[union-attr]
    )
    async with asyncio.timeout(5):  # closed by the service, reopened by the client
        while not served.service.hub.connections or served.service.hub.connections & before:
            await asyncio.sleep(0.01)
    assert bob.session != first
    await alice.send(gid, mlsmsg.application(gid, 1))
    got = await stream.next(timeout=5)
    assert isinstance(got, Message) and got.seq == 2
    await stream.close()


async def test_push_connections_per_identity_are_capped(
    make_client: MakeClient, served: Served
) -> None:
    from delivery_service.hub import MAX_CONNECTIONS_PER_IDENTITY

    (alice, _), (bob, _) = await make_client("alice"), await make_client("bob")
    url = served.url + "/v1/ws"
    async with aiohttp.ClientSession() as http:
        sockets = [
            await http.ws_connect(url, headers={"Authorization": f"Bearer {alice.session}"})
            for _ in range(MAX_CONNECTIONS_PER_IDENTITY)
        ]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, headers={"Authorization": f"Bearer {alice.session}"})
        assert refused.value.status == 429
        # others are not affected, and a closed socket frees its place
        other = await http.ws_connect(url, headers={"Authorization": f"Bearer {bob.session}"})
        await sockets.pop().close()
        async with asyncio.timeout(5):
            while served.service.hub.full("alice"):
                await asyncio.sleep(0.01)
        sockets.append(
            await http.ws_connect(url, headers={"Authorization": f"Bearer {alice.session}"})
        )
        for ws in (*sockets, other):
            await ws.close()
    async with asyncio.timeout(5):
        while served.service.hub.per_identity:
            await asyncio.sleep(0.01)


async def test_pages_are_bounded_in_bytes_and_page_through(
    make_client: MakeClient, served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from delivery_service import server as server_module

    monkeypatch.setattr(server_module, "BATCH_BYTES", 3000)
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    for _ in range(5):
        await alice.send(gid, mlsmsg.application(gid, 1, size=1200))
    seqs, lengths, after = [], [], 0
    while page := await bob.messages(gid, after=after):
        seqs += [m.seq for m in page]
        lengths.append(len(page))
        after = page[-1].seq
    assert seqs == list(range(1, 7))
    assert len(lengths) >= 3 and max(lengths[1:]) <= 2  # 2 x 1200 bytes fit in 3000, not 3


async def test_bytes_posted_per_identity_are_rate_limited(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    served.service.upload_limiter = RateLimiter(rate=10, burst=5000)  # bytes
    sent = [await alice.send(gid, mlsmsg.application(gid, 1, size=1200)) for _ in range(3)]
    with pytest.raises(RequestFailed) as refused:
        await alice.send(gid, mlsmsg.application(gid, 1, size=1200))
    assert refused.value.status == 429 and refused.value.code == "too_many_requests"
    assert refused.value.extra["retry_after"] >= 1
    # nothing stored for the refused one; another identity has its own budget
    assert [m.seq for m in await bob.messages(gid, after=1)] == [s.seq for s in sent]
    assert (await bob.send(gid, mlsmsg.application(gid, 1, size=1200))).seq == sent[-1].seq + 1


async def test_stored_key_packages_are_capped(make_client: MakeClient, served: Served) -> None:
    served.service.config.max_key_packages_stored = 3
    alice, alice_mls = await make_client("alice")
    assert await alice.upload_key_packages([alice_mls.key_package() for _ in range(2)]) == 2
    with pytest.raises(RequestFailed) as info:
        await alice.upload_key_packages([alice_mls.key_package() for _ in range(2)])
    assert info.value.status == 409 and info.value.extra["count"] == 2
    assert await alice.key_package_count() == 2
    # The last-resort package does not count: it is one per upload and never consumed.
    assert await alice.upload_key_packages([alice_mls.key_package()],
                                           last_resort=alice_mls.key_package()) == 3


async def test_member_removed_while_away_gets_the_commit_then_the_end(
    make_client: MakeClient,
) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    removal = mlsmsg.commit(gid, 1)
    await alice.send(gid, mlsmsg.application(gid, 1))
    assert (await alice.send(gid, removal, removes=["bob"])).seq == 3
    await alice.send(gid, mlsmsg.application(gid, 2))  # after bob's removal: not for him
    stream = await bob.connect()
    await stream.subscribe(gid, after=1)
    got = [await stream.next(timeout=5) for _ in range(3)]
    assert [(type(g).__name__, g.seq) for g in got] == [  # type: ignore[union-attr]
        ("Message", 2), ("Message", 3), ("Removed", 3)]
    assert got[1].message == removal  # type: ignore[union-attr]
    with pytest.raises(TimeoutError):
        await stream.next(timeout=0.2)
    # Subscribing again, past the commit: just the end. Someone never a member: refused.
    await stream.subscribe(gid, after=3)
    assert isinstance(await stream.next(timeout=5), Removed)
    eve, _ = await make_client("eve")
    with pytest.raises(RequestFailed) as info:
        await eve.messages(gid)
    assert info.value.status == 403
    await stream.close()


async def test_basic_tracker_bars_those_a_commit_removes_from_external_joins(
    make_client: MakeClient,
) -> None:
    gid, [(alice, _), (bob, _)] = await new_group(make_client, "alice", "bob")
    await alice.publish_group_info(gid, mlsmsg.group_info(gid, 1))
    await alice.send(gid, mlsmsg.commit(gid, 1), removes=["bob"])
    await alice.publish_group_info(gid, mlsmsg.group_info(gid, 2))
    for call in (bob.fetch_group_info(gid), bob.send(gid, mlsmsg.commit(gid, 2, external=True))):
        with pytest.raises(RequestFailed) as info:
            await call
        assert (info.value.status, info.value.code) == (403, "removed_from_group")
    assert (await alice.group(gid))["members"] == ["alice"]
    # Added back by a member's commit, then gone by his own commit: he may join externally.
    await alice.send(gid, mlsmsg.commit(gid, 2), adds=["bob"])
    await bob.send(gid, mlsmsg.commit(gid, 3, 1), removes=["bob"])
    gi4 = mlsmsg.group_info(gid, 4)
    await alice.publish_group_info(gid, gi4)
    assert await bob.fetch_group_info(gid) == gi4
    assert (await bob.send(gid, mlsmsg.commit(gid, 4, external=True))).epoch == 5
