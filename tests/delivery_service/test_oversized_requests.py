"""A malformed HTTP request (an oversized request line or header, an invalid header) is answered
400 by aiohttp and logged as one short line, not as aiohttp's traceback at ERROR."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from delivery_service.client import wait_healthy

from .procs import ROOM_SECRET, free_port

BAD_REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
]


async def send_raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


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
    lines = [line for line in text.splitlines() if "malformed HTTP request" in line]
    assert len(lines) == 1, text  # the first at INFO, the others within the minute at DEBUG
    assert "INFO aiohttp.server malformed HTTP request from 127.0.0.1 refused: " in lines[0]
    assert len(lines[0]) < 250, lines[0]
