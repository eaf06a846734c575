"""A hostile review of review 27 (commit 8f1bdac): the small-order lists checked against points
computed here, keys that reach the service otherwise than by registration, every /healthz
answer, and a second signal while the service stops.

- the small-order EdDSA points are derived from the curves (random points times the group
  order), not copied: both lists are exactly right, every encoding is refused, real keys are
  not; Ed448's points of order 4 do forge signatures in OpenSSL, as Ed25519's do;
- an identity registered with a small-order key before they were refused cannot log in, but its
  KeyPackage could be forged by anyone and added to a group: such a leaf is refused;
- every `/healthz` answer is text (500, 503 declined, HEAD, a query);
- a second SIGTERM or SIGINT while the service stops used to leave a SQLite service hanging
  forever (aiosqlite's threads never closed), without a word.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from delivery_service.errors import RequestFailed
from delivery_service.signatures import (
    CHALLENGE_LABEL,
    challenge_content,
    has_small_order,
    is_public_key,
    verify_with_label,
)
from delivery_service.storage import IdentityRecord, Storage
from mls import crypto as mls_crypto
from mls.framing import MLSMessage
from mls.key_package import KeyPackage

from .conftest import Served, sqlite_error
from .mlsgroups import people, start_group
from .test_operator_review27 import _challenge, _post, openssl_verifies
from .test_operator_run import Running, until_logged

Point = tuple[int, int]

# -- the curves, from RFC 8032 (section 5.1 and 5.2): a x^2 + y^2 = 1 + d x^2 y^2

ED25519 = {"p": 2**255 - 19, "a": -1, "d": -121665 * pow(121666, -1, 2**255 - 19),
           "l": 2**252 + 27742317777372353535851937790883648493, "size": 32, "cofactor": 8}
ED448 = {"p": 2**448 - 2**224 - 1, "a": 1, "d": -39081,
         "l": 2**446 - 13818066809895115352007386748515426880336692474882178609894547503885,
         "size": 57, "cofactor": 4}


def _add(curve: dict[str, int], u: Point, v: Point) -> Point:
    p, a, d = curve["p"], curve["a"], curve["d"]
    (x1, y1), (x2, y2) = u, v
    t = d * x1 * x2 * y1 * y2 % p
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, p) % p,
            (y1 * y2 - a * x1 * x2) * pow(1 - t, -1, p) % p)


def _times(curve: dict[str, int], k: int, point: Point) -> Point:
    out = (0, 1)
    while k:
        if k & 1:
            out = _add(curve, out, point)
        point = _add(curve, point, point)
        k >>= 1
    return out


def _random_point(curve: dict[str, int]) -> Point:
    """A uniformly random point: a random y, x from the curve equation when it has a root."""
    p, a, d = curve["p"], curve["a"], curve["d"]
    while True:
        y = secrets.randbelow(p)
        num, den = (y * y - 1) % p, (d * y * y - a) % p
        if den == 0:
            continue
        x2 = num * pow(den, -1, p) % p
        # p = 5 (mod 8) for Ed25519, 3 (mod 4) for Ed448
        x = pow(x2, (p + 3) // 8, p) if p % 8 == 5 else pow(x2, (p + 1) // 4, p)
        if x * x % p != x2:
            x = x * pow(2, (p - 1) // 4, p) % p
        if x * x % p == x2:
            return x, y


def small_order_points(curve: dict[str, int]) -> set[Point]:
    """The torsion subgroup: random points times the prime order l land on each of its
    `cofactor` points (60 draws miss one with probability under 8 * (7/8)^60, 0.03 %)."""
    points = {_times(curve, curve["l"], _random_point(curve)) for _ in range(60)}
    for point in points:
        assert _times(curve, curve["cofactor"], point) == (0, 1)
    return points


def encodings(curve: dict[str, int], points: set[Point]) -> set[bytes]:
    """Every encoding a lax decoder might take for these points: y, and y + p when that fits
    the 255 (455) bits of y, with either sign bit."""
    p, size = curve["p"], curve["size"]
    out = set()
    for _, y in points:
        for value in (y, y + p):
            if value < 2 ** (8 * size - 1) and (size == 32 or value < 2**448):
                for sign in (0, 1):
                    out.add((value | sign << (8 * size - 1)).to_bytes(size, "little"))
    return out


@pytest.fixture(scope="module")
def ed25519_points() -> set[Point]:
    return small_order_points(ED25519)


@pytest.fixture(scope="module")
def ed448_points() -> set[Point]:
    return small_order_points(ED448)


def test_the_ed25519_list_is_exactly_the_torsion_subgroup(ed25519_points: set[Point]) -> None:
    assert len(ed25519_points) == 8
    ys = {y for _, y in ed25519_points}
    p = ED25519["p"]
    # y + p fits 255 bits for y < 19: only 0 and 1 among them; 5 points' ys, 7 values
    expected = {y.to_bytes(32, "little") for y in ys} | \
        {(y + p).to_bytes(32, "little") for y in ys if y + p < 2**255}
    assert mls_crypto._ED25519_SMALL_ORDER == expected
    keys = encodings(ED25519, ed25519_points)
    assert len(keys) == 14  # libsodium's 7, with either sign bit
    for key in keys:
        assert has_small_order(1, key) and has_small_order(3, key), key.hex()
        assert not is_public_key(1, key) and not is_public_key(3, key), key.hex()


def test_the_ed448_list_is_exactly_the_torsion_subgroup(ed448_points: set[Point]) -> None:
    p = ED448["p"]
    # (0, 1), (0, -1), (1, 0), (-1, 0): order 1, 2, 4, 4; -1 = p - 1 is even, 1 is odd, so
    # (1, 0) is encoded with the sign bit set and (-1, 0) without
    assert ed448_points == {(0, 1), (0, p - 1), (1, 0), (p - 1, 0)}
    ys = {y for _, y in ed448_points}
    expected = {y.to_bytes(56, "little") for y in ys} | \
        {(y + p).to_bytes(56, "little") for y in ys if y + p < 2**448}
    assert mls_crypto._ED448_SMALL_ORDER == expected
    keys = encodings(ED448, ed448_points)
    assert len(keys) == 10
    for key in keys:
        assert key[56] & 0x7F == 0
        assert has_small_order(4, key) and has_small_order(6, key), key.hex()
        assert not is_public_key(4, key) and not is_public_key(6, key), key.hex()


def test_ed448s_last_byte_check_leaves_out_only_what_openssl_refuses() -> None:
    # The 7 low bits of Ed448's 57th byte are y's bits 448-454: y >= 2^448 > p, refused by
    # RFC 8032 and by OpenSSL, so `public_key[56] & 0x7F == 0` lets no forgeable key through.
    p = ED448["p"]
    content = challenge_content(os.urandom(32), "mallory")
    rs = [y.to_bytes(56, "little") + bytes([sign]) for y in (0, 1, p - 1) for sign in (0, 0x80)]
    for y in (0, 1, p - 1):
        for last in (0x01, 0x40, 0x7F, 0x81, 0xFF):
            key = y.to_bytes(56, "little") + bytes([last])
            assert not has_small_order(4, key)
            assert not any(openssl_verifies(key, CHALLENGE_LABEL, content, r + bytes(57))
                           for r in rs)


def _forgery_448(key: bytes, content: bytes) -> bytes | None:
    """R = a point of order dividing 4, S = 0: a signature OpenSSL's Ed448 takes, if any."""
    p = ED448["p"]
    for y in (0, 1, p - 1):
        for sign in (0, 0x80):
            signature = y.to_bytes(56, "little") + bytes([sign]) + bytes(57)
            if openssl_verifies(key, CHALLENGE_LABEL, content, signature):
                return signature
    return None


