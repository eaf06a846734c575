"""An operator's run (review 27): what `python -m delivery_service` tells, and what it takes.

- the end of a database outage is a warning, as its start: at `--log-level WARNING` an outage
  used to begin and never end; so is a LISTEN connection restored after its warning;
- SIGTERM and SIGINT are told (`stopping`, `stopped`), as the SFU tells them;
- the start-up line names the PostgreSQL schema (`--pg-schema`), never the credentials;
- an Ed25519 (or Ed448) point of small order is no signature key: refused as an `--auditor`
  pin, at registration, and as the key of a proof of possession;
- every `/healthz` answer is text, the 503 of an outage included (it was the API's CBOR).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from delivery_service.__main__ import AuditorOptionError, parse_auditor
from delivery_service.client import wait_healthy
from delivery_service.signatures import CHALLENGE_LABEL, challenge_content, is_public_key
from delivery_service.storage import IdentityRecord, SQLiteStorage
from delivery_service.storage.availability import Availability
from delivery_service.storage.postgres import PostgresStorage
from mls.crypto import LABEL_PREFIX, _opaque

from .conftest import Served, require_postgres, sqlite_error
from .pgproxy import PgProxy
from .procs import ROOM_SECRET, free_port
from .test_operator_run import Running, until_logged

DEADLINE = 20.0

# -- small-order points, computed here rather than copied from the code under test

ED25519_P = 2**255 - 19
ED25519_D = -121665 * pow(121666, -1, ED25519_P) % ED25519_P


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Addition on edwards25519 (-x^2 + y^2 = 1 + d x^2 y^2)."""
    p = ED25519_P
    (x1, y1), (x2, y2) = a, b
    t = ED25519_D * x1 * x2 * y1 * y2 % p
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, p) % p,
            (y1 * y2 + x1 * x2) * pow(1 - t, -1, p) % p)


def _times(k: int, point: tuple[int, int]) -> tuple[int, int]:
    out = (0, 1)
    while k:
        if k & 1:
            out = _add(out, point)
        point = _add(point, point)
        k >>= 1
    return out


