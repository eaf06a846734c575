"""Blocking calls kept off the event loop, in threads that never hold the process back."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


def in_daemon_thread(fn: Any) -> asyncio.Future[Any]:
    """`fn()` run in a daemon thread, its result (or exception) in the future returned. For
    blocking calls that nothing can interrupt (FFmpeg opening a silent stream or a FIFO): the
    future may be cancelled and the process exit, leaving the thread behind, which a thread of
    the default executor would keep alive at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:  # handed over to the loop's thread
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name="conclave-blocking", daemon=True).start()
    return future
