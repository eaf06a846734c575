"""What `conclave join` and `serve` do when things go wrong: no lost state, no burnt identity, no
hang, a clear line."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest

from conclave.cli import main
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services
from tests.delivery_service.procs import free_port


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "conclave.cli", *args]


def _saved(state: Path, name: str) -> dict:
    return cbor2.loads((state / f"{name}.state").read_bytes())


@pytest.fixture
async def services(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Services(db=str(tmp_path / "ds.sqlite3"))
    await s.start()
    yield s
    await s.stop()


async def _alice_and_bob_in_r(services: Services, state: Path) -> tuple[Participant, Participant]:
    """alice creates room "r" and bob joins it; both started, saving to `state`."""
    alice = Participant("alice", services.ds_url, state_dir=state)
    bob = Participant("bob", services.ds_url, state_dir=state)
    await alice.start()
    await bob.start()
    await alice.create("r")
    await bob.join("r")
    return alice, bob


async def test_a_failed_join_keeps_the_saved_call(services: Services, tmp_path: Path) -> None:
    state = tmp_path / "state"
    alice, bob = await _alice_and_bob_in_r(services, state)
    await bob.close()
    before = _saved(state, "bob")
    assert "group" in before
    unreachable = f"http://127.0.0.1:{free_port()}"
    for extra in (["--ds", unreachable], ["--ds", services.ds_url, "--video", "/no/such.mp4"]):
        proc = await asyncio.create_subprocess_exec(
            *_cli(
                "join",
                "--room",
                "r",
                "--name",
                "bob",
                "--state",
                str(state),
                "--sfu",
                services.sfu_url,
                *extra,
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, err
        after = _saved(state, "bob")
        assert after["group"] == before["group"] and after["applied_seq"] == before["applied_seq"]
    # and bob is still in the call
    bob = Participant("bob", services.ds_url, state_dir=state)
    try:
        await bob.start()
        assert await bob.enter("r") == "rejoined"
        await bob.wait_epoch(alice.epoch or 0)
        assert bob.safety_code == alice.safety_code
    finally:
        await bob.close()
        await alice.close()


async def test_a_join_finds_its_own_leftover_leaf_and_replaces_it(
    services: Services, tmp_path: Path
) -> None:
    # bob's join reached the service but not his disk (interrupted, or a lost state): his leaf
    # is in the group, and a new external commit must replace it, not collide with it
    state = tmp_path / "state"
    alice, bob = await _alice_and_bob_in_r(services, state)
    try:
        bob.group = None  # as if never saved
        await bob.close()
        bob = Participant("bob", services.ds_url, state_dir=state)
        await bob.start()
        assert await bob.enter("r") == "joined"
        await alice.wait_epoch(bob.epoch or 0)
        assert alice.member_names == ["alice", "bob"] and bob.safety_code == alice.safety_code
    finally:
        await bob.close()
        await alice.close()


async def test_nothing_is_registered_before_the_key_is_on_disk(
    services: Services, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "afile"
    not_a_dir.write_text("")
    p = Participant("dana", services.ds_url, state_dir=not_a_dir)
    with pytest.raises(ConclaveError, match="cannot save the state"):
        await p.start()
    await p.ds.close()
    p = Participant("dana", services.ds_url, state_dir=tmp_path / "state")
    try:
        await p.start()  # the name was not taken by the key that could not be saved
    finally:
        await p.close()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda saved: "garbage",
        lambda saved: {**saved, "applied_seq": "x"},
        lambda saved: {**saved, "removed": 1},
        lambda saved: {**saved, "group": b"\x00\x01\x02"},
    ],
    ids=["not-a-map", "bad-counter", "bad-flag", "truncated-group"],
)
def test_a_corrupt_state_is_reported_before_anything_happens(tmp_path: Path, corrupt) -> None:
    Participant("erin", "http://127.0.0.1:9", state_dir=tmp_path).save()
    path = tmp_path / "erin.state"
    path.write_bytes(cbor2.dumps(corrupt(cbor2.loads(path.read_bytes()))))
    with pytest.raises(ConclaveError, match="cannot read the saved state"):
        Participant("erin", "http://127.0.0.1:9", state_dir=tmp_path)


def test_file_problems_are_named_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    unreachable = f"http://127.0.0.1:{free_port()}"  # reaching it would be another error
    base = ["join", "--room", "r", "--name", "n", "--ds", unreachable]
    assert main([*base, "--state", str(afile)]) == 2
    assert "cannot save the state" in capsys.readouterr().err
    assert main([*base, "--state", str(tmp_path / "s"), "--record", str(afile / "x")]) == 2
    err = capsys.readouterr().err
    assert "cannot record to" in err and "network" not in err
    assert main([*base, "--room", "\udcff", "--state", str(tmp_path / "s")]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--ds-port", "70000"],
        ["serve", "--room-token-ttl", "5"],
        ["serve", "--room-token-ttl", "soon"],
        ["join", "--room", "r", "--name", "n", "--sfu", "notaurl"],
        ["join", "--room", "r", "--name", "n", "--ds", "127.0.0.1:8470"],
    ],
)
def test_ports_and_urls_are_checked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_serve_exits_when_its_database_is_not_one(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_text("garbage, not SQLite\n" * 100)
    proc = subprocess.run(
        _cli("serve", "--db", str(bad), "--ds-port", "0", "--sfu-port", "0"),
        capture_output=True,
        text=True,
        timeout=30,  # it used to hang on the database thread
    )
    assert proc.returncode == 2 and "cannot open the database" in proc.stderr


def test_ctrl_c_stops_a_join_that_waits_on_a_silent_service(tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections, answers nothing
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    proc = subprocess.Popen(
        _cli("join", "--room", "r", "--name", "n", "--ds", url, "--state", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)
        assert proc.poll() is None  # still waiting for an answer
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        silent.close()


def test_serve_stops_at_once_with_a_participant_connected(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _cli("serve", "--ds-port", "0", "--sfu-port", "0", "--state", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ds_url = proc.stdout.readline().split()[-1]
        proc.stdout.readline()

        async def connect_then_stop() -> float:
            p = Participant("fred", ds_url, state_dir=tmp_path / "p")
            await p.start()  # its push stream is open
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            while proc.poll() is None and time.monotonic() - started < 30:
                await asyncio.sleep(0.05)
            await p.close()
            return time.monotonic() - started

        assert asyncio.run(connect_then_stop()) < 8
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_databases_serve_cannot_use_are_named_without_secrets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conclave.services import display_db

    assert (
        main(["serve", "--db", "mysql://u:hunter2@db/x", "--ds-port", "0", "--sfu-port", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert "give a SQLite file or a postgresql:// DSN" in err and "hunter2" not in err
    assert display_db("postgres://u:hunter2@[::1/x") == "PostgreSQL (a DSN that cannot be parsed)"
