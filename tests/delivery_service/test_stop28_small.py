"""Small delivery-service items of stop 28: --pg-schema with SQLite is refused; a caught
KeyboardInterrupt from `exec`-string code does not end `python -m delivery_service` by SIGINT;
the LISTEN connection's warnings are rate limited; one storage read per announcement from
another instance serves every socket subscribed to the group."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from delivery_service.hub import Appended, Connection, GroupRead, Hub, Subscribe
from delivery_service.metrics import service_metrics
from delivery_service.storage import Storage
from delivery_service.storage.postgres import PostgresStorage
from delivery_service.tracker import GroupState

from .conftest import Database
from .pgproxy import PgProxy
from .procs import ROOM_SECRET
from .test_push_review import Socket, until
from .test_push_review2 import append, pushed

ROOT = str(Path(__file__).resolve().parents[2])
DEADLINE = 60.0  # seconds: far more than any wait here takes on a loaded machine


def _env() -> dict[str, str]:
    path = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CONCLAVE_ROOM_SECRET": ROOM_SECRET}


# -- 1. --pg-schema means nothing to SQLite


def test_a_schema_with_a_sqlite_database_is_a_usage_error(tmp_path: Path) -> None:
    # Before: ignored without a word, the groups kept in a SQLite file the operator did not
    # mean (a CONCLAVE_DS_DB unset in this shell, say).
    db = tmp_path / "ds.sqlite3"
    done = subprocess.run(
        [sys.executable, "-m", "delivery_service", "--db", str(db), "--pg-schema", "conclave",
         "--port", "0"],
        capture_output=True, text=True, timeout=60, env=_env(), cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "delivery service: --pg-schema applies to PostgreSQL only, and --db is a SQLite file: "
        "leave it out, or give a postgresql:// DSN"
    ], done.stderr
    assert not db.exists()  # refused before anything is made


# -- 2. a KeyboardInterrupt that leaves code run by exec of a string


def test_an_interrupt_inside_exec_of_a_string_is_still_a_quiet_stop(tmp_path: Path) -> None:
    # CPython 3.11 marks a KeyboardInterrupt that leaves code run by `exec` of a string (a
    # dataclass's or namedtuple's methods being built) as unhandled even once caught, and
    # `python -m` then ends by SIGINT (-2) instead of with the program's status. aiohttp's
    # run_app catches a KeyboardInterrupt of start-up or shutdown (before its own signal
    # handlers are set, after they are removed); here one from such code at start-up, as the
    # storage is not open yet. Before:
    # the service logged "stopped" and ended by SIGINT. As sfu/__main__.py's test.
    (tmp_path / "interrupted.py").write_text(
        "import sys\n"
        "import delivery_service.__main__ as m\n"
        "real = m.web.run_app\n"
        "async def interrupted(app):\n"  # awaited by run_app before it sets its handlers
        "    exec('raise KeyboardInterrupt')\n"
        "    return app\n"
        "def run_app(app, **kwargs):\n"
        "    real(interrupted(app), **kwargs)\n"
        "m.web.run_app = run_app\n"
        "m.main(['--db', sys.argv[1], '--port', '0', '--log-level', 'INFO'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert "stopped" in proc.stderr, proc.stderr  # the interrupt was caught: a normal end
    assert proc.returncode == 0, proc.stderr


# -- 3. a LISTEN connection that flaps is warned of once a minute


def _listen_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if "did not answer" in r.getMessage() or "restored" in r.getMessage()]


async def test_a_flapping_listen_connection_is_warned_of_once_a_minute(
    proxy: PgProxy, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: a LISTEN connection that stopped answering at every check logged two warnings
    # every ~20 s forever. Now the first loss and its restoration are warnings; another within
    # the minute is at DEBUG, and counted in the next warning.
    caplog.set_level(logging.DEBUG, logger="delivery_service.storage.postgres")
    # A timeout far beyond a SELECT 1's answer on a loaded machine (one late answer would add a
    # loss and a restoration of its own to the lines compared): the stall never ends, so each
    # round still takes it once, about 2.2 s, far within DEADLINE.
    storage = PostgresStorage(proxy.dsn, schema=schema, listen_check=(0.2, 2.0))
    await storage.open()
    now = 1000.0
    storage.availability.clock = lambda: now
    try:
        for rounds, at in enumerate((1000.0, 1030.0, 1061.0), 1):
            now = at
            conn = storage._listen_conn
            assert conn is not None
            proxy.stall(conn._transport.get_extra_info("sockname")[1])  # type: ignore[attr-defined]
            deadline = time.monotonic() + DEADLINE
            while sum("restored" in line for _, line in _listen_lines(caplog)) < rounds:
                assert time.monotonic() < deadline, _listen_lines(caplog)
                await asyncio.sleep(0.02)
    finally:
        await storage.close()
    warned = "the PostgreSQL LISTEN connection did not answer within 2 s; reconnecting"
    assert _listen_lines(caplog) == [
        (logging.WARNING, warned),
        (logging.WARNING, "the PostgreSQL LISTEN connection is restored"),
        (logging.DEBUG, warned),
        (logging.DEBUG, "PostgreSQL LISTEN connection restored"),
        (logging.WARNING, warned + " (replaced 1 more time since the last warning)"),
        (logging.WARNING, "the PostgreSQL LISTEN connection is restored"),
    ]


# -- 4. one storage read per announcement from another instance, for all its sockets

MEMBERS = frozenset({"alice", "bob", "carol", "dave", "erin"})


class GroupReads:
    """Counts `get_group` calls; `hold` makes the next one wait for `gate`, `fail` makes it
    raise."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.hold = False
        self.fail = False
        real = storage.get_group

        async def counted(group_id: bytes) -> GroupState | None:
            self.calls += 1
            hold, fail = self.hold, self.fail  # this call's: the next ones read as usual
            self.hold = self.fail = False
            if hold:
                await self.gate.wait()
            if fail:
                raise ConnectionError("the database went away")
            return await real(group_id)

        monkeypatch.setattr(storage, "get_group", counted)


