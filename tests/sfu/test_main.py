"""`python -m sfu` runs on its own."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from sfu.client import SFUClient
from sfu.tokens import issue_room_token

SECRET = b"a-secret-of-at-least-16-bytes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_sfu(secret_file: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sfu",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token-secret-file",
            str(secret_file),
            *extra,
        ],
    )


async def _wait_healthy(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(100):
        try:
            async with session.get(base + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the SFU at {base} did not become healthy")


async def test_python_m_sfu_serves_signalling_and_metrics(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex() + "\n")  # trailing newline is stripped
    port = _free_port()
    proc = _start_sfu(secret_file, port)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            await _wait_healthy(session, base)
            token = issue_room_token(SECRET, "r", "alice", int(time.time()) + 60)
            client = SFUClient(base + "/v1/signal", "r", "alice", token)
            joined = await client.join()
            assert joined["type"] == "joined" and joined["participants"] == []
            async with session.get(base + "/metrics") as resp:
                assert "sfu_participants 1" in await resp.text()
            await client.leave()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) is not None


def _run_sfu(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m sfu` to completion (for start-up errors); stderr must hold no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "sfu", *args], capture_output=True, text=True, timeout=30
    )
    assert "Traceback" not in result.stderr
    return result


def test_missing_secret_file_is_a_clear_error(tmp_path: Path) -> None:
    result = _run_sfu("--token-secret-file", str(tmp_path / "nope"))
    assert result.returncode == 2 and "token secret file" in result.stderr


def test_short_secret_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("00" * 15)  # hex, 15 bytes
    result = _run_sfu("--token-secret-file", str(tmp_path / "s"))
    assert result.returncode == 2 and "at least 16 bytes" in result.stderr


async def test_workers_split_rooms_and_redirect_joins(tmp_path: Path) -> None:
    from sfu.config import SFUConfig

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    port = _free_port()
    while True:  # two consecutive free ports
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = _free_port()
    proc = _start_sfu(secret_file, port, "--workers", "2")
    urls = [f"http://127.0.0.1:{port + i}/v1/signal" for i in range(2)]
    config = SFUConfig(token_secret=SECRET, worker_urls=tuple(urls))
    rooms = {config.worker_for(f"room-{i}"): f"room-{i}" for i in range(20)}
    assert set(rooms) == {0, 1}
    try:
        async with aiohttp.ClientSession() as session:
            for url in urls:
                await _wait_healthy(session, url.removesuffix("/v1/signal"))
        clients = []
        for worker, room in sorted(rooms.items()):
            token = issue_room_token(SECRET, room, "alice", int(time.time()) + 60)
            client = SFUClient(urls[0], room, "alice", token)  # always ask worker 0 first
            await client.join()
            assert client.url == urls[worker]
            clients.append(client)
        # still connected: shutdown must end the signalling sessions, not wait for them
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        for client in clients:
            assert (await client.next_event("closed"))["type"] == "closed"
            await client.close()
    finally:
        proc.kill()


def test_port_in_use_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_sfu("--port", str(port), "--token-secret-file", str(tmp_path / "s"))
    assert result.returncode == 2 and "cannot listen on 127.0.0.1:" in result.stderr


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    for args in (("--log-level", "loud"), ("--port", "70000")):
        result = _run_sfu(*args, "--token-secret-file", str(tmp_path / "s"))
        assert result.returncode == 2 and "usage:" in result.stderr, args


def test_the_unjoined_socket_limits_are_options(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET.hex())
    result = _run_sfu("--token-secret-file", str(tmp_path / "s"), "--max-unjoined-per-address", "0")
    assert result.returncode == 2 and "sockets not joined yet" in result.stderr
    help_text = _run_sfu("--help").stdout
    assert "--max-unjoined-per-address" in help_text and "reverse proxy" in help_text
