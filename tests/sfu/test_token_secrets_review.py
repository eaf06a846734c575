"""Review of the SFU's several token secrets: no character of a secret in an error, no file that
the old reader took as one secret read silently as other secrets, no duplicate secret, and a
join redirected to another worker counted once (by the worker that serves its room)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from sfu.config import SFUConfig, read_token_secrets
from sfu.errors import ConfigError, TokenError
from sfu.server import SFUServer
from sfu.tokens import check_room_token, issue_room_token, verify_room_token
from tests.sfu.harness import Harness
from tests.sfu.test_signalling import _join_raw

NEW = bytes(range(32))
OLD = bytes(range(100, 132))


def _refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as refused:
        read_token_secrets(path)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message, message
    return message


# --- no character of a secret in the start-up error ----------------------------------------------


def test_a_base64_secret_ending_in_equals_is_not_quoted_as_a_name(tmp_path: Path) -> None:
    # `openssl rand -base64 32` without + or /: the whole line matched the NAME= pattern and
    # the message quoted it, the secret, on stderr (the journal).
    secret = "QmFzZTY0c2VjcmV0d2l0aG91dHBsdXNvcnNsYXNoZXM="
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    message = _refusal(path)
    assert secret[:-1] not in message and secret[:8] not in message, message


@pytest.mark.parametrize(
    "line",
    [
        NEW.hex()[:9] + "g" + NEW.hex()[10:],  # a digit mistyped
        "my raw passphrase of text, as the old SFU took it",  # the old raw-text secret
    ],
    ids=["typo", "passphrase"],
)
def test_a_character_that_is_not_hex_is_placed_not_quoted(tmp_path: Path, line: str) -> None:
    path = tmp_path / "secret"
    path.write_text(line + "\n")
    message = _refusal(path)
    position = next(i for i, c in enumerate(line) if c not in "0123456789abcdefABCDEF") + 1
    assert f"position {position}" in message, message
    assert repr(line[position - 1]) not in message, message  # not even one character


def test_a_known_variable_name_is_still_named(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"CONCLAVE_ROOM_SECRET={NEW.hex()}\n")
    assert "CONCLAVE_ROOM_SECRET= prefix" in _refusal(path)


# --- what the old reader took as one secret is never read silently as others ---------------------


@pytest.mark.parametrize("width", [60, 76], ids=["xxd-p", "basenc"])
def test_one_hex_secret_wrapped_over_lines_is_refused(tmp_path: Path, width: int) -> None:
    # `xxd -p` wraps at 60 digits, `basenc --base16` at 76: a 48-byte secret so wrapped has
    # lines long enough to pass as two secrets, neither the delivery service's.
    secret = bytes(range(48)) if width == 60 else bytes(range(57))
    digits = secret.hex()
    path = tmp_path / "secret"
    path.write_text("".join(digits[i : i + width] + "\n" for i in range(0, len(digits), width)))
    assert bytes.fromhex(path.read_text()) == secret  # what the old reader (and the DS) took
    message = _refusal(path)
    assert "one line" in message, message
    assert digits[:16] not in message


def test_secrets_of_one_width_are_not_taken_for_a_wrapped_one(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{NEW.hex()}\n{OLD.hex()}\n")
    assert read_token_secrets(path) == (NEW, OLD)
    path.write_text(f"{NEW.hex()}\n{OLD[:16].hex()}\n")  # a 16-byte secret replaced by 32
    assert read_token_secrets(path) == (NEW, OLD[:16])


@pytest.mark.parametrize(
    "stray",
    [b"\xc2\xa0", b"\xe2\x80\x8b", b"\x00", b"\xef\xbb\xbf"],
    ids=["nbsp", "zero-width-space", "nul", "bom-inside"],
)
def test_hex_with_a_stray_byte_is_refused_not_taken_as_raw(tmp_path: Path, stray: bytes) -> None:
    # Pasted from a web page or a chat: a byte that is not printable ASCII made the whole file
    # "binary", one raw secret of hex digits and that byte: every join "bad signature".
    path = tmp_path / "secret"
    path.write_bytes(NEW.hex().encode() + stray + b"\n" + OLD.hex().encode() + b"\n")
    message = _refusal(path)
    assert "line 1" in message and "not printable ASCII" in message, message
    assert NEW.hex()[:16] not in message


def test_a_random_binary_secret_is_still_one_raw_secret(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    raw = bytes(range(255, 0, -7)) + b"\x00\xff" * 8
    path.write_bytes(raw)
    assert read_token_secrets(path) == (raw.strip(),)


def test_a_secret_given_twice_is_refused(tmp_path: Path) -> None:
    # The "new" secret pasted from the old one: the rotation would not rotate anything.
    path = tmp_path / "secret"
    path.write_text(f"{NEW.hex()}\n{OLD.hex()}\n{NEW.hex().upper()}\n")
    message = _refusal(path)
    assert "line 3" in message and "line 1" in message, message
    with pytest.raises(ConfigError, match="twice"):
        SFUConfig(token_secrets=(NEW, OLD, NEW))


# --- metrics -------------------------------------------------------------------------------------


async def test_a_redirected_join_is_counted_by_the_worker_that_serves_the_room() -> None:
    urls = ("http://127.0.0.1:1/v1/signal", "http://127.0.0.1:2/v1/signal")
    h = Harness(worker_index=0, worker_urls=urls)
    h.config = SFUConfig(token_secrets=(NEW, OLD), worker_index=0, worker_urls=urls)
    h.server = SFUServer(h.config)
    await h.start()
    try:
        room = next(f"r{i}" for i in range(100) if h.config.worker_for(f"r{i}") == 1)
        token = issue_room_token(OLD, room, "alice", int(time.time()) + 60)
        message = {"type": "join", "room": room, "identity": "alice", "token": token,
                   "publish": []}  # fmt: skip
        replies, _ = await _join_raw(h.url, json.dumps(message))
        assert replies[-1].get("code") == "redirect", replies
        # worker 1 counts it when it joins there: worker 0 counting it too was a double count
        assert h.server.metrics.tokens_accepted == [0, 0]
        assert 'sfu_tokens_accepted_total{secret="2"} 0' in h.server.metrics.render()
    finally:
        await h.stop()


# --- verifying -----------------------------------------------------------------------------------


def _forged(secret: bytes, room: str, identity: str) -> str:
    payload = json.dumps({"exp": int(time.time()) + 60, "id": identity, "room": room},
                         sort_keys=True, separators=(",", ":")).encode()  # fmt: skip
    signed = "v1." + base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return signed + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def test_an_empty_secret_admits_nobody() -> None:
    # HMAC takes an empty key: a token anybody can sign would be accepted.
    token = _forged(b"", "r", "a")
    for secrets in [(b"",), (NEW, b"")]:
        with pytest.raises(TokenError) as refused:
            check_room_token(secrets, token, "r", "a")
        assert refused.value.reason == "bad signature"
    with pytest.raises(TokenError):
        verify_room_token(b"", token, "r", "a")


def test_only_a_whole_mac_of_one_secret_verifies() -> None:
    token = _forged(OLD, "r", "a")
    assert check_room_token((NEW, OLD), token, "r", "a")[1] == 1
    signed, mac = token.rsplit(".", 1)
    raw = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
    for bad in (raw[:16], raw[:-1], raw + b"\0", b""):
        forged = signed + "." + base64.urlsafe_b64encode(bad).rstrip(b"=").decode()
        with pytest.raises(TokenError):
            check_room_token((NEW, OLD), forged, "r", "a")
