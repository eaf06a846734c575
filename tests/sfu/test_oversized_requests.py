"""A malformed HTTP request (an oversized request line or header, an invalid header) is answered
400 by aiohttp and logged as one short line, not as aiohttp's traceback at ERROR
(`sfu.httplog`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from sfu.httplog import AIOHTTP_MESSAGE, AIOHTTP_SERVER_LOGGER, BadRequestLogFilter
from tests.sfu.test_main_logging import two_workers

# Each over aiohttp's max_line_size / max_field_size (8190 bytes), or not a valid header.
BAD_REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
]


async def send_raw(port: int, request: bytes) -> bytes:
    """The status line of the answer to `request`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


def bad_request_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "malformed HTTP request" in line]


async def test_sfu_logs_a_malformed_request_as_one_line_on_every_worker(tmp_path: Path) -> None:
    # Before: "ERROR aiohttp.server Error handling request from 127.0.0.1" and a traceback
    # ending in LineTooLong or BadHttpMessage, for each request, on every worker's port.
    async with two_workers(tmp_path) as run:
        for p in (run.port, run.port + 1):
            for request in BAD_REQUESTS:
                status = await send_raw(p, request)
                assert status.split()[1:2] == [b"400"], status
            # still serving
            async with run.session.get(f"http://127.0.0.1:{p}/healthz") as resp:
                assert resp.status == 200
    err = run.err
    assert "Traceback" not in err and "ERROR" not in err, err
    assert "LineTooLong" not in err and "Error handling request" not in err, err
    # one INFO line per worker (the first); the others within the minute only at DEBUG
    lines = bad_request_lines(err)
    assert len(lines) == 2, err
    for i, line in enumerate(sorted(lines, key=lambda line: "worker 1" in line)):
        assert f"worker {i} INFO aiohttp.server malformed HTTP request from 127.0.0.1" in line
        assert len(line) < 250, line


# --- the filter itself ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server_logger(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[logging.Logger, Clock]]:
    logger = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    # The one `quiet_bad_requests` installed for good, if a test ran a server in this process
    # before: it would have these records first, on its own clock.
    earlier = [f for f in logger.filters if isinstance(f, BadRequestLogFilter)]
    for f in earlier:
        logger.removeFilter(f)
    clock = Clock()
    installed = BadRequestLogFilter(interval=60.0, clock=clock)
    logger.addFilter(installed)
    try:
        yield logger, clock
    finally:
        logger.removeFilter(installed)
        for f in earlier:
            logger.addFilter(f)


def log_bad_request(logger: logging.Logger, exc: BaseException) -> None:
    """As aiohttp's RequestHandler.handle_error does."""
    logger.exception(AIOHTTP_MESSAGE, "203.0.113.7", exc_info=exc)


def test_the_first_is_info_then_debug_within_the_interval_with_a_count(
    server_logger: tuple[logging.Logger, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    logger, clock = server_logger
    caplog.set_level(logging.DEBUG, AIOHTTP_SERVER_LOGGER)
    log_bad_request(logger, LineTooLong(b"x" * 9000, 8190))
    log_bad_request(logger, BadHttpMessage("Invalid header token:\n\n    b'Bad Header: 1'\n  ^"))
    clock.now += 61
    log_bad_request(logger, BadHttpMessage("bad"))
    records = caplog.records
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG, logging.INFO]
    for record in records:
        assert record.exc_info is None and record.exc_text is None
        text = record.getMessage()
        assert "\n" not in text and len(text) < 200, text
        assert text.startswith("malformed HTTP request from 203.0.113.7 refused: "), text
    assert "Invalid header token: b'Bad Header: 1' ^" in records[1].getMessage()
    assert records[2].getMessage().endswith("(1 more since the last such line)")
    assert "Traceback" not in caplog.text


def test_at_info_a_flood_makes_one_line_a_minute(
    server_logger: tuple[logging.Logger, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    logger, clock = server_logger
    caplog.set_level(logging.INFO, AIOHTTP_SERVER_LOGGER)
    for _ in range(1000):
        log_bad_request(logger, LineTooLong(b"x", 8190))
        clock.now += 0.01
    assert len(caplog.records) == 1


def test_above_info_nothing_is_logged(
    server_logger: tuple[logging.Logger, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    logger, _ = server_logger
    caplog.set_level(logging.WARNING, AIOHTTP_SERVER_LOGGER)
    log_bad_request(logger, LineTooLong(b"x", 8190))
    assert caplog.records == []


def test_a_handler_exception_keeps_its_traceback(
    server_logger: tuple[logging.Logger, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    # aiohttp logs a handler's own exception (a bug, 500) with the same message: untouched
    logger, _ = server_logger
    caplog.set_level(logging.INFO, AIOHTTP_SERVER_LOGGER)
    try:
        raise KeyError("bug")
    except KeyError as exc:
        log_bad_request(logger, exc)
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert record.getMessage() == "Error handling request from 203.0.113.7"
