"""The SFU's token secrets: several at once (a rotation), a secret file with a mistake refused at
start-up, renewals with a bad signature logged, and worker 0's stand-in as quiet as the workers
about health checks."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sfu import tokens, workers
from sfu.config import MAX_TOKEN_SECRETS, SFUConfig, read_token_secrets
from sfu.errors import ConfigError, TokenError
from sfu.server import SFUServer
from sfu.tokens import check_room_token, issue_room_token
from tests.sfu.harness import Harness
from tests.sfu.test_main import _free_port, _run_sfu
from tests.sfu.test_signalling import _join_raw
from tests.sfu.test_workers import _free_ports, _room_of, _start, _wait

NEW = bytes(range(32))
OLD = bytes(range(100, 132))
OTHER = b"another-secret-0123456789"


def _token(secret: bytes, room: str, identity: str, ttl: int = 60) -> str:
    return issue_room_token(secret, room, identity, int(time.time()) + ttl)


def _join(room: str, identity: str, token: str) -> str:
    return json.dumps(
        {"type": "join", "room": room, "identity": identity, "token": token, "publish": []}
    )


# --- the secret file -----------------------------------------------------------------------------


def test_a_file_holds_one_secret_per_line_none_special(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(f"{NEW.hex()}\r\n\n  {OLD.hex().upper()}  \n".encode())
    assert read_token_secrets(path) == (NEW, OLD)
    path.write_text(NEW.hex())  # one line, no end of line: as before
    assert read_token_secrets(path) == (NEW,)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (NEW.hex()[:-1] + "\n", "odd length: 63 hex digits"),  # one character lost
        (f"CONCLAVE_ROOM_SECRET={NEW.hex()}\n", "CONCLAVE_ROOM_SECRET= prefix: give the hex value only"),
        (f"export CONCLAVE_ROOM_SECRET={NEW.hex()}\n", "CONCLAVE_ROOM_SECRET= prefix"),
        (f'"{NEW.hex()}"\n', "quoted"),
        (f"0x{NEW.hex()}\n", "0x prefix"),
        (NEW.hex()[:9] + "g" + NEW.hex()[10:], "not hex at position 10"),
        (f"  {NEW.hex()[:4]} {NEW.hex()[4:]}", "not hex at position 7 (a blank"),
        ("00" * 15, "too short: 15 bytes"),
        ("not hex: a raw secret of text\n", "not hex at position 1 (a raw secret of text?"),
        ("\n \n", "empty"),
    ],
    ids=["odd", "name=", "export", "quoted", "0x", "not-hex", "blank", "short", "text", "empty"],
)
def test_a_text_file_that_is_not_hex_is_refused_saying_what_is_wrong(
    tmp_path: Path, text: str, what: str
) -> None:
    path = tmp_path / "secret"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        read_token_secrets(path)
    message = str(refused.value)
    assert what in message and str(path) in message and "\n" not in message, message
    assert NEW.hex()[:16] not in message  # the secret is not repeated in the log


def test_the_line_at_fault_is_named(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{NEW.hex()}\n{OLD.hex()[1:]}\n")
    with pytest.raises(ConfigError, match=r", line 2: odd length"):
        read_token_secrets(path)


def test_more_secrets_than_the_cap_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    lines = [bytes([i]) * 16 for i in range(MAX_TOKEN_SECRETS + 1)]
    path.write_text("".join(line.hex() + "\n" for line in lines))
    with pytest.raises(ConfigError, match=f"{MAX_TOKEN_SECRETS + 1} secrets: at most "):
        read_token_secrets(path)
    path.write_text("".join(line.hex() + "\n" for line in lines[:MAX_TOKEN_SECRETS]))
    assert read_token_secrets(path) == tuple(lines[:MAX_TOKEN_SECRETS])


def test_a_binary_file_is_one_raw_secret_whatever_its_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    raw = bytes(range(256))  # with \n and \r among its bytes: not lines
    path.write_bytes(raw[20:] + raw[:20])  # blanks at the ends are stripped (as before)
    assert read_token_secrets(path) == ((raw[20:] + raw[:20]).strip(),)
    path.write_bytes(b"\xff" * 15)
    with pytest.raises(ConfigError, match="binary secret of 15 bytes is too short"):
        read_token_secrets(path)
    path.write_bytes(b"\xef\xbb\xbf" + NEW.hex().encode())  # an editor's UTF-8 BOM
    with pytest.raises(ConfigError, match="byte-order mark"):
        read_token_secrets(path)


@pytest.mark.parametrize(
    "text", [NEW.hex()[:-1] + "\n", f"CONCLAVE_ROOM_SECRET={NEW.hex()}\n"], ids=["odd", "name="]
)
def test_python_m_sfu_refuses_to_start_with_a_mistyped_secret_file(
    tmp_path: Path, text: str
) -> None:
    # Before: such a file was taken as the raw secret, the SFU served, every join was refused.
    path = tmp_path / "secret"
    path.write_text(text)
    try:
        result = _run_sfu("--port", str(_free_port()), "--token-secret-file", str(path))
    except subprocess.TimeoutExpired:
        raise AssertionError("the SFU started with a mistyped secret file") from None
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(path) in lines[0] and ("odd length" in lines[0] or "hex value only" in lines[0])


def test_help_tells_of_several_secrets_and_refused_text() -> None:
    help_text = " ".join(_run_sfu("--help").stdout.split())
    assert f"up to {MAX_TOKEN_SECRETS} secrets, one per line" in help_text, help_text
    assert "raw bytes" not in help_text  # the old rule for any file that is not hex


# --- verifying with several secrets --------------------------------------------------------------


def test_a_token_verifies_with_any_secret_and_tells_which() -> None:
    expires = int(time.time()) + 60
    for index, secret in enumerate((NEW, OLD)):
        token = issue_room_token(secret, "r", "a", expires)
        assert check_room_token((NEW, OLD), token, "r", "a") == (expires, index)
    with pytest.raises(TokenError) as refused:
        check_room_token((NEW, OLD), issue_room_token(OTHER, "r", "a", expires), "r", "a")
    assert refused.value.reason == "bad signature"


def test_every_secret_is_compared_in_constant_time_whichever_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", compare_digest)
    secrets = (NEW, OLD, OTHER)
    check_room_token(secrets, _token(NEW, "r", "a"), "r", "a")  # the first matches
    macs = [c for c in compared if len(c) == 32]
    assert len(macs) == len(secrets)  # no early exit: the time does not tell which


def test_the_config_takes_one_secret_or_several_up_to_the_cap() -> None:
    assert SFUConfig(token_secret=NEW).token_secrets == (NEW,)
    config = SFUConfig(token_secrets=(NEW, OLD))
    assert config.token_secret == NEW and config.token_secrets == (NEW, OLD)
    with pytest.raises(ConfigError, match=f"at most {MAX_TOKEN_SECRETS}"):
        SFUConfig(token_secrets=tuple(bytes([i]) * 16 for i in range(MAX_TOKEN_SECRETS + 1)))
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        SFUConfig(token_secrets=(NEW, b"short"))
    with pytest.raises(ConfigError, match="not both"):
        SFUConfig(token_secret=OLD, token_secrets=(NEW,))


@contextlib.asynccontextmanager
async def serving(*secrets: bytes) -> AsyncIterator[Harness]:
    """An in-process SFU verifying with `secrets`, stopped at the end."""
    h = Harness()
    h.config = SFUConfig(token_secrets=secrets)
    h.server = SFUServer(h.config)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


async def test_during_a_rotation_both_secrets_join_and_the_old_one_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(NEW, OLD) as h:
        with caplog.at_level(logging.INFO, logger="sfu.server"):
            for secret, name in [(OLD, "alice"), (OLD, "bob"), (NEW, "carol")]:
                replies, _ = await _join_raw(h.url, _join("room", name, _token(secret, "room", name)))
                assert replies[0]["type"] == "joined", (name, replies)
            async with aiohttp.ClientSession() as session:
                async with session.get(h.url.removesuffix("/v1/signal") + "/metrics") as resp:
                    metrics = await resp.text()
    said = [r for r in caplog.records if "secret 2 of 2" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO, caplog.records
    assert 'sfu_tokens_accepted_total{secret="1"} 1' in metrics, metrics
    assert 'sfu_tokens_accepted_total{secret="2"} 2' in metrics, metrics


async def test_a_session_joined_with_the_old_secret_renews_with_the_new() -> None:
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("room", "alice", _token(OLD, "room", "alice")))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        await ws.send_str(json.dumps({"type": "token", "token": _token(NEW, "room", "alice", 600)}))
        assert await _reply(ws, "token-accepted", "error") == "token-accepted"
        await ws.close()


async def _reply(ws: Any, *types: str) -> str:
    """The type of the next message of one of `types` (offers and the like are skipped)."""
    while (message := await ws.receive_json(timeout=5))["type"] not in types:
        pass
    return str(message.get("reason") or message["type"])


# --- a renewal with a bad signature is logged -----------------------------------------------------


async def test_a_renewal_refused_for_a_bad_signature_is_logged_rate_limited_with_joins(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Before: counted in sfu_tokens_refused_total, and nothing in the log.
    async with serving(NEW) as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("room", "alice", _token(NEW, "room", "alice")))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        with caplog.at_level(logging.WARNING, logger="sfu.server"):
            for _ in range(2):  # the second within the interval: not logged again
                forged = _token(OTHER, "room", "alice", 600)
                await ws.send_str(json.dumps({"type": "token", "token": forged}))
                assert await _reply(ws, "token-accepted", "error") == "bad signature"
            # nor a join's within it: one warning per interval, whatever was refused
            replies, _ = await _join_raw(h.url, _join("room", "bob", _token(OTHER, "room", "bob")))
            assert replies[0].get("reason") == "bad signature"
        await ws.close()
        assert h.server.metrics.tokens_refused == 3
    warnings = [r for r in caplog.records if "bad signature" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING
    assert "token renewal was refused" in message and "CONCLAVE_ROOM_SECRET" in message


# --- with --workers --------------------------------------------------------------------------------


def test_worker_0_hands_every_secret_to_the_workers() -> None:
    import os

    read, write = os.pipe()
    os.write(write, workers.secrets_line((NEW, OLD)) + b"down 1\n")
    os.close(write)
    link = workers.ParentLink(read)
    assert link.secrets() == (NEW, OLD)
    link.follow()
    assert not link.available(1)


async def test_the_workers_verify_with_every_secret_of_the_file(
    tmp_path: Path, processes: list[int]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"{NEW.hex()}\n{OLD.hex()}\n")
    port = _free_ports(2)
    proc = _start(secret_file, port, 2, "--log-level", "INFO")
    processes.append(proc.pid)
    room = _room_of(1, 2, port)
    url = f"http://127.0.0.1:{port + 1}/v1/signal"  # worker 1's: it got the secrets on stdin
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/healthz?worker=all") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            assert await _wait(up, 30), "the workers did not come up"
        for secret, name in [(OLD, "alice"), (NEW, "bob")]:
            replies, _ = await _join_raw(url, _join(room, name, _token(secret, room, name)))
            assert replies[0]["type"] == "joined", (name, replies)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    text = err.decode()
    assert any(
        "worker 1 INFO" in line and "secret 2 of 2" in line for line in text.splitlines()
    ), text
    assert NEW.hex() not in text and OLD.hex() not in text


@pytest.mark.parametrize("debug", [False, True])
async def test_the_stand_in_access_logs_checks_only_at_debug(
    caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    # Before: worker 0's stand-in for a worker down logged every /healthz and /metrics 503 at
    # INFO, though the workers' own servers log them only at DEBUG.
    sockets = workers.bind("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    supervisor = workers.Supervisor(["true"], NEW, [workers.Worker(1, port, sockets)])
    worker = supervisor.workers[0]
    caplog.set_level(logging.DEBUG if debug else logging.INFO, logger="aiohttp.access")
    try:
        supervisor._stand_in(worker)  # as `watch` does for a worker that is down
        assert worker.stand_in, "no stand-in"
        async with aiohttp.ClientSession() as session:
            for path in ("/healthz", "/healthz?worker=1", "/metrics", "/v1/signal"):
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 503, path
    finally:
        await supervisor.close_stand_ins()
        for sock in sockets:
            sock.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any("/v1/signal" in line for line in logged), logged  # other paths keep their line
    checks = [line for line in logged if "/healthz" in line or "/metrics" in line]
    assert len(checks) == (3 if debug else 0), logged