def _sqrt(a: int) -> int | None:
    p = ED25519_P
    a %= p
    x = pow(a, (p + 3) // 8, p)
    if x * x % p != a:
        x = x * pow(2, (p - 1) // 4, p) % p
    return x if x * x % p == a else None


def ed25519_small_order_encodings() -> list[bytes]:
    """Every 32-byte encoding of the 8 points of order dividing 8: y canonical or y + p, with
    either sign bit (libsodium's blocklist, sign bit included)."""
    p = ED25519_P
    i = _sqrt(p - 1)
    assert i is not None
    points = [(0, 1), (0, p - 1), (i, 0), (p - i, 0)]
    # order 8: doubling gives y = 0, i.e. d y^4 + 2 y^2 - 1 = 0
    root = _sqrt(1 + ED25519_D)
    assert root is not None
    for y2 in ((-1 + root) * pow(ED25519_D, -1, p) % p, (-1 - root) * pow(ED25519_D, -1, p) % p):
        y = _sqrt(y2)
        if y is None:
            continue
        for yy in (y, p - y):
            x = _sqrt((yy * yy - 1) * pow(ED25519_D * yy * yy + 1, -1, p))
            assert x is not None
            points += [(x, yy), (p - x, yy)]
    assert len(points) == 8
    assert all(_times(8, point) == (0, 1) for point in points)
    out = set()
    for y in {y for _, y in points}:
        for value in (y, y + p):
            if value < 2**255:
                out |= {value.to_bytes(32, "little"),
                        (value | 1 << 255).to_bytes(32, "little")}
    return sorted(out)


ED25519_SMALL = ed25519_small_order_encodings()
ED448_P = 2**448 - 2**224 - 1
# edwards448 has cofactor 4: (0, 1), (0, -1), (±1, 0); with y + p for y = 0 and 1
ED448_SMALL = sorted(
    y.to_bytes(56, "little") + bytes([sign])
    for y in (0, 1, ED448_P - 1, ED448_P, ED448_P + 1) for sign in (0, 0x80)
)
NEUTRAL = bytes([1]) + bytes(31)  # the neutral point of edwards25519
FORGERY = NEUTRAL + bytes(32)  # R = the neutral point, S = 0


def test_the_lists_are_the_well_known_ones() -> None:
    assert len(ED25519_SMALL) == 14
    assert "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05" in \
        [k.hex() for k in ED25519_SMALL]
    assert bytes(32) in ED25519_SMALL and NEUTRAL in ED25519_SMALL


def openssl_verifies(key: bytes, label: bytes, content: bytes, signature: bytes) -> bool:
    """VerifyWithLabel as cryptography's EdDSA (OpenSSL's) alone answers it: without
    mls.crypto's refusal of small-order keys."""
    public: Any = (
        ed25519.Ed25519PublicKey if len(key) == 32 else ed448.Ed448PublicKey
    ).from_public_bytes(key)
    try:
        public.verify(signature, _opaque(LABEL_PREFIX + label) + _opaque(content))
    except (InvalidSignature, ValueError):
        return False
    return True


def test_the_forgery_is_real() -> None:
    # Why it matters: OpenSSL's Ed25519 (cryptography's) takes this signature for any content
    # under the neutral point.
    content = challenge_content(os.urandom(32), "mallory")
    assert openssl_verifies(NEUTRAL, CHALLENGE_LABEL, content, FORGERY)


# -- 1. the end of an outage is a warning


async def test_the_end_of_an_outage_is_a_warning_as_its_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: "is reachable again after N s" was INFO: at --log-level WARNING the log had an
    # outage that never ended.
    caplog.set_level(logging.WARNING, logger="delivery_service")

    async def never() -> None:
        await asyncio.Event().wait()

    availability = Availability("PostgreSQL at db:5432/x", never)
    try:
        availability.lost(OSError("Connect call failed"))
        availability.reached()
    finally:
        await availability.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.WARNING], lines
    assert "PostgreSQL at db:5432/x is unreachable" in lines[0][1]
    assert "PostgreSQL at db:5432/x is reachable again after" in lines[1][1]


async def stop(ds: Running, sig: int = signal.SIGTERM) -> int:
    """Stop the service, without blocking the event loop (a PgProxy in it serves the service's
    connections as it closes them). Killed if it takes over DEADLINE seconds."""
    ds.proc.send_signal(sig)
    deadline = time.monotonic() + DEADLINE
    while ds.proc.poll() is None:
        if time.monotonic() > deadline:
            ds.proc.kill()
            return ds.proc.wait()
        await asyncio.sleep(0.05)
    return ds.proc.returncode


async def healthz(url: str) -> tuple[int, str, str, str | None]:
    """Status, media type, text and Retry-After of GET /healthz."""
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as r:
        return r.status, r.content_type, await r.text(), r.headers.get("Retry-After")


async def test_a_postgresql_outage_begins_and_ends_at_log_level_warning(
    tmp_path: Path, proxy: PgProxy, schema: str
) -> None:
    # The operator's run: --log-level WARNING, the database away and back.
    ds = Running(tmp_path, "--db", proxy.dsn, "--pg-schema", schema, "--log-level", "WARNING",
                 "--tracker", "basic")
    try:
        assert await wait_healthy(ds.url, DEADLINE, alive=lambda: ds.proc.poll() is None)
        proxy.mode = "down"
        proxy.drop()  # the LISTEN connection is cut: the instance notices by itself
        await until_logged(ds.log, "is unreachable")
        # 5. /healthz says so in text, as it says `ok`
        status, media, text, retry = await healthz(ds.url)
        assert (status, media) == (503, "text/plain"), text
        assert text == "unavailable: the database is unreachable: retry shortly\n"
        assert retry == "1"
        proxy.mode = "up"
        text = await until_logged(ds.log, "is reachable again after")
        assert await wait_healthy(ds.url, DEADLINE)
    finally:
        assert await stop(ds) == 0
    where = f"PostgreSQL at 127.0.0.1:{proxy.port}/"
    lines = [line for line in text.splitlines() if where in line]
    assert any("WARNING" in line and "is unreachable" in line for line in lines), text
    assert any("WARNING" in line and "is reachable again after" in line for line in lines), text
    assert "Traceback" not in text


async def test_a_listen_connection_restored_after_its_warning_is_a_warning(
    proxy: PgProxy, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: "did not answer within 0.5 s; reconnecting" at WARNING, "restored" at DEBUG.
    caplog.set_level(logging.WARNING, logger="delivery_service")
    storage = PostgresStorage(proxy.dsn, schema=schema, listen_check=(0.3, 0.5))
    await storage.open()
    try:
        conn = storage._listen_conn
        assert conn is not None
        proxy.stall(conn._transport.get_extra_info("sockname")[1])
        deadline = time.monotonic() + DEADLINE
        while not any("LISTEN connection is restored" in r.getMessage()
                      for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            await asyncio.sleep(0.05)
    finally:
        await storage.close()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines[0][0] == logging.WARNING and "did not answer within" in lines[0][1], lines
    assert lines[-1] == (logging.WARNING, "the PostgreSQL LISTEN connection is restored"), lines


# -- 2. the stop is told


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_is_told_when_asked_and_when_done(tmp_path: Path, sig: int) -> None:
    # Before: nothing at all from SIGTERM to the end of the process, at any level.
    ds = Running(tmp_path, "--db", str(tmp_path / "ds.sqlite3"), "--log-level", "INFO")
    try:
        await until_logged(ds.log, "serving on")
    finally:
        assert await stop(ds, sig) == 0
    lines = ds.log.read_text().splitlines()
    stopping = [i for i, line in enumerate(lines) if line.endswith("INFO delivery_service stopping")]
    assert len(stopping) == 1, lines
    assert lines[-1].endswith("INFO delivery_service stopped"), lines
    assert stopping[0] < len(lines) - 1


# -- 3. the start-up line names the schema


async def test_the_start_up_line_names_the_schema_without_credentials(
    tmp_path: Path, schema: str
) -> None:
    dsn = require_postgres()
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.rpartition("@")
    secret_dsn = f"{scheme}://{user or 'conclave'}:hunter2@{host}"  # the test server trusts all
    ds = Running(tmp_path, "--pg-schema", schema, "--log-level", "INFO",
                 env={"CONCLAVE_DS_DB": secret_dsn})
    try:
        text = await until_logged(ds.log, "serving on 127.0.0.1")
    finally:
        assert await stop(ds) == 0
    assert f"with PostgreSQL at {host.partition('?')[0]}, schema {schema}\n" in text, text
    assert "hunter2" not in text


async def test_a_sqlite_start_up_line_names_no_schema(tmp_path: Path) -> None:
    # (--pg-schema with SQLite is refused: test_stop28_small.py)
    db = tmp_path / "ds.sqlite3"
    ds = Running(tmp_path, "--db", str(db), "--log-level", "INFO")
    try:
        text = await until_logged(ds.log, "serving on 127.0.0.1")
    finally:
        assert await stop(ds) == 0
    assert f"with SQLite file {str(db)!r}\n" in text and "schema" not in text, text


# -- 4. keys of small order


@pytest.mark.parametrize("key", ED25519_SMALL + ED448_SMALL, ids=lambda k: k.hex()[:8] + k.hex()[-2:])
def test_an_auditor_pin_of_small_order_is_refused(key: bytes) -> None:
    with pytest.raises(AuditorOptionError, match="point of small order"):
        parse_auditor(f"auditor={key.hex()}")
    assert not any(is_public_key(suite, key) for suite in range(1, 8))


def test_real_keys_are_still_taken() -> None:
    from mls.client import Client

    for suite in (1, 2, 3, 4, 5, 6, 7):
        key = Client(b"auditor", suite).signature_key
        assert parse_auditor(f"auditor={key.hex()}") == ("auditor", key)


def test_the_service_does_not_start_with_an_all_zero_auditor_key() -> None:
    # Before: it started, and a quarter of the challenges could be answered for that key
    # without any private key (R = neutral, S = 0 verifies when 4 divides the hash).
    done = subprocess.run(
        [sys.executable, "-m", "delivery_service", "--db", ":memory:", "--port",
         str(free_port()), "--auditor", "auditor=" + "00" * 32],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )
    assert done.returncode == 2, done.stderr  # a usage error (test_auditor_usage)
    assert done.stderr == (
        f"delivery service: --auditor auditor=...: {'00' * 32!r} is a point of small order, not "
        "a signature public key: give the auditor's own key\n"
    ), done.stderr


async def _post(url: str, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(
        url + path, data=cbor2.dumps(body), headers={"Content-Type": "application/cbor"}
    ) as r:
        return r.status, cbor2.loads(await r.read())


async def _challenge(url: str) -> bytes:
    status, body = await _post(url, "/v1/challenges", {})
    assert status == 201, body
    challenge = body["challenge"]
    assert isinstance(challenge, bytes)
    return challenge


async def test_registering_a_key_of_small_order_is_refused(served: Served) -> None:
    # Before: 201, with a "proof" anyone can make: mallory's name was anyone's.
    status, body = await _post(served.url, "/v1/identities", {
        "identity": "mallory", "cipher_suite": 1, "signature_key": NEUTRAL,
        "challenge": await _challenge(served.url), "signature": FORGERY,
    })
    assert status == 400, body
    assert body["error"] == "bad_request"
    assert "small order" in str(body["reason"]), body
    assert await served.service.storage.get_identity("mallory") is None
    for key in (bytes(32), ED25519_SMALL[-1]):
        status, body = await _post(served.url, "/v1/identities", {
            "identity": "mallory", "cipher_suite": 3, "signature_key": key,
            "challenge": await _challenge(served.url), "signature": key + bytes(32),
        })
        assert status == 400 and "small order" in str(body["reason"]), body


async def test_an_identity_registered_with_a_key_of_small_order_cannot_log_in(
    served: Served,
) -> None:
    # One registered before such keys were refused: the forgery opened a session for anyone.
    assert await served.service.storage.register_identity(IdentityRecord("mallory", 1, NEUTRAL))
    status, body = await _post(served.url, "/v1/sessions", {
        "identity": "mallory", "challenge": await _challenge(served.url), "signature": FORGERY,
    })
    assert status == 401, body
    assert "session" not in body


# -- 5. /healthz answers in text


async def test_healthz_answers_an_outage_in_text(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(*args: object) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(served.service.storage, "get_group", down)
    status, media, text, retry = await healthz(served.url)
    assert (status, media, retry) == (503, "text/plain", "1"), text
    assert text == "unavailable: the database is unreachable: retry shortly\n"
    monkeypatch.undo()
    assert (await healthz(served.url))[:3] == (200, "text/plain", "ok\n")


async def test_healthz_answers_a_damaged_database_and_a_bad_method_in_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from delivery_service.server import Config, DeliveryService
    from delivery_service.tracker import BasicTracker

    from .conftest import serving

    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    try:
        async with serving(DeliveryService(storage, Config(), BasicTracker())) as url:
            async def damaged(*args: object) -> None:
                raise sqlite_error("database disk image is malformed", sqlite3.SQLITE_CORRUPT)

            monkeypatch.setattr(storage, "get_group", damaged)
            status, media, text, _ = await healthz(url)
            assert (status, media) == (503, "text/plain"), text
            assert text.startswith("unavailable: the database is damaged")
            assert text.endswith(": the service's operator was told\n") and "\n" not in text[:-1]
            async with aiohttp.ClientSession() as http, http.post(url + "/healthz") as r:
                assert (r.status, r.content_type) == (405, "text/plain")
                assert (await r.text()).startswith("method_not_allowed: ")
            # the API itself still answers in CBOR
            async with aiohttp.ClientSession() as http, http.get(url + "/v1/nothing") as r:
                assert (r.status, r.content_type) == (404, "application/cbor")
    finally:
        await storage.close()
