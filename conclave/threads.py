"""Blocking calls kept off the event loop: in daemon threads, which never hold the process
back, or (saves) in one that ends its job before the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
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


class LatestOnly:
    """Blocking jobs run one at a time, in the order given, in a thread of their own; a job
    not started yet is dropped when a newer one comes, whose callers' wait ends with it. For
    saving a state: only the newest snapshot counts, and an older one written after it would
    undo it. The thread is no daemon: a job handed over is run to its end before the process
    exits (a save cut short at exit would lose the last state)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._next: Callable[[], None] | None = None
        self._waiting: list[Callable[[BaseException | None], None]] = []
        self._running = False

    def submit(self, job: Callable[[], None], done: Callable[[BaseException | None], None]) -> None:
        """Run `job` (or a newer one in its place); `done` gets how it ended, in the thread."""
        with self._lock:
            self._next = job
            self._waiting.append(done)
            if self._running:
                return  # the running thread takes it next
            self._running = True
        try:
            threading.Thread(target=self._run, name=self._name, daemon=False).start()
        except RuntimeError:  # no new thread (at interpreter shutdown): here, as it must run
            self._run()

    def run_later(self, job: Callable[[], None]) -> asyncio.Future[None]:
        """`submit` from the loop: a future of how the job that covered `job` ended."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if future.done():  # its waiter was cancelled: the job ran all the same
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(None)

        def done(exc: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(settle, exc)

        self.submit(job, done)
        return future

    def run(self, job: Callable[[], None]) -> None:
        """`submit`, and block until it ran: its exception raised here."""
        ended = threading.Event()
        outcome: list[BaseException | None] = []

        def done(exc: BaseException | None) -> None:
            outcome.append(exc)
            ended.set()

        self.submit(job, done)
        ended.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def wait_idle(self) -> None:
        """Block until every job handed over has run."""
        with self._idle:
            self._idle.wait_for(lambda: not self._running)

    def _run(self) -> None:
        while True:
            with self._lock:
                job, waiting = self._next, self._waiting
                self._next, self._waiting = None, []
                if job is None:
                    self._running = False
                    self._idle.notify_all()
                    return
            exc: BaseException | None = None
            try:
                job()
            except BaseException as error:  # handed to its callers
                exc = error
            for done in waiting:
                done(exc)