def test_ed448s_points_of_order_4_forge_every_message_in_openssl() -> None:
    # Why Ed448's list matters too: under (±1, 0) OpenSSL takes a signature made of nothing.
    p = ED448["p"]
    for key in (bytes(57), bytes(56) + b"\x80"):
        for _ in range(8):
            content = challenge_content(os.urandom(32), "mallory")
            forged = _forgery_448(key, content)
            assert forged is not None
            assert not verify_with_label(4, key, CHALLENGE_LABEL, content, forged)
    assert _times(ED448, 4, (1, 0)) == (0, 1) and _times(ED448, 2, (1, 0)) == (0, p - 1)


async def test_registering_an_ed448_key_of_order_4_is_refused(served: Served) -> None:
    challenge = await _challenge(served.url)
    key = bytes(57)
    forged = _forgery_448(key, challenge_content(challenge, "mallory"))
    assert forged is not None
    status, body = await _post(served.url, "/v1/identities", {
        "identity": "mallory", "cipher_suite": 6, "signature_key": key,
        "challenge": challenge, "signature": forged,
    })
    assert status == 400 and "small order" in str(body["reason"]), body
    assert await served.service.storage.get_identity("mallory") is None


@pytest.mark.parametrize("scheme,suites,count", [
    (ed25519.Ed25519PrivateKey, (1, 3), 3000),
    (ed448.Ed448PrivateKey, (4, 6), 1000),
])
def test_no_real_key_is_refused(scheme: type, suites: tuple[int, int], count: int) -> None:
    generate: Callable[[], ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey] = scheme.generate
    for _ in range(count):
        key = generate().public_key().public_bytes_raw()
        for suite in suites:
            assert not has_small_order(suite, key), key.hex()
    assert is_public_key(suites[0], key)


# -- a small-order key registered before they were refused: its leaf


