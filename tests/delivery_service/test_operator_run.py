"""What an operator running `python -m delivery_service` sees: the start-up line, a usable debug
log, a clear reason for a database file it cannot make, and a metric for a database outage."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from delivery_service.__main__ import main
from delivery_service.client import wait_healthy
from delivery_service.server import Config, DeliveryService
from delivery_service.storage import SQLiteStorage
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import BasicTracker

from .conftest import drop_schema, require_postgres, serving
from .pgproxy import PgProxy
from .procs import ROOM_SECRET, ds_client, free_port

DEADLINE = 15.0


def metric(text: str, name: str) -> float:
    """The value of an unlabelled series in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics:\n{text}")


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def until_metric(url: str, name: str, value: float) -> str:
    """Poll /metrics until `name` is `value` (and nothing else queries the database)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        text = await scrape(url)
        if metric(text, name) == value:
            return text
        assert time.monotonic() < deadline, f"{name} never became {value}:\n{text}"
        await asyncio.sleep(0.05)


async def until_logged(log: Path, text: str) -> str:
    deadline = time.monotonic() + DEADLINE
    while text not in (content := log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{content[-2000:]}"
        await asyncio.sleep(0.05)
    return content


class Running:
    """`python -m delivery_service` at a log level, its output in a file."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "ds.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "delivery_service", "--host", "127.0.0.1",
                 "--port", str(self.port), *args],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET, **(env or {})},
            )

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- the start-up line


async def test_the_service_says_where_it_serves_once_it_listens(tmp_path: Path) -> None:
    # Before: nothing at all at INFO until the first request (aiohttp's banner was turned off),
    # so an operator could not tell a service that started from one still starting.
    db = tmp_path / "ds.sqlite3"
    ds = Running(tmp_path, "--db", str(db), "--log-level", "INFO")
    try:
        text = await until_logged(
            ds.log, f"INFO delivery_service serving on 127.0.0.1:{ds.port} with SQLite file"
        )
        assert str(db) in text
        assert await wait_healthy(ds.url, DEADLINE)
    finally:
        assert ds.stop() == 0


async def test_the_start_up_line_names_postgresql_without_credentials(tmp_path: Path) -> None:
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    scheme, _, rest = dsn.partition("://")
    user, _, host = rest.rpartition("@")
    secret_dsn = f"{scheme}://{user or 'conclave'}:hunter2@{host}"  # the test server trusts all
    ds = Running(tmp_path, "--pg-schema", schema, env={"CONCLAVE_DS_DB": secret_dsn})
    try:
        text = await until_logged(ds.log, "serving on 127.0.0.1")
        assert f"with PostgreSQL at {host.partition('?')[0]}" in text
        assert "hunter2" not in text
    finally:
        assert ds.stop() == 0
        await drop_schema(dsn, schema)


# -- the debug log


async def test_the_debug_log_is_the_services_not_every_sql_call(tmp_path: Path) -> None:
    # Before: at --log-level DEBUG aiosqlite logged two lines per SQL call with its arguments
    # (whole messages as Python reprs): 80 lines before the first request, several per request.
    ds = Running(tmp_path, "--db", str(tmp_path / "ds.sqlite3"), "--log-level", "DEBUG",
                 "--tracker", "basic")
    try:
        assert await wait_healthy(ds.url, DEADLINE, alive=lambda: ds.proc.poll() is None)
        alice = ds_client(ds.url, "alice")
        await alice.register()
        await alice.create_group(os.urandom(16))
        await alice.close()
        # a DEBUG line of the service's own: the level took effect
        async with aiohttp.ClientSession() as http, http.post(
            ds.url + "/v1/identities", data=b"\xa0" * 10, headers={"Content-Type": "x"}
        ) as r:
            assert r.status == 415
        await until_logged(ds.log, '"POST /v1/identities HTTP/1.1" 415')
    finally:
        assert ds.stop() == 0
    text = ds.log.read_text()
    assert "DEBUG asyncio" in text  # DEBUG is on for other loggers
    assert "aiosqlite" not in text
    assert "Traceback" not in text


