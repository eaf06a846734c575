"""SIGHUP reloads the SFU's token secrets: new joins and renewals are verified with the file's
new set, sessions go on (those only a dropped secret admitted end), a file with a mistake keeps
the old set, and with --workers worker 0 reads the file and sends the set to every worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sfu import workers
from sfu.server import SECRET_WITHDRAWN
from tests.sfu.test_main import _run_sfu
from tests.sfu.test_signalling import _join_raw
from tests.sfu.test_token_secrets import NEW, OLD, _join, _reply, _token, serving
from tests.sfu.test_workers import _children, _free_ports, _room_of, _wait

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

BAD = bytes(range(200, 232))  # the secret of a file with a mistake
PATIENCE = 60.0  # seconds: far more than any step here takes on a loaded machine


def _renewal(secret: bytes, room: str, identity: str) -> str:
    return json.dumps({"type": "token", "token": _token(secret, room, identity, 600)})


def _secret_text(text: str) -> bool:
    """Whether `text` quotes 8 hex digits or more of a secret of these tests."""
    return any(
        secret.hex()[i : i + 8] in text.lower()
        for secret in (NEW, OLD, BAD)
        for i in range(0, 64 - 8, 2)
    )


# --- in one process --------------------------------------------------------------------------------


async def test_a_reload_verifies_with_the_new_set_and_zeroes_the_counts() -> None:
    async with serving(OLD) as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("room", "alice", _token(OLD, "room", "alice", 600)))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        h.server.set_token_secrets((NEW, OLD))
        assert h.server.metrics.tokens_accepted == [0, 0]  # line 1 is another secret now
        await ws.send_str(_renewal(NEW, "room", "alice"))
        assert await _reply(ws, "token-accepted", "error") == "token-accepted"
        h.server.set_token_secrets((NEW,))
        replies, _ = await _join_raw(h.url, _join("room", "bob", _token(OLD, "room", "bob")))
        assert replies[0].get("reason") == "bad signature", replies
        replies, _ = await _join_raw(h.url, _join("room", "carol", _token(NEW, "room", "carol")))
        assert replies[0]["type"] == "joined", replies
        await ws.send_str(_renewal(NEW, "room", "alice"))  # alice's session went on
        assert await _reply(ws, "token-accepted", "error") == "token-accepted"
        metrics = h.server.metrics.render()
        await ws.close()
    assert 'sfu_tokens_accepted_total{secret="1"} 2' in metrics, metrics
    assert "sfu_token_secrets 1" in metrics and "sfu_token_secret_reloads_total 2" in metrics


async def test_no_room_or_session_keeps_a_withdrawn_secret() -> None:
    # Before: each room and session kept the config it was made with, the withdrawn secret
    # (a leaked one, say) in it, until the last room made before the reload closed.
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(h.url)
        await ws.send_str(_join("room", "alice", _token(NEW, "room", "alice", 600)))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        h.server.set_token_secrets((NEW,))
        holders = [*h.server.rooms.values(),
                   *(p for r in h.server.rooms.values() for p in r.participants.values())]
        assert len(holders) == 2
        assert all(x.config.token_secrets == (NEW,) for x in holders)
        await ws.close()


async def test_a_session_only_a_dropped_secret_admitted_ends_at_the_reload() -> None:
    # Its token may carry any expiry (whoever has a leaked secret signs what they like): a
    # restart used to end it, and a reload does too. One renewed with a secret kept goes on,
    # until that token expires.
    async with serving(NEW, OLD) as h, aiohttp.ClientSession() as session:
        mallory = await session.ws_connect(h.url)
        await mallory.send_str(_join("room", "mallory", _token(OLD, "room", "mallory", 10**8)))
        assert (await mallory.receive_json(timeout=5))["type"] == "joined"
        alice = await session.ws_connect(h.url)
        await alice.send_str(_join("room", "alice", _token(OLD, "room", "alice", 10**8)))
        assert (await alice.receive_json(timeout=5))["type"] == "joined"
        await alice.send_str(_renewal(NEW, "room", "alice"))
        assert await _reply(alice, "token-accepted", "error") == "token-accepted"
        h.server.set_token_secrets((NEW,))
        while (message := await mallory.receive_json(timeout=5))["type"] != "error":
            pass
        assert message["code"] == "session-ended" and message["message"] == SECRET_WITHDRAWN
        assert (await mallory.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        participant = h.server.rooms["room"].participants["alice"]
        assert participant.ending is None
        assert participant.token_expires_at < time.time() + 601  # not the old token's
        await alice.close()


# --- what worker 0 tells the workers ------------------------------------------------------------


def test_a_worker_takes_the_secrets_worker_0_reloaded_in_the_order_sent() -> None:
    read, write = os.pipe()
    os.write(write, workers.secrets_line((OLD,)))
    os.write(write, workers.reload_line((NEW, OLD)) + b"down 1\n")
    os.write(write, workers.reload_line((NEW,)))
    os.close(write)
    link = workers.ParentLink(read)
    assert link.secrets() == (OLD,)
    link.follow()  # before the event loop serves: the latest set is kept for it
    taken: list[tuple[bytes, ...]] = []
    link.on_secrets(taken.append)
    assert taken == [(NEW,)] and not link.available(1)


def test_worker_0_sends_a_reload_after_the_rest_of_a_line_and_starts_workers_with_it() -> None:
    supervisor = workers.Supervisor(["true"], (OLD,), [workers.Worker(1, 0, [])])
    worker = supervisor.workers[0]
    read, worker.stdin_fd = os.pipe()
    try:
        worker.unsent = b"down 2\n"[:3]  # the rest of a line its pipe did not take yet
        supervisor.reload((NEW, OLD))
        assert os.read(read, 4096) == b"dow" + workers.reload_line((NEW, OLD))
        assert supervisor.secret == (NEW, OLD)  # what a worker (re)started from now gets
    finally:
        os.close(read)
        os.close(worker.stdin_fd)


# --- python -m sfu -------------------------------------------------------------------------------


class Logged:
    """A `python -m sfu`'s stderr, line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def wait_for(
        self, predicate: Callable[[str], bool], timeout: float = PATIENCE
    ) -> str:
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                while line := (await self.proc.stderr.readline()).decode():
                    self.lines.append(line)
                    if predicate(line):
                        return line
        except TimeoutError:
            raise AssertionError(
                f"the awaited line did not come within {timeout:g} s: {''.join(self.lines)}"
            ) from None
        raise AssertionError(f"the SFU ended first: {''.join(self.lines)}")

    async def rest(self) -> str:
        """The rest of its stderr once it exited (its status in `proc.returncode`). Within
        PATIENCE, else it is killed and the test fails with what it wrote: a stop that hangs
        must not hang the test run too."""
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(PATIENCE):
                # line by line: what was read is kept if the deadline cuts the reading short
                while line := await self.proc.stderr.readline():
                    self.lines.append(line.decode())
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()  # (its workers, if any, are in `processes`: killed at the end)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), PATIENCE)
            raise AssertionError(
                f"the SFU did not end within {PATIENCE:g} s: {''.join(self.lines)}"
            ) from None
        return "".join(self.lines)


