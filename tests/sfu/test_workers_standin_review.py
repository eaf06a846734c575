"""Hostile review of worker 0's stand-in on a down worker's port (`Supervisor._stand_in`): a
connection it accepted gets its answer even when the worker restarts at that very moment, and
a failing accept (out of descriptors) is a warning, not a traceback or a spinning loop."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from typing import Any

import pytest

from tests.sfu.test_workers import _free_ports, _wait
from tests.sfu.test_workers_standin import (
    Run,
    _supervisor,
    crashing_worker,
    slow_restart,
    supervised,
)

__all__ = ["slow_restart", "supervised"]  # fixtures, used by name


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(10):  # a guard
        while chunk := await loop.sock_recv(sock, 65536):
            data += chunk
    return data


async def test_a_connection_accepted_as_the_worker_restarts_is_answered(
    slow_restart: list[int], supervised: Run
) -> None:
    # Before: the stand-in was an asyncio server, closed at the restart; a connection it had
    # accepted in the same turn of the event loop (its transport not made yet) was dropped
    # without an answer (asyncio's Server._attach on a closed server), the client left with an
    # empty reply, not the 503 (or "unavailable") that says "try again".
    port, supervisor, worker = crashing_worker(supervised)
    assert await _wait(lambda: worker.stand_in, 10), "no stand-in"
    client = socket.create_connection(("127.0.0.1", port))  # in the port's queue at once
    try:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setblocking(False)
        # One turn: the event loop sees the port readable and accepts; the next: the restart
        # stops the stand-in, before the accepted connection's own task has run.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        supervisor._end_stand_in(worker)
        reply = await _read_all(client)
    finally:
        client.close()
    assert reply.startswith(b"HTTP/1.1 503 "), reply
    assert f"worker 1 (port {port}) is down".encode() in reply


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_connection_near_the_restart_is_answered_or_left_queued(
    turns: int, slow_restart: list[int], supervised: Run
) -> None:
    # Whatever the turn of the restart: either worker 0 answers the connection, or it is left
    # in the port's queue for the new worker, never dropped.
    port, supervisor, worker = crashing_worker(supervised)
    assert await _wait(lambda: worker.stand_in, 10), "no stand-in"
    client = socket.create_connection(("127.0.0.1", port))
    try:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setblocking(False)
        for _ in range(turns):
            await asyncio.sleep(0)
        supervisor._end_stand_in(worker)
        try:
            reply = await asyncio.wait_for(_read_all(client), 1.0)
        except TimeoutError:
            # Still queued: the port's next accept (here, by hand) takes it.
            [listening] = worker.sockets
            listening.setblocking(False)
            conn, _ = listening.accept()
            conn.close()
            return
    finally:
        client.close()
    assert reply.startswith(b"HTTP/1.1 503 "), reply


class _OutOfDescriptors(socket.socket):
    """A listening socket (and its duplicates: `dup` keeps the class) whose accept fails as
    when the process is out of file descriptors."""

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def test_a_stand_in_out_of_descriptors_warns_and_leaves_the_port_queueing(
    slow_restart: list[int], supervised: Run, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: asyncio's server logged an ERROR with a traceback ("socket.accept() out of system
    # resource") and retried a second later, on the closed duplicate if the worker had
    # restarted meanwhile (another traceback).
    caplog.set_level(logging.INFO)
    port = _free_ports(1)
    supervisor = _supervisor("raise SystemExit(3)", port)
    [worker] = supervisor.workers
    [real] = worker.sockets
    worker.sockets = [_OutOfDescriptors(fileno=real.detach())]
    supervised(supervisor)
    assert await _wait(lambda: worker.stand_in, 10), "no stand-in"
    client = socket.create_connection(("127.0.0.1", port))
    try:
        warning = f"cannot answer on port {port} meanwhile: [Errno {errno.EMFILE}]"
        assert await _wait(lambda: warning in caplog.text, 10), caplog.text
        assert not worker.stand_in  # no reader left on a socket that stays readable
        assert not [r for r in caplog.records if r.exc_info], caplog.text
        # the connection still queues, for the restarted worker
        [listening] = worker.sockets
        listening.setblocking(False)
        conn, _ = socket.socket.accept(listening)
        conn.close()
    finally:
        client.close()
