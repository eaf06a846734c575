"""Room tokens: format, and every refusal reason."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from sfu.errors import SFUError, TokenError
from sfu.tokens import issue_room_token, verify_room_token

SECRET = b"s" * 32
NOW = 1_700_000_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_format_matches_the_spec_computed_independently() -> None:
    token = issue_room_token(SECRET, "room-1", "alice", NOW + 60)
    payload = b'{"exp":%d,"id":"alice","room":"room-1"}' % (NOW + 60)
    signed = "v1." + _b64(payload)
    mac = hmac.new(SECRET, signed.encode(), hashlib.sha256).digest()
    assert token == signed + "." + _b64(mac)
    assert "=" not in token


def test_valid_token_is_accepted() -> None:
    token = issue_room_token(SECRET, "room-1", "alice", NOW + 60)
    assert verify_room_token(SECRET, token, "room-1", "alice", now=NOW) == NOW + 60


def test_non_ascii_identity_roundtrips() -> None:
    token = issue_room_token(SECRET, "räum", "zoë", NOW + 60)
    verify_room_token(SECRET, token, "räum", "zoë", now=NOW)


def _reason(token: str, room: str = "room-1", identity: str = "alice", now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verify_room_token(SECRET, token, room, identity, now=now)
    assert isinstance(info.value, SFUError)
    return info.value.reason


def test_expired() -> None:
    token = issue_room_token(SECRET, "room-1", "alice", NOW + 60)
    assert _reason(token, now=NOW + 60) == "expired"
    assert _reason(token, now=NOW + 61) == "expired"


def test_wrong_room_and_identity() -> None:
    token = issue_room_token(SECRET, "room-1", "alice", NOW + 60)
    assert _reason(token, room="room-2") == "wrong room"
    assert _reason(token, identity="bob") == "wrong identity"


def test_other_secret_is_bad_signature() -> None:
    token = issue_room_token(b"other" * 8, "room-1", "alice", NOW + 60)
    assert _reason(token) == "bad signature"


def test_tampered_payload_is_bad_signature() -> None:
    token = issue_room_token(SECRET, "room-1", "alice", NOW + 60)
    _, _, mac = token.split(".")
    forged = _b64(json.dumps({"exp": NOW + 10**6, "id": "alice", "room": "room-1"}).encode())
    assert _reason(f"v1.{forged}.{mac}") == "bad signature"


@pytest.mark.parametrize(
    "token",
    ["", "v1", "v1.abc", "v2.abc.def", "v1.a.b.c", "v1.@@@.abc", "v1.abc=.def", "v1.é.x"],
)
def test_malformed(token: str) -> None:
    assert _reason(token) == "malformed"


def test_validly_signed_but_bad_payload_is_malformed() -> None:
    for payload in [b"[]", b'{"exp":"1","id":"a","room":"r"}', b"not json", b'{"exp":1}']:
        signed = "v1." + _b64(payload)
        mac = hmac.new(SECRET, signed.encode(), hashlib.sha256).digest()
        assert _reason(signed + "." + _b64(mac)) == "malformed"


def test_secret_file_is_hex_like_the_delivery_services_or_raw(tmp_path) -> None:  # noqa: ANN001
    from sfu.config import read_token_secrets
    from sfu.errors import ConfigError

    secret = bytes(range(32))
    (tmp_path / "hex").write_text(secret.hex() + "\n")
    # the delivery service reads CONCLAVE_ROOM_SECRET with bytes.fromhex: the same string
    # must give the same key, or every token it issues is refused as "bad signature"
    assert read_token_secrets(tmp_path / "hex") == (secret,)
    # binary (a byte that is not printable ASCII): the raw secret
    (tmp_path / "raw").write_bytes(b"\x00not hex: a raw secret\n")
    assert read_token_secrets(tmp_path / "raw") == (b"\x00not hex: a raw secret",)
    # text that is not hex is a mistake, not a raw secret (tests/sfu/test_token_secrets.py)
    (tmp_path / "text").write_bytes(b"not hex: a raw secret\n")
    with pytest.raises(ConfigError, match="not hex at position 1"):
        read_token_secrets(tmp_path / "text")
