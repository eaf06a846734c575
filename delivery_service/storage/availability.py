"""Whether the database answers, as the service last saw it, told to the operator once per outage.

While PostgreSQL is down every request fails with the same error (and gets 503): a line per
request, or a traceback per reconnect attempt, would bury the log. Requests and background
tasks report failures with `lost`; the first one of an outage logs one warning, naming the
database without credentials, and starts a probe that asks the database every second or so;
when it answers (or a new connection is made anyway: `reached`), one more warning: an operator
who alerts on warnings (`--log-level WARNING`) sees the outage end as well as begin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Seconds between the probe's attempts while the database is away (the last one repeats).
PROBE_DELAYS = (0.2, 0.5, 1.0)
PROBE_TIMEOUT = 5.0  # a probe unanswered this long (a partition) counts as failed
# At most one outage warning per this many seconds: a database that flaps is told once, and
# again if it is still away when the interval has passed.
REPEAT_INTERVAL = 60.0


def one_line(exc: BaseException) -> str:
    """The first line of an error (asyncpg adds DETAIL and HINT lines), else its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class Availability:
    """`where`: the database, for the log, without credentials; `probe`: one cheap query through
    the same connections as requests."""

    def __init__(
        self,
        where: str,
        probe: Callable[[], Awaitable[object]],
        *,
        repeat: float = REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self.probe = probe
        self.repeat = repeat
        self.clock = clock
        self.available = True
        # Outages seen since start-up, for /metrics (a counter: a scrape may miss a short one).
        self.outages = 0
        self._since = 0.0  # when the current outage began
        self._reason = ""
        self._warned = False  # the current outage's warning was logged
        self._last_warning: float | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        # Requests the database declined (`Storage.cannot_store`), by condition, for /metrics;
        # and when each condition's warning was last logged.
        self.refusals: dict[str, int] = {}
        self._refusal_warned: dict[str, float] = {}

    def refused(self, condition: str, exc: BaseException, *, lasting: bool = False) -> None:
        """The database answers but declined a request (a full disk, a lock held too long...):
        one warning per condition, repeated at most once per `repeat` seconds while it goes on,
        not a line per request. Not an outage: reads may go on, and nothing probes.

        `lasting`: no retry gets through until the operator acts (a damaged file): told as
        an error, with what to do, at the same pace."""
        self.refusals[condition] = self.refusals.get(condition, 0) + 1
        now = self.clock()
        last = self._refusal_warned.get(condition)
        if last is not None and now - last < self.repeat:
            log.debug("%s declined a request (%s): %s", self.where, condition, one_line(exc))
            return
        self._refusal_warned[condition] = now
        if lasting:
            log.error("%s cannot serve requests (%s: %s): those that need it get 500 until it is "
                      "repaired or restored from a backup", self.where, condition, one_line(exc))
        else:
            log.warning("%s cannot store now (%s: %s): such requests get 503 until it can",
                        self.where, condition, one_line(exc))

    def lost(self, exc: BaseException) -> None:
        """A request or a connection found the database unreachable."""
        if not self.available or self._closed:
            log.debug("%s still unreachable: %s", self.where, one_line(exc))
            return
        self.available = False
        self.outages += 1
        self._since = self.clock()
        self._reason = one_line(exc)
        self._warned = False
        self.remind()
        if not self._warned:
            log.debug("%s unreachable again (%s)", self.where, self._reason)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to probe with
            if self._probe_task is None or self._probe_task.done():
                self._probe_task = asyncio.get_running_loop().create_task(self._probing())

    def remind(self) -> None:
        """Log the outage's warning if it is not logged yet and the last one is old enough."""
        if self.available or self._warned:
            return
        now = self.clock()
        if self._last_warning is not None and now - self._last_warning < self.repeat:
            return
        self._warned = True
        self._last_warning = now
        log.warning("%s is unreachable (%s): requests get 503 until it is back",
                    self.where, self._reason)

    def reached(self) -> None:
        """The database answered (the probe, or a new connection)."""
        if self.available:
            return
        self.available = True
        if self._warned:
            # a warning, as the outage's: at --log-level WARNING an outage that began must end
            log.warning("%s is reachable again after %.1f s", self.where,
                        self.clock() - self._since)
        else:
            log.debug("%s is reachable again", self.where)

    async def _probing(self) -> None:
        attempt = 0
        while not self.available and not self._closed:
            await asyncio.sleep(PROBE_DELAYS[min(attempt, len(PROBE_DELAYS) - 1)])
            attempt += 1
            self.remind()
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await self.probe()
            except Exception as exc:  # any failure: not serving yet; the loop must go on
                log.debug("%s probe failed: %s", self.where, one_line(exc))
                continue
            self.reached()

    async def close(self) -> None:
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