# -- a database file the service cannot make


def test_a_file_it_cannot_create_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "[Errno 2] No such file or directory" for a file in a read-only directory (or
    # one the service user may not write to): creating it failed silently, and the lock's open
    # of the missing file said so. The tests run as root, whom permissions do not stop: the
    # refusal a read-only file system gives is simulated.
    directory = tmp_path / "readonly"
    directory.mkdir()
    real_open = os.open

    def refusing_open(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT and str(path).startswith(str(directory)):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(SystemExit) as exit_:
        main(["--db", str(directory / "ds.sqlite3"), "--port", str(free_port()),
              "--log-level", "ERROR"])
    message = str(exit_.value.code)
    assert "cannot create the database file in" in message, message
    assert str(directory) in message and "Read-only file system" in message
    assert "No such file" not in message
    assert "Traceback" not in capsys.readouterr().err


# -- rates that switch the limits off


@pytest.mark.parametrize("option", ["--challenge-rate", "--upload-rate"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_rate_that_is_not_a_number_is_refused(option: str, value: str) -> None:
    # Before: --challenge-rate nan compared false with everything and was taken: the token
    # bucket stayed full, and POST /v1/challenges was never limited.
    done = subprocess.run(
        [sys.executable, "-m", "delivery_service", option, value, "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
    )
    assert done.returncode == 1, done.stderr
    assert f"{option} must be positive" in done.stderr
    assert "Traceback" not in done.stderr


# -- the database's availability in /metrics


@pytest.fixture
async def sqlite_served(tmp_path: Path) -> AsyncIterator[tuple[str, SQLiteStorage]]:
    storage = SQLiteStorage(str(tmp_path / "ds.sqlite3"))
    await storage.open()
    try:
        async with serving(DeliveryService(storage, Config(), BasicTracker())) as url:
            yield url, storage
    finally:
        await storage.close()


async def test_metrics_show_a_database_that_fails(
    sqlite_served: tuple[str, SQLiteStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: /metrics had nothing to tell an outage by (only 503s in ds_http_requests_total,
    # which need traffic): no alert could say "the database is unreachable".
    url, storage = sqlite_served
    text = await scrape(url)
    assert metric(text, "ds_database_up") == 1
    assert metric(text, "ds_database_outages_total") == 0
    assert metric(text, "ds_websockets") == 0  # a gauge has a value before its first change
    assert "# TYPE ds_database_up gauge" in text

    async def failing(group_id: bytes) -> None:
        raise OSError(5, "Input/output error")  # a disk that fails

    monkeypatch.setattr(storage, "get_group", failing)
    async with aiohttp.ClientSession() as http, http.get(url + "/healthz") as r:
        assert r.status == 503
    text = await scrape(url)  # /metrics itself answers during the outage
    assert metric(text, "ds_database_up") == 0
    assert metric(text, "ds_database_outages_total") == 1
    monkeypatch.undo()
    # the outage probe finds the database back, with no request asking
    text = await until_metric(url, "ds_database_up", 1)
    assert metric(text, "ds_database_outages_total") == 1


async def test_metrics_show_a_postgresql_outage_without_any_request(tmp_path: Path) -> None:
    dsn = require_postgres()
    schema = "ds_test_" + os.urandom(6).hex()
    proxy = PgProxy(dsn)
    await proxy.start()
    storage = PostgresStorage(proxy.dsn, schema=schema)
    await storage.open()
    try:
        async with serving(DeliveryService(storage, Config(), BasicTracker())) as url:
            assert metric(await scrape(url), "ds_database_up") == 1
            proxy.mode = "down"
            proxy.drop()  # the LISTEN connection is cut: the instance notices by itself
            text = await until_metric(url, "ds_database_up", 0)
            assert metric(text, "ds_database_outages_total") == 1
            proxy.mode = "up"
            text = await until_metric(url, "ds_database_up", 1)
            assert metric(text, "ds_database_outages_total") == 1
    finally:
        await storage.close()
        await proxy.close()
        await drop_schema(dsn, schema)
