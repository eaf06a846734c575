"""What `python -m sfu` logs: a line once it serves, no access lines for health checks and
scrapes, no aioice chatter unless --log-level DEBUG."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tests.sfu.test_main import SECRET, _free_port, _wait_healthy


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[SimpleNamespace]:
    """`python -m sfu --workers 2` on 127.0.0.1, both workers healthy: `port` (worker 0's),
    `session`; `err`, its stderr, once it stopped on SIGTERM (with status 0)."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.hex())
    run = SimpleNamespace(port=_free_port(), err="")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfu", "--host", "127.0.0.1", "--port", str(run.port),
         "--token-secret-file", str(secret_file), "--workers", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as run.session:
            for p in (run.port, run.port + 1):
                await _wait_healthy(run.session, f"http://127.0.0.1:{p}")
            yield run
    finally:
        proc.send_signal(signal.SIGTERM)
        _, run.err = proc.communicate(timeout=30)
    assert proc.returncode == 0, run.err


async def test_each_worker_logs_where_it_serves_and_checks_are_not_logged(
    tmp_path: Path,
) -> None:
    async with two_workers(tmp_path) as run:
        port = run.port
        for p in (port, port + 1):
            base = f"http://127.0.0.1:{p}"
            async with run.session.get(base + "/metrics") as resp:
                await resp.read()
            async with run.session.get(base + "/no-such-page") as resp:
                assert resp.status == 404
    err = run.err
    lines = err.splitlines()
    for i in (0, 1):
        assert any(
            f"worker {i} INFO sfu serving on 127.0.0.1:{port + i}" in line for line in lines
        ), err
    assert not [line for line in lines if "/healthz" in line or "/metrics" in line], err
    # other requests keep their access line: a probe of unknown paths shows in the log
    assert sum("/no-such-page" in line for line in lines) == 2, err


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    names = ("aioice", "aiohttp.access")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


# at DEBUG aioice keeps no level of its own: it logs at the root's, --log-level DEBUG
@pytest.mark.parametrize(("level", "aioice"), [("INFO", logging.WARNING), ("DEBUG", logging.NOTSET)])
def test_aioice_is_quiet_unless_debug(restore_loggers: None, level: str, aioice: int) -> None:
    from sfu.__main__ import quiet_libraries

    logging.getLogger("aioice").setLevel(logging.NOTSET)
    quiet_libraries(level)
    assert logging.getLogger("aioice").level == aioice


@pytest.mark.parametrize("debug", [False, True])
def test_health_checks_are_access_logged_only_at_debug(
    caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    from sfu.__main__ import AccessLogger

    caplog.set_level(logging.DEBUG if debug else logging.INFO, logger="aiohttp.access")
    access = AccessLogger(logging.getLogger("aiohttp.access"))
    for path in ("/healthz", "/healthz?worker=all", "/metrics", "/v1/signal"):
        access.log(make_mocked_request("GET", path), web.Response(), 0.001)
    logged = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    expected = 4 if debug else 1
    assert len(logged) == expected, logged
    assert any("/v1/signal" in line for line in logged)


