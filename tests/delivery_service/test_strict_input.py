"""Inputs at the edges: out-of-range cursors, malformed CBOR, identity names, and the bounds on
stored KeyPackages (under concurrent uploads, and one last-resort package per identity).

Both storage backends (the `served` fixture), with the header-only tracker.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import cbor2
import pytest

from delivery_service.errors import RequestFailed
from delivery_service.storage import KeyPackageRow, SQLiteStorage, Storage

from . import mlsmsg
from .conftest import MakeClient, Served
from .test_api import new_group

TOO_LARGE = [2**63, 10**30, 2**64]


async def _get(http: aiohttp.ClientSession, url: str, session: str) -> tuple[int, Any]:
    async with http.get(url, headers={"Authorization": f"Bearer {session}"}) as r:
        return r.status, cbor2.loads(await r.read())


async def test_cursors_past_the_database_integers_are_a_400(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    await alice.send(gid, mlsmsg.commit(gid, 0))
    base = f"{served.url}/v1/groups/{gid.hex()}"
    urls = [
        *(f"{base}/messages?after={n}" for n in TOO_LARGE),
        *(f"{base}/messages?since_epoch={n}" for n in TOO_LARGE),
        *(f"{base}/audit?after={n}" for n in TOO_LARGE),
        *(f"{served.url}/v1/welcomes?after={n}" for n in TOO_LARGE),
        f"{base}/messages?after=%205%20",  # int() would take these; a cursor is ASCII digits
        f"{base}/messages?after=%D9%A5",
    ]
    async with aiohttp.ClientSession() as http:
        for url in urls:
            status, body = await _get(http, url, alice.session or "")
            assert status == 400, (url, body)
            assert body["error"] == "bad_request" and "query parameter" in body["reason"]
        # The largest cursor is fine: nothing after it.
        status, body = await _get(http, f"{base}/messages?after={2**63 - 1}", alice.session or "")
        assert status == 200 and body["messages"] == []
    assert [m.seq for m in await alice.messages(gid)] == [1]


async def test_websocket_cursors_past_the_database_integers_are_an_error_frame(
    make_client: MakeClient, served: Served
) -> None:
    gid, [(alice, _)] = await new_group(make_client, "alice")
    await alice.send(gid, mlsmsg.commit(gid, 0))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(served.url + "/v1/ws",
                                   headers={"Authorization": f"Bearer {alice.session}"}) as ws:
            for frame in ({"type": "subscribe", "group_id": gid, "after": 2**63},
                          {"type": "welcomes", "after": 2**64 - 1}):
                await ws.send_bytes(cbor2.dumps(frame))
                reply = cbor2.loads((await ws.receive(timeout=5)).data)
                assert reply["type"] == "error" and reply["error"] == "bad_request"
                assert "'after'" in reply["reason"]
            # The socket still serves.
            await ws.send_bytes(cbor2.dumps({"type": "subscribe", "group_id": gid, "after": 0}))
            kinds = [cbor2.loads((await ws.receive(timeout=5)).data)["type"] for _ in range(2)]
            assert kinds == ["subscribed", "message"]


async def test_cbor_with_trailing_bytes_or_duplicate_keys_is_refused(
    make_client: MakeClient, served: Served
) -> None:
    alice, alice_mls = await make_client("alice")
    kp = alice_mls.key_package()
    duplicate = (b"\xa2" + cbor2.dumps("key_packages") + cbor2.dumps([])
                 + cbor2.dumps("key_packages") + cbor2.dumps([kp]))
    bodies = [
        cbor2.dumps({"key_packages": [kp]}) + b"\xff\x00garbage",
        cbor2.dumps({"key_packages": [kp]}) + cbor2.dumps({}),
        duplicate,
        b"\xa1" + cbor2.dumps("x") + b"\xa2\x01\x01\x01\x02",  # nested map, key 1 twice
    ]
    headers = {"Authorization": f"Bearer {alice.session}", "Content-Type": "application/cbor"}
    async with aiohttp.ClientSession() as http:
        for data in bodies:
            async with http.post(served.url + "/v1/key_packages", data=data,
                                 headers=headers) as r:
                body = cbor2.loads(await r.read())
                assert r.status == 400, body
                assert "not well-formed CBOR" in body["reason"]
        async with http.ws_connect(served.url + "/v1/ws",
                                   headers={"Authorization": f"Bearer {alice.session}"}) as ws:
            for frame in (cbor2.dumps({"type": "welcomes"}) + b"\x00",
                          b"\xa2" + cbor2.dumps("type") + cbor2.dumps("welcomes")
                          + cbor2.dumps("type") + cbor2.dumps("welcomes")):
                await ws.send_bytes(frame)
                reply = cbor2.loads((await ws.receive(timeout=5)).data)
                assert reply["type"] == "error" and "not well-formed CBOR" in reply["reason"]
    assert await alice.key_package_count() == 0


@pytest.mark.parametrize(
    "name", [".", "..", "a/b", "/", "tab\there", "nul\x00", "del\x7f", "cafe\u0301"]
)
async def test_identity_names_that_cannot_be_a_path_segment_are_refused(
    make_client: MakeClient, name: str
) -> None:
    client, _ = await make_client(name, register=False)
    with pytest.raises(RequestFailed) as info:
        await client.register()
    assert info.value.status == 400 and "identity" in info.value.reason
    assert client.session is None


async def test_unusual_but_valid_identity_names_work(make_client: MakeClient) -> None:
    bob, _ = await make_client("bob")
    for name in ("...", "café", "a.b", "x y"):
        client, mls = await make_client(name)
        await client.upload_key_packages([mls.key_package()])
        assert await bob.claim_key_package(name)


async def test_concurrent_uploads_do_not_overshoot_the_cap(
    make_client: MakeClient, served: Served
) -> None:
    served.service.config.max_key_packages_stored = 10
    alice, alice_mls = await make_client("alice")
    batches = [[alice_mls.key_package() for _ in range(4)] for _ in range(8)]
    results = await asyncio.gather(*(alice.upload_key_packages(b) for b in batches),
                                   return_exceptions=True)
    refused = [r for r in results if isinstance(r, RequestFailed)]
    assert all(r.status == 409 for r in refused)
    assert len(refused) == 6  # two batches of 4 fit under 10
    assert await alice.key_package_count() == 8


async def _last_resort_rows(storage: Storage, identity: str) -> int:
    if isinstance(storage, SQLiteStorage):
        [(count,)] = await storage._all(
            "SELECT count(*) FROM key_packages WHERE identity = ? AND last_resort = 1",
            (identity,),
        )
        return int(count)
    return int(await storage.pool.fetchval(  # type: ignore[attr-defined]
        "SELECT count(*) FROM key_packages WHERE identity = $1 AND last_resort", identity
    ))


async def test_one_last_resort_package_per_identity(
    make_client: MakeClient, served: Served
) -> None:
    alice, alice_mls = await make_client("alice")
    bob, _ = await make_client("bob")
    lasts = [alice_mls.key_package() for _ in range(5)]
    for last in lasts:
        assert await alice.upload_key_packages([], last_resort=last) == 0
    assert await _last_resort_rows(served.service.storage, "alice") == 1
    # The newest replaced the others.
    assert await bob.claim_key_package("alice") == lasts[-1]
    # Re-uploading the current one changes nothing.
    await alice.upload_key_packages([], last_resort=lasts[-1])
    assert await bob.claim_key_package("alice") == lasts[-1]


async def test_a_replaced_last_resort_package_that_was_handed_out_keeps_its_owner(
    storage: Storage,
) -> None:
    def row(ref: bytes, last: bool = True) -> KeyPackageRow:
        return KeyPackageRow(ref, b"data-" + ref, 10**10, last)

    await storage.add_key_packages("alice", [row(b"old")])
    assert await storage.claim_key_package("alice", "bob", 1) == b"data-old"  # handed out
    await storage.add_key_packages("alice", [row(b"unused")])
    await storage.add_key_packages("alice", [row(b"new")])
    assert await storage.claim_key_package("alice", "bob", 1) == b"data-new"
    # The Welcome of bob's commit with the old one still finds alice; the never-used one is gone.
    assert await storage.key_package_owner(b"old") == "alice"
    assert await storage.key_package_owner(b"unused") is None
    assert await storage.key_package_owner(b"new") == "alice"
    assert await storage.count_key_packages("alice", 1) == 0
