"""A third hostile review of the CLI and its glue: a media source that never answers, a
database aiosqlite cannot open, two first audits at once, a save over a FIFO or a device."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

from conclave import demo
from conclave.cli import main
from conclave.errors import ConclaveError
from conclave.files import replace_file
from conclave.participant import Participant
from conclave.services import Services
from tests.conclave.served import conclave_serve, create_room
from tests.delivery_service.procs import free_port

# -- 1. a --video source that never answers: Ctrl-C and SIGTERM still stop `join`


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(30)
    yield server
    server.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_join_stuck_opening_its_video_stops_on_a_signal(
    sig: signal.Signals, silent_server: socket.socket, tmp_path: Path
) -> None:
    # FFmpeg waits for the stream's answer in a call that neither signal interrupted: the
    # signal handlers of the call only set an event the blocked loop never looked at.
    url = f"http://127.0.0.1:{silent_server.getsockname()[1]}/stream.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", "n",
         "--ds", f"http://127.0.0.1:{free_port()}", "--state", str(tmp_path / "s"),
         "--video", url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        conn, _ = silent_server.accept()  # the player is waiting for the answer now
        try:
            proc.send_signal(sig)
            assert proc.wait(timeout=15) == 130
        finally:
            conn.close()
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 2. a SQLite database that cannot be opened: refused before aiosqlite's thread starts


def test_serve_refuses_a_database_it_cannot_open_without_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # aiosqlite's worker thread, failing to open a directory, reported to a loop that
    # `asyncio.run` had closed by then: a traceback from the thread, now and then.
    started: list[str] = []
    real_connect = aiosqlite.connect

    def connect(path: str, *args: object, **kwargs: object) -> object:
        started.append(path)
        return real_connect(path, *args, **kwargs)

    monkeypatch.setattr(aiosqlite, "connect", connect)
    failures: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    assert main(["serve", "--db", str(tmp_path), "--ds-port", "0", "--sfu-port", "0"]) == 2
    assert "cannot open the database" in capsys.readouterr().err
    assert started == []
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(timeout=10)
    assert failures == []


# -- 3. two first audits at once: the auditor's registered key is never lost


async def test_a_first_audit_racing_another_keeps_the_registered_key(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "audits"
    state.mkdir()
    # The other audit: it made its key, saved it and registered it...
    other = Participant("auditor", services.ds_url, state_dir=tmp_path / "other")
    other.save()
    await other.ds.register()
    await other.ds.close()
    registered = (tmp_path / "other" / "auditor.state").read_bytes()

    class Racing(Participant):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            # ... after this one found no state and made a key of its own.
            (state / "auditor.state").write_bytes(registered)

    monkeypatch.setattr(demo, "Participant", Racing)
    error: Exception | None = None
    try:
        await demo.fetch_log(services.ds_url, b"room", state)
    except Exception as exc:
        error = exc
    # Not replaced by the loser's key, nor deleted: the next audit logs in with it.
    assert (state / "auditor.state").exists()
    assert (state / "auditor.state").read_bytes() == registered
    assert isinstance(error, ConclaveError) and "changed since it was read" in str(error)


# -- 4. a save never puts a file in place of a FIFO, a device or a socket


def test_a_save_refuses_a_fifo_and_leaves_it_one(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    for path in (fifo, link):
        with pytest.raises(OSError, match="not a regular file"):
            replace_file(path, b"log")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "pipe"]  # no temporary left


def test_a_save_still_replaces_a_regular_file_or_makes_one(tmp_path: Path) -> None:
    target = tmp_path / "a.log"
    target.write_bytes(b"old")
    replace_file(target, b"new")
    assert target.read_bytes() == b"new"
    new = tmp_path / "b.log"
    replace_file(new, b"fresh")
    assert new.read_bytes() == b"fresh"


def test_audit_save_to_a_fifo_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "out.log"
    os.mkfifo(fifo)
    with conclave_serve(tmp_path / "serve") as ds_url:
        create_room(ds_url, tmp_path / "alice", "alice", "r")
        # (serve's state: the auditor's key it pinned)
        assert main(["audit", "--group", "r", "--ds", ds_url, "--state", str(tmp_path / "serve"),
                     "--save", str(fifo)]) == 2
    assert capsys.readouterr().err == (
        f"conclave audit: cannot save the log to {fifo}: not a regular file\n"
    )
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# -- 5. `serve` whose output's reader is gone: it stops, and frees its ports


def test_serve_exits_when_nobody_reads_its_urls(tmp_path: Path) -> None:
    # The failed print came before the try that stops the services: the database's worker
    # thread then kept the process alive for good, its ports bound, nothing served.
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is printed
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", "0", "--sfu-port", "0",
             "--state", str(tmp_path)],
            stdout=write, stderr=subprocess.PIPE, text=True,
        )
    finally:
        os.close(write)
    try:
        assert proc.wait(timeout=30) == 128 + signal.SIGPIPE
        assert proc.stderr is not None and proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- 6. `serve --host`: an empty one is refused, one that cannot be encoded ends the process


def _serve(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", "0", "--sfu-port", "0",
         "--state", str(tmp_path), *options],
        capture_output=True, text=True, timeout=30,
    )


def test_serve_refuses_an_empty_host(tmp_path: Path) -> None:
    # `--host "$HOST"` with HOST unset: aiohttp listened on every interface, IPv4 and IPv6,
    # and the URLs printed (http://:PORT) were no URLs.
    proc = _serve(tmp_path, "--host", "")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "argument --host: give a host name or address" in proc.stderr


def test_serve_on_a_host_it_cannot_encode_exits(tmp_path: Path) -> None:
    # A label of more than 63 characters fails in the IDNA codec (UnicodeError, not OSError):
    # the services were not stopped, and the database's worker thread kept the process alive.
    proc = _serve(tmp_path, "--host", "x" * 300)
    assert proc.returncode == 2
    assert proc.stderr == f"conclave serve: cannot listen on {'x' * 300}: unknown host\n"


@pytest.mark.parametrize("answer", ["plain", "json"])
def test_audit_of_a_url_that_is_no_delivery_service_says_so(
    answer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another web server at --ds (a wrong port, say) is not "the delivery service refused the
    audit log": the audit says the URL did not answer as a delivery service."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotADeliveryService(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b"no such thing" if answer == "plain" else b'{"detail": "not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "text/plain" if answer == "plain" else
                             "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _answer  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotADeliveryService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["audit", "--group", "room", "--ds", url, "--state", str(tmp_path)]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: {url} did not answer as a conclave delivery service")
    assert "check --ds" in err and "refused" not in err and err.count("\n") == 1


def test_serve_names_what_to_change_when_it_cannot_listen(tmp_path: Path) -> None:
    # Before: "pick other ports" for an address this machine does not have as well.
    proc = _serve(tmp_path, "--host", "192.0.2.1")  # TEST-NET-1: no interface holds it
    assert proc.returncode == 2
    assert proc.stderr.startswith("conclave serve: cannot listen on 192.0.2.1: ")
    assert proc.stderr.endswith("; check --host\n") and "ports" not in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(tmp_path, "--ds-port", str(port))
    assert proc.returncode == 2
    # Updated (tests/conclave/test_cli_polish.py): which port is in use, and the option that
    # changes it, instead of "pick other ports".
    assert proc.stderr == (f"conclave serve: cannot listen on 127.0.0.1 port {port} for the "
                           "delivery service: the port is in use; give it another with "
                           "--ds-port\n"), proc.stderr