async def _sfu(secret_file: Path, port: int, *options: str) -> Logged:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sfu", "--host", "127.0.0.1", "--port", str(port),
        "--token-secret-file", str(secret_file), "--log-level", "INFO", *options,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Logged(proc)


async def _joined(session: aiohttp.ClientSession, url: str, room: str, name: str, secret: bytes) -> Any:
    ws = await session.ws_connect(url)
    await ws.send_str(_join(room, name, _token(secret, room, name, 600)))
    assert (await ws.receive_json(timeout=10))["type"] == "joined"
    return ws


async def _join_reply(url: str, room: str, name: str, secret: bytes) -> str:
    replies, _ = await _join_raw(url, _join(room, name, _token(secret, room, name)))
    return str(replies[0].get("reason") or replies[0]["type"])


def _reloaded(count: int, worker: int | None = None) -> Callable[[str], bool]:
    tag = f"worker {worker} INFO" if worker is not None else "INFO"
    return lambda line: tag in line and "reloaded" in line and f": {count} now verify" in line


async def test_sighup_reloads_the_secret_file_and_calls_go_on(
    tmp_path: Path, processes: list[int]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(OLD.hex() + "\n")
    port = _free_ports(1)
    sfu = await _sfu(secret_file, port)
    processes.append(sfu.proc.pid)
    url = f"http://127.0.0.1:{port}/v1/signal"
    try:
        await sfu.wait_for(lambda line: "serving on" in line)
        async with aiohttp.ClientSession() as session:
            alice = await _joined(session, url, "room", "alice", OLD)
            # Step 1 of a rotation: the new secret above the old one.
            secret_file.write_text(f"{NEW.hex()}\n{OLD.hex()}\n")
            sfu.proc.send_signal(signal.SIGHUP)
            await sfu.wait_for(_reloaded(2))
            assert await _join_reply(url, "room", "bob", OLD) == "joined"
            await alice.send_str(_renewal(NEW, "room", "alice"))  # what its client does
            assert await _reply(alice, "token-accepted", "error") == "token-accepted"
            # Step 3: the old secret dropped.
            secret_file.write_text(f"{NEW.hex()}\n")
            sfu.proc.send_signal(signal.SIGHUP)
            await sfu.wait_for(_reloaded(1))
            assert await _join_reply(url, "room", "carol", OLD) == "bad signature"
            assert await _join_reply(url, "room", "dave", NEW) == "joined"
            # A file with a mistake: the set loaded stays, with one warning.
            secret_file.write_text(f"{NEW.hex()}\n{BAD.hex()[:-1]}\n")
            sfu.proc.send_signal(signal.SIGHUP)
            warning = await sfu.wait_for(lambda line: "WARNING" in line and "SIGHUP" in line)
            assert "line 2: odd length" in warning and "still verifying with the 1 loaded" in warning
            assert not _secret_text(warning), warning
            assert await _join_reply(url, "room", "erin", NEW) == "joined"
            assert await _join_reply(url, "room", "frank", BAD) == "bad signature"
            await alice.send_str(_renewal(NEW, "room", "alice"))  # its socket is still open
            assert await _reply(alice, "token-accepted", "error") == "token-accepted"
            await alice.close()
    finally:
        sfu.proc.send_signal(signal.SIGTERM)
        text = await sfu.rest()
    assert sfu.proc.returncode == 0, text
    assert "Traceback" not in text and not _secret_text(text), text


async def test_sighup_while_starting_or_stopping_changes_nothing(
    tmp_path: Path, processes: list[int]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(NEW.hex() + "\n")
    port = _free_ports(2)
    sfu = await _sfu(secret_file, port, "--workers", "2")
    processes.append(sfu.proc.pid)

    def catches_sighup() -> bool:
        # Its first instants (the interpreter starting) cannot catch it: from `sfu.__main__`'s
        # first lines on, it must.
        status = Path(f"/proc/{sfu.proc.pid}/status").read_text()
        caught = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
        return bool(caught & 1 << (signal.SIGHUP - 1))

    assert await _wait(catches_sighup, PATIENCE), "SIGHUP is not caught"

    async def hang_up() -> None:  # from then on, all along
        while True:
            try:
                # os.kill, not send_signal: its poll() would reap the process once it exits,
                # and asyncio's watcher would then report status 255 ("unknown child
                # process"); a zombie takes the signal harmlessly until it is reaped
                os.kill(sfu.proc.pid, signal.SIGHUP)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.01)

    hangups = asyncio.ensure_future(hang_up())
    try:
        await sfu.wait_for(lambda line: "worker 1 INFO" in line and "serving on" in line)
        processes.extend(_children(sfu.proc.pid))
        sfu.proc.send_signal(signal.SIGTERM)
        text = await sfu.rest()
    finally:
        hangups.cancel()
    assert sfu.proc.returncode == 0, text
    assert "Traceback" not in text and "reloaded" in text, text


async def test_with_workers_sighup_to_worker_0_reloads_every_worker(
    tmp_path: Path, processes: list[int]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(OLD.hex() + "\n")
    port = _free_ports(2)
    sfu = await _sfu(secret_file, port, "--workers", "2")
    processes.append(sfu.proc.pid)
    room_0, room_1 = _room_of(0, 2, port), _room_of(1, 2, port)
    url_0, url_1 = (f"http://127.0.0.1:{port + i}/v1/signal" for i in range(2))
    try:
        await sfu.wait_for(lambda line: "worker 1 INFO" in line and "serving on" in line)
        (worker_1,) = _children(sfu.proc.pid)
        processes.append(worker_1)
        async with aiohttp.ClientSession() as session:
            alice = await _joined(session, url_1, room_1, "alice", OLD)
            secret_file.write_text(f"{NEW.hex()}\n{OLD.hex()}\n")
            sfu.proc.send_signal(signal.SIGHUP)
            await sfu.wait_for(_reloaded(2, worker=1))
            await alice.send_str(_renewal(NEW, room_1, "alice"))
            assert await _reply(alice, "token-accepted", "error") == "token-accepted"
            secret_file.write_text(f"{NEW.hex()}\n")
            sfu.proc.send_signal(signal.SIGHUP)
            await sfu.wait_for(_reloaded(1, worker=1))
            for url, room in ((url_0, room_0), (url_1, room_1)):
                assert await _join_reply(url, room, "bob", OLD) == "bad signature", url
                assert await _join_reply(url, room, "carol", NEW) == "joined", url
            # A SIGHUP to worker 1 alone: it serves on, saying where to send it.
            os.kill(worker_1, signal.SIGHUP)
            warning = await sfu.wait_for(lambda line: "worker 1 WARNING sfu SIGHUP" in line)
            assert f"worker 0 (pid {sfu.proc.pid})" in warning, warning
            await alice.send_str(_renewal(NEW, room_1, "alice"))  # alice's call goes on
            assert await _reply(alice, "token-accepted", "error") == "token-accepted"
            # A file with a mistake: every worker keeps the set loaded.
            secret_file.write_text("CONCLAVE_ROOM_SECRET=" + BAD.hex() + "\n")
            sfu.proc.send_signal(signal.SIGHUP)
            warning = await sfu.wait_for(lambda line: "WARNING" in line and "SIGHUP" in line)
            assert "prefix" in warning and not _secret_text(warning), warning
            assert await _join_reply(url_1, room_1, "dave", NEW) == "joined"
            # A worker restarted after a reload starts with the reloaded set.
            await alice.close()
            os.kill(worker_1, signal.SIGKILL)
            await sfu.wait_for(lambda line: "worker 1 INFO" in line and "serving on" in line)
            processes.extend(_children(sfu.proc.pid))
            assert await _join_reply(url_1, room_1, "erin", OLD) == "bad signature"
            assert await _join_reply(url_1, room_1, "frank", NEW) == "joined"
    finally:
        sfu.proc.send_signal(signal.SIGTERM)
        text = await sfu.rest()
    assert sfu.proc.returncode == 0, text
    assert "Traceback" not in text and not _secret_text(text), text
    assert len(re.findall(r"worker 0 INFO sfu SIGHUP: token secrets reloaded", text)) == 2, text


def test_help_tells_that_sighup_reloads_the_secret_file() -> None:
    result = _run_sfu("--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "again on SIGHUP (kill -HUP to worker 0" in text, text
    assert "change it by restarting the SFU" not in text