async def test_a_leaf_of_an_identity_registered_with_a_small_order_key_is_refused(
    url: str, storage: Storage
) -> None:
    # Before: "legacy", registered with the neutral point before 8f1bdac, could no longer log
    # in, but any member could forge its KeyPackage (R = neutral, S = 0 verifies under it in
    # MLS's OpenSSL Ed25519) and add it, with HPKE keys of the member's own: the commit was
    # taken, and "legacy" sat in the group, speaking as whoever forged it.
    neutral = bytes([1]) + bytes(31)
    forgery = neutral + bytes(32)
    assert await storage.register_identity(IdentityRecord("legacy", 1, neutral))
    [alice] = await people(url, "alice")
    gid = await start_group(alice)
    kp, _ = alice.mls.make_key_package()  # alice's, then made legacy's with the forgery
    kp.leaf_node.signature_key = neutral
    kp.leaf_node.credential = type(kp.leaf_node.credential).basic(b"legacy")
    kp.leaf_node.signature = forgery
    kp.signature = forgery
    assert isinstance(kp, KeyPackage)
    assert alice.group is not None
    with pytest.MonkeyPatch.context() as lax:  # a client that takes the forgery, as MLS did
        lax.setattr(mls_crypto, "has_small_order", lambda scheme, public: False)
        res = alice.group.add([MLSMessage(kp).encode()])
    # The tracker's MLS refuses the key now (mls.crypto); and were it lax, the service's own
    # check of a new leaf's registered key would (`_check_leaf_key`).
    with pytest.raises(RequestFailed) as refused:
        await alice.ds.send(gid, res.commit, group_info=res.group_info)
    assert refused.value.status == 400, refused.value
    assert "point of small order" in refused.value.reason
    with pytest.MonkeyPatch.context() as lax, pytest.raises(RequestFailed) as refused:
        lax.setattr(mls_crypto, "has_small_order", lambda scheme, public: False)
        await alice.ds.send(gid, res.commit, group_info=res.group_info)
    assert refused.value.status == 403, refused.value
    assert "point of small order" in refused.value.reason
    assert "legacy" not in (await storage.get_group(gid)).members  # type: ignore[union-attr]


# -- every /healthz answer is text


async def _healthz(url: str, method: str = "GET", query: str = "") -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.request(
        method, url + "/healthz" + query
    ) as r:
        return r.status, r.content_type, await r.text()


async def test_healthz_answers_a_bug_and_a_lock_in_text(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def bug(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(served.service.storage, "get_group", bug)
    caplog.set_level("CRITICAL", logger="delivery_service")  # the bug's traceback
    assert await _healthz(served.url) == (
        500, "text/plain", "internal: internal error; the service logged it\n")

    lock: Exception = sqlite_error("database is locked", sqlite3.SQLITE_BUSY)
    if served.service.storage.cannot_store(lock) is None:  # PostgreSQL
        import asyncpg

        lock = asyncpg.LockNotAvailableError("could not obtain lock")

    async def locked(*args: object) -> None:
        raise lock

    monkeypatch.setattr(served.service.storage, "get_group", locked)
    async with aiohttp.ClientSession() as http, http.get(served.url + "/healthz?x=1") as r:
        text = await r.text()
        assert (r.status, r.content_type, r.headers.get("Retry-After")) == (
            503, "text/plain", "1"), text
    assert text.startswith("unavailable: the database cannot answer it now: ")
    assert text.endswith("\n") and "\n" not in text[:-1]
    status, media, body = await _healthz(served.url, "HEAD")
    assert (status, media, body) == (503, "text/plain", "")
    monkeypatch.undo()
    assert await _healthz(served.url, query="?worker=all") == (200, "text/plain", "ok\n")


# -- a second signal while stopping


async def test_a_second_signal_while_stopping_ends_the_service_at_once(tmp_path: Path) -> None:
    ds = Running(tmp_path, "--db", str(tmp_path / "ds.sqlite3"), "--log-level", "INFO")
    held = socket.socket()
    try:
        await until_logged(ds.log, "serving on")
        # a request in flight holds the stop (aiohttp's shutdown timeout: 60 s)
        held.connect(("127.0.0.1", ds.port))
        held.sendall(b"POST /v1/identities HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/cbor\r\nContent-Length: 1000\r\n\r\n\xa1")
        await asyncio.sleep(0.3)
        ds.proc.send_signal(signal.SIGTERM)
        await until_logged(ds.log, "INFO delivery_service stopping")
        await asyncio.sleep(0.2)
        ds.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while ds.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Before: still running after the second signal, and forever (SQLite's threads)
        assert ds.proc.poll() == 1, ds.log.read_text()
    finally:
        held.close()
        if ds.proc.poll() is None:
            ds.proc.kill()
            ds.proc.wait()
    lines = ds.log.read_text().splitlines()
    assert lines[-1].endswith("WARNING delivery_service SIGINT while stopping: exiting now, "
                              "without waiting for the requests in flight"), lines
    assert not any("Traceback" in line for line in lines), lines
