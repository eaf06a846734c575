"""A malformed HTTP request (an oversized request line or header, an invalid header) is answered
400 by aiohttp and logged as one short line, not as aiohttp's traceback at ERROR."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from delivery_service.client import wait_healthy
from tests.sfu.test_oversized_requests import BAD_REQUESTS, bad_request_lines, send_raw

from .procs import ROOM_SECRET, free_port


async def test_a_malformed_request_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # Before: "ERROR aiohttp.server Error handling request from 127.0.0.1" and a traceback
    # ending in LineTooLong or BadHttpMessage, for each request.
    port = free_port()
    log = tmp_path / "ds.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "delivery_service", "--db", str(tmp_path / "ds.sqlite3"),
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "INFO"],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET},
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        assert await wait_healthy(url, 20, alive=lambda: proc.poll() is None), log.read_text()
        for request in BAD_REQUESTS:
            status = await send_raw(port, request)
            assert status.split()[1:2] == [b"400"], status
        assert await wait_healthy(url, 5)  # still serving
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "ERROR" not in text, text
    assert "Error handling request" not in text, text
    lines = bad_request_lines(text)
    assert len(lines) == 1, text  # the first at INFO, the others within the minute at DEBUG
    assert "INFO aiohttp.server malformed HTTP request from 127.0.0.1 refused: " in lines[0]
    assert len(lines[0]) < 250, lines[0]
