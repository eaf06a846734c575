"""Garbage into every endpoint: always a 4xx with a CBOR reason, never a 500, nothing stored."""

from __future__ import annotations

import os
import random
from typing import Any

import aiohttp
import cbor2
import pytest

from . import mlsmsg
from .conftest import MakeClient, Served

FIELDS = ["group_id", "group_info", "message", "welcome", "key_packages", "last_resort",
          "identity", "cipher_suite", "signature_key", "challenge", "signature", "adds", "removes"]


def junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind == 0:
        return rng.randbytes(rng.randrange(40))
    if kind == 1:
        return rng.choice(["", "alice", "x" * 300, "\u00e9"])
    if kind == 2:
        return rng.choice([0, -1, 1 << 64, 2**70, 3])
    if kind == 3:
        return rng.choice([None, True, 1.5])
    if kind == 4:  # an MLS message, cut short or intact
        data = rng.choice([mlsmsg.commit(b"g", 0), mlsmsg.welcome([b"r"]),
                           mlsmsg.group_info(b"g", 0), mlsmsg.application(b"g", 0)])
        return data[: rng.randrange(len(data) + 1)]
    if kind == 5:
        return cbor2.CBORTag(rng.randrange(1000), b"x")
    if kind == 6:
        return [junk(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(FIELDS): junk(rng, depth + 1) for _ in range(rng.randrange(4))}


# FUZZ_SEEDS=300 for a longer run (12,000 requests).
@pytest.mark.parametrize("seed", range(int(os.environ.get("FUZZ_SEEDS", "4"))))
async def test_garbage_gets_4xx(make_client: MakeClient, served: Served, seed: int) -> None:
    rng = random.Random(seed)
    alice, _ = await make_client("alice")
    gid = os.urandom(8)
    await alice.create_group(gid)
    paths = ["/v1/identities", "/v1/sessions", "/v1/key_packages", "/v1/groups",
             f"/v1/groups/{gid.hex()}/messages", f"/v1/groups/{gid.hex()}/welcomes",
             "/v1/identities/alice/key_package", f"/v1/groups/{gid.hex()}/room_token"]
    headers = {"Content-Type": "application/cbor", "Authorization": f"Bearer {alice.session}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(40):
            path = rng.choice(paths)
            body = junk(rng)
            raw = cbor2.dumps(body) if rng.random() < 0.8 else rng.randbytes(rng.randrange(30))
            async with http.post(served.url + path, data=raw, headers=headers) as r:
                answer = cbor2.loads(await r.read())
                ok = r.status in (200, 201) and path.endswith(("room_token", "key_package", "groups"))
                assert ok or 400 <= r.status < 500, (path, body, r.status, answer)
                assert "reason" in answer or ok
    assert await alice.messages(gid) == []
    assert (await alice.group(gid))["epoch"] == 0