async def _subscribed(storage: Storage, state: GroupState, names: list[str]
                      ) -> tuple[Hub, list[tuple[Connection, Socket]]]:
    hub = Hub(storage, service_metrics())
    conns = []
    for name in names:
        ws = Socket()
        conn = hub.add(name, ws)  # type: ignore[arg-type]
        await conn.command(Subscribe(state.group_id, 0))
        conns.append((conn, ws))
    await until(lambda: all(len(ws.frames) == 1 for _, ws in conns))
    return hub, conns


@pytest.mark.parametrize("database", ["postgres"], indirect=True)  # announced by NOTIFY
async def test_an_announcement_from_another_instance_is_read_once_for_all_its_sockets(
    database: Database, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: each socket subscribed to the group read it at each NOTIFY: five reads here, a
    # thousand for a thousand members online on this instance. Each socket still gets every
    # message once, in order, and nothing else.
    other = database.storage(another=True)
    await other.open()
    try:
        state = GroupState(os.urandom(8), 0, 0, MEMBERS)
        await other.create_group(state, "alice", 0)
        hub, conns = await _subscribed(storage, state, sorted(MEMBERS))
        reads = GroupReads(storage, monkeypatch)
        for n in (1, 2):
            state = await append(other, None, state)  # its NOTIFY reaches `hub`
            await until(lambda: all(len(pushed(ws)) == n for _, ws in conns))  # noqa: B023
            assert reads.calls == n
        for conn, ws in conns:
            assert [f["type"] for f in ws.frames] == ["subscribed", "message", "message"]
            assert pushed(ws) == [1, 2] and not ws.closed
            await hub.remove(conn)
    finally:
        await other.close()


async def test_a_socket_closed_while_it_reads_leaves_the_read_to_the_others(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shared read is made by the first socket to need it: closed meanwhile, that socket
    # does not take the read away from the others waiting for it.
    state = GroupState(os.urandom(8), 0, 0, MEMBERS)
    await storage.create_group(state, "alice", 0)
    hub, conns = await _subscribed(storage, state, ["alice", "bob", "carol"])
    reads = GroupReads(storage, monkeypatch)
    reads.hold = True
    state = await append(storage, None, state)
    # as Hub._remote announces it, with alice's socket first
    event = Appended(state.group_id, state.last_seq, None,
                     state=GroupRead(storage, state.group_id))
    (alice, alice_ws), *others = conns
    alice.offer(event)
    await until(lambda: reads.calls == 1)
    for conn, _ in others:
        conn.offer(event)
    await until(lambda: all(conn.queue.empty() for conn, _ in others))
    await hub.remove(alice)
    reads.gate.set()
    await until(lambda: all(len(pushed(ws)) == 1 for _, ws in others))
    assert reads.calls == 1 and pushed(alice_ws) == []
    for conn, _ in others:
        await hub.remove(conn)


async def test_a_failed_read_fails_only_the_socket_that_made_it(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As before the reads were shared: the socket whose read failed is closed (its client
    # reconnects and catches up); the others read for themselves and get the message.
    state = GroupState(os.urandom(8), 0, 0, MEMBERS)
    await storage.create_group(state, "alice", 0)
    hub, conns = await _subscribed(storage, state, ["alice", "bob", "carol"])
    reads = GroupReads(storage, monkeypatch)
    reads.hold = reads.fail = True
    state = await append(storage, None, state)
    hub._remote(state.group_id, state.last_seq, None)
    await until(lambda: reads.calls >= 1)
    # every socket took the announcement: the others wait for that read (before: read alone)
    await until(lambda: all(conn.queue.empty() for conn, _ in conns))
    reads.gate.set()
    await until(lambda: sum(ws.closed for _, ws in conns) == 1
                and sum(pushed(ws) == [1] for _, ws in conns) == 2)
    assert reads.calls == 3
    for conn, _ in conns:
        await hub.remove(conn)
