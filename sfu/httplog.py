"""One short log line, not a traceback, for a malformed HTTP request (an oversized request line
or header, an invalid header, a bad method): a stranger's error, not the server's.

aiohttp (checked against 3.14) answers such a request itself (400, with the parser's reason)
and logs it from `RequestHandler.handle_error` in `aiohttp/web_protocol.py`:
`self.logger.exception("Error handling request from %s", request.remote, exc_info=exc)` on the
`aiohttp.server` logger, with `exc` the parser's `HttpProcessingError` (`LineTooLong`,
`BadHttpMessage`, ...), at ERROR (or at DEBUG, for a bad method in a connection's first
request). The hook is a filter on that logger: it rewrites exactly those records (the message,
and an exception of that class) into one line without the traceback, at INFO at most once per
`interval` seconds (with how many came meanwhile) and at DEBUG otherwise. Every other record of
the logger, a handler's own exception above all, passes untouched. The client's answer is
aiohttp's, unchanged. If aiohttp changes that message or call, the records pass untouched
again: tracebacks come back, nothing is lost (tests/sfu/test_oversized_requests.py sees it).

The SFU and the delivery service both install it (`quiet_bad_requests`); the delivery service
may import `sfu` (tests/test_layers.py).

`AccessLogger` is the SFU's access log: aiohttp's, without the lines of health checks and
scrapes (`QUIET_PATHS`) unless the access logger is at DEBUG. Every HTTP server of the SFU uses
it: each worker's, and worker 0's stand-in on the port of a worker that is down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.abc import BaseRequest
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_log import AccessLogger as _AiohttpAccessLogger

AIOHTTP_SERVER_LOGGER = "aiohttp.server"
AIOHTTP_MESSAGE = "Error handling request from %s"  # aiohttp's, in RequestHandler.handle_error
LOG_INTERVAL = 60.0  # seconds between INFO lines for bad requests
MAX_REASON = 100  # characters of the parser's reason in the line (it quotes the request)
# Polled every few seconds by load balancers and Prometheus: one access line each would bury
# everything else in the log. Logged only at --log-level DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/metrics"})


class AccessLogger(_AiohttpAccessLogger):
    """aiohttp's access log, without the lines for health checks and scrapes unless DEBUG."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in QUIET_PATHS and not self.logger.isEnabledFor(logging.DEBUG):
            return
        super().log(request, response, time)


class BadRequestLogFilter(logging.Filter):
    """Turns aiohttp's traceback for a malformed request into one short line (module docstring)."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._next_info = -float("inf")
        self._unlogged = 0  # bad requests since the last INFO line

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg != AIOHTTP_MESSAGE or not isinstance(exc, HttpProcessingError):
            return True
        now = self.clock()
        if record.levelno > logging.INFO and now >= self._next_info:
            self._next_info = now + self.interval
            level = logging.INFO
            since = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
            self._unlogged = 0
        else:
            level = logging.DEBUG
            since = ""
            self._unlogged += 1
        # The record passed the logger's level as ERROR: it must pass it again at its new one.
        if not logging.getLogger(record.name).isEnabledFor(level):
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg = "malformed HTTP request from %s refused: %s%s"
        record.args = (remote, _reason(exc), since)
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _reason(exc: HttpProcessingError) -> str:
    """The parser's reason, on one line of printable characters: it quotes the request."""
    text = " ".join(str(exc.message).split()) or type(exc).__name__
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def quiet_bad_requests() -> BadRequestLogFilter:
    """Install the filter on aiohttp's server logger, once per process; return it."""
    logger = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, BadRequestLogFilter):
            return existing
    installed = BadRequestLogFilter()
    logger.addFilter(installed)
    return installed
