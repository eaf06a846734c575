"""Signature keys that arrive with no signature to check them (an `--auditor NAME=HEX` pin, a
registration's key) must be points of the suite's curve: OpenSSL takes any 32 or 57 bytes as an
EdDSA key, and a key that is no point only fails every verification. A pin with a typo was a
start with an auditor nobody could log in as; a registration, an identity nobody could use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from delivery_service.__main__ import AuditorOptionError, parse_auditor
from delivery_service.signatures import is_public_key, public_key_problem
from mls.client import Client

from .conftest import Served
from .procs import ROOM_SECRET, free_port

P25519 = 2**255 - 19
P448 = 2**448 - 2**224 - 1


def _ed25519(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


def _ed448(y: int, sign: int = 0) -> bytes:
    return (y | sign << 455).to_bytes(57, "little")


def _has_x_25519(y: int) -> bool:
    """x^2 = (y^2 - 1) / (d y^2 + 1) has a root (Euler's criterion): computed here, not taken
    from the code under test."""
    p, d = P25519, -121665 * pow(121666, -1, P25519) % P25519
    x2 = (y * y - 1) * pow(d * y * y + 1, -1, p) % p
    return x2 == 0 or pow(x2, (p - 1) // 2, p) == 1


def _p256_off_curve() -> bytes:
    real = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = real.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return point[:-1] + bytes([point[-1] ^ 1])


# (suites whose scheme the key is for, key): none decodes to a point.
NO_POINTS = [
    ((1, 3), _ed25519(2)),  # y with no x
    ((1, 3), _ed25519(7, 1)),
    ((1, 3), _ed25519(P25519 + 3)),  # y >= p (3 is a point's y)
    ((4, 6), _ed448(2)),  # y with no x
    ((4, 6), _ed448(P448 + 3, 1)),  # y >= p
    ((4, 6), _ed448(3)[:56] + b"\x7f"),  # bits 448-454 set: y >= p
    ((2,), _p256_off_curve()),
]
IDS = ["25519-no-x", "25519-no-x-sign", "25519-y>=p", "448-no-x", "448-y>=p", "448-high-bits",
       "p256-off-curve"]


def test_the_vectors_are_what_they_say() -> None:
    assert not _has_x_25519(2) and not _has_x_25519(7) and _has_x_25519(3)


@pytest.mark.parametrize(("suites", "key"), NO_POINTS, ids=IDS)
def test_keys_that_are_no_points_are_no_public_keys(suites: tuple[int, ...], key: bytes) -> None:
    # Before: True for the EdDSA ones (OpenSSL verified nothing under them, without an error).
    for suite in range(1, 8):
        assert not is_public_key(suite, key)
    for suite in suites:
        assert "point" in str(public_key_problem(suite, key))


def test_real_keys_are_public_keys() -> None:
    for _ in range(20):
        key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert is_public_key(1, key) and is_public_key(3, key)
        key = ed448.Ed448PrivateKey.generate().public_key().public_bytes_raw()
        assert is_public_key(4, key) and is_public_key(6, key)
    for suite in range(1, 8):
        assert is_public_key(suite, Client(b"a", suite).signature_key)
    assert public_key_problem(9, bytes(32)) == "unsupported cipher suite 9"


@pytest.mark.parametrize(("suites", "key"), NO_POINTS, ids=IDS)
def test_an_auditor_pin_that_is_no_point_is_refused(suites: tuple[int, ...], key: bytes) -> None:
    # Before: taken, and the service started with an auditor nobody could log in as.
    with pytest.raises(AuditorOptionError) as info:
        parse_auditor(f"auditor={key.hex()}")
    assert str(info.value) == (
        f"--auditor auditor=...: {key.hex()!r} has the length of a signature public key but is "
        "no point of its curve (a typo?): give the auditor's own key")


def test_a_typo_in_a_real_pin_is_refused() -> None:
    key = Client(b"auditor", 1).signature_key
    # The first one-digit typo of the key's y that leaves no point (the oracle's choice: about
    # every other y has no x).
    for i in range(62):
        digits = list(key.hex())
        digits[i] = "0" if digits[i] != "0" else "1"
        typo = bytes.fromhex("".join(digits))
        if not _has_x_25519(int.from_bytes(typo, "little") & ((1 << 255) - 1)):
            break
    else:
        raise AssertionError("no typo without a point")
    assert parse_auditor(f"auditor={key.hex()}") == ("auditor", key)
    with pytest.raises(AuditorOptionError, match="no point of its curve"):
        parse_auditor(f"auditor={typo.hex()}")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )


def test_the_service_does_not_start_with_a_pin_that_is_no_point(tmp_path: Path) -> None:
    key = _ed25519(2).hex()
    done = _run(["-m", "delivery_service", "--db", str(tmp_path / "ds.sqlite3"), "--port",
                 str(free_port()), "--auditor", f"auditor={key}"], tmp_path)
    # Status 2, a usage error, as the service's other --auditor refusals (test_auditor_usage).
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"delivery service: --auditor auditor=...: {key!r} has the length of a signature public "
        "key but is no point of its curve (a typo?): give the auditor's own key"
    ], done.stderr
    assert not (tmp_path / "ds.sqlite3").exists()


def test_conclave_serve_refuses_the_same_pin(tmp_path: Path) -> None:
    # conclave serve parses --auditor with the service's parse_auditor.
    key = _ed448(2).hex()
    done = _run(["-m", "conclave", "serve", "--state", str(tmp_path / "state"), "--auditor",
                 f"aud={key}"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"conclave serve: --auditor aud=...: {key!r} has the length of a signature public key "
        "but is no point of its curve (a typo?): give the auditor's own key"
    ], done.stderr


async def _post(url: str, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.post(
        url + path, data=cbor2.dumps(body), headers={"Content-Type": "application/cbor"}
    ) as r:
        return r.status, cbor2.loads(await r.read())


@pytest.mark.parametrize(("suites", "key"), NO_POINTS, ids=IDS)
async def test_registering_a_key_that_is_no_point_is_refused(
    served: Served, suites: tuple[int, ...], key: bytes
) -> None:
    # Before: on to the proof of possession, which no signature passes: a 401 saying the proof
    # failed, for a key that was never one.
    status, body = await _post(served.url, "/v1/challenges", {})
    assert status == 201, body
    status, body = await _post(served.url, "/v1/identities", {
        "identity": "mallory", "cipher_suite": suites[0], "signature_key": key,
        "challenge": body["challenge"], "signature": bytes(64),
    })
    assert status == 400, body
    assert body["error"] == "bad_request"
    assert str(body["reason"]).startswith(
        f"signature_key is not a public key of cipher suite {suites[0]}: not "), body
    assert "point of the" in str(body["reason"]), body
    assert await served.service.storage.get_identity("mallory") is None
