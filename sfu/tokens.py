"""Room tokens: the delivery service issues them, the SFU checks them.

Format (version 1)::

    "v1." + b64url(payload) + "." + b64url(HMAC-SHA256(secret, b"v1." + b64url(payload)))

with ``payload`` the canonical JSON ``{"exp": int, "id": identity, "room": room}`` (sorted keys,
no spaces, UTF-8) and ``b64url`` URL-safe base64 without padding. A token binds one identity to
one room until ``exp`` (Unix seconds); the SFU refuses it for any other room or identity.

The SFU may hold several secrets (while the delivery service's is rotated): a token verifies if
any of them signed it (`check_room_token`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence

from sfu.errors import TokenError

__all__ = ["check_room_token", "issue_room_token", "verify_room_token"]

_VERSION = "v1"
# The decoder in `base64` silently skips characters outside the alphabet; refuse them instead.
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise TokenError("malformed", "room token refused: malformed (bad base64url)")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed", "room token refused: malformed (bad base64url)") from exc


def _mac(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def _canonical_payload(room: str, identity: str, expires_at: int) -> bytes:
    obj = {"exp": int(expires_at), "id": identity, "room": room}
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def issue_room_token(secret: bytes, room: str, identity: str, expires_at: int) -> str:
    """Return a token that admits `identity` to `room` until `expires_at` (Unix seconds)."""
    if not secret:
        raise TokenError("malformed", "room token secret must not be empty")
    signed_part = f"{_VERSION}.{_b64url_encode(_canonical_payload(room, identity, expires_at))}"
    return f"{signed_part}.{_b64url_encode(_mac(secret, signed_part))}"


def verify_room_token(
    secret: bytes, token: str, room: str, identity: str, now: float | None = None
) -> int:
    """Check `token` for `room` and `identity` at time `now` (default: the current time), and
    return when it expires (Unix seconds).

    Raises `TokenError` with `reason` "malformed", "bad signature", "expired", "wrong room" or
    "wrong identity". The signature is checked before anything in the payload is trusted.
    """
    return check_room_token((secret,), token, room, identity, now)[0]


def check_room_token(
    secrets: Sequence[bytes], token: str, room: str, identity: str, now: float | None = None
) -> tuple[int, int]:
    """`verify_room_token` with several secrets: the token's signature may be any one's.

    Returns when it expires (Unix seconds) and the index in `secrets` of the one that signed
    it. Every secret is compared (in constant time, `hmac.compare_digest`), whichever matches:
    the time taken does not tell which one did.
    """
    if not secrets or not all(secrets):
        # An empty key is one anybody can sign with: every token is refused (fail closed).
        raise TokenError("bad signature", "room token refused: the SFU has no usable secret")
    if not isinstance(token, str) or not token.isascii():
        raise TokenError("malformed")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != _VERSION:
        raise TokenError("malformed", "room token refused: malformed (expected v1.<payload>.<mac>)")
    payload_b64, mac_b64 = parts[1], parts[2]
    payload = _b64url_decode(payload_b64)
    mac = _b64url_decode(mac_b64)
    signed_part = f"{_VERSION}.{payload_b64}"
    signer = -1
    for index, secret in enumerate(secrets):
        if hmac.compare_digest(mac, _mac(secret, signed_part)) and signer < 0:
            signer = index
    if signer < 0:
        raise TokenError(
            "bad signature", "room token refused: bad signature (not issued for this SFU)"
        )
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenError("malformed", "room token refused: malformed payload") from exc
    if (
        not isinstance(obj, dict)
        or set(obj) != {"exp", "id", "room"}
        or not isinstance(obj["exp"], int)
        or isinstance(obj["exp"], bool)
        or not isinstance(obj["id"], str)
        or not isinstance(obj["room"], str)
    ):
        raise TokenError("malformed", "room token refused: malformed payload")
    if now is None:
        now = time.time()
    if obj["exp"] <= now:
        raise TokenError(
            "expired", "room token refused: expired; ask the delivery service for a new one"
        )
    if not hmac.compare_digest(obj["room"].encode(), room.encode()):
        raise TokenError("wrong room", "room token refused: issued for another room")
    if not hmac.compare_digest(obj["id"].encode(), identity.encode()):
        raise TokenError("wrong identity", "room token refused: issued for another identity")
    return obj["exp"], signer
