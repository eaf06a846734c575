"""The `conclave` command: errors are one line, no traceback; the demo succeeds."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conclave.cli import build_parser, main, parse_group
from conclave.demo import DemoConfig
from conclave.services import Services, display_db
from tests.conclave.served import conclave_serve, create_room
from tests.delivery_service.conftest import drop_schema, require_postgres
from tests.delivery_service.procs import free_port


def test_subcommands_exist() -> None:
    parser = build_parser()
    for argv in (["serve"], ["demo"], ["join", "--room", "r", "--name", "n"],
                 ["audit", "--group", "g", "--log", "f"], ["bench"]):
        assert parser.parse_args(argv).command == argv[0]


def test_audit_needs_exactly_one_source(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "--group", "g"])
    assert info.value.code == 2
    assert "--ds" in capsys.readouterr().err


def test_group_ids() -> None:
    # --group is a room name, taken as `join --room` takes it, even when it looks like hex.
    assert parse_group("room") == b"room"
    assert parse_group("0x00ff") == b"0x00ff"
    assert parse_group("0x") == b"0x"
    parser = build_parser()
    for text in ("00ff", "0x00ff", "0X00FF"):
        args = parser.parse_args(["audit", "--group-id", text, "--log", "f"])
        assert args.group_id == b"\x00\xff" and args.group is None


@pytest.mark.parametrize("argv", [
    ["--group", ""], ["--group", "x" * 256], ["--group-id", ""], ["--group-id", "0x"],
    ["--group-id", "0xzz"], ["--group-id", "ab" * 256], ["--group", "r", "--group-id", "72"],
])
def test_bad_group_names_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", *argv, "--log", "f"])
    assert info.value.code == 2
    assert "--group" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["none.cbor", "."])
def test_a_log_file_that_cannot_be_read_is_not_a_failed_audit(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / where
    assert main(["audit", "--group", "g", "--log", str(path)]) == 2  # 1 is a failed audit
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: cannot read the log file {path}: ")
    assert err.count("\n") == 1 and "FAILED" not in err


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """`conclave serve` with a room named `0xdeadbeef`, created by alice: audit's --ds and
    --state (serve's, which holds the key it pinned for `auditor`)."""
    state = tmp_path_factory.mktemp("served")
    with conclave_serve(state) as ds_url:
        create_room(ds_url, state / "alice", "alice", "0xdeadbeef")
        yield ["--ds", ds_url, "--state", str(state)]


@pytest.mark.parametrize("where", ["log", "ds"])
def test_debug_shows_the_traceback_and_keeps_the_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # Before: --debug re-raised, and Python exited 1, which for audit says "inconsistent log".
    source = ["--log", str(tmp_path / "missing.log")] if where == "log" else [
        "--ds", "http://127.0.0.1:9"]  # nothing listens on port 9 here
    assert main(["--debug", "audit", "--group", "g", *source]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("conclave audit: ")


def test_a_room_named_like_hex_is_audited_by_its_name(
    served: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "saved.cbor"
    assert main(["audit", "--group", "0xdeadbeef", *served, "--save", str(log)]) == 0
    assert "key rotations of room '0xdeadbeef'" in capsys.readouterr().out
    assert main(["audit", "--group", "0xdeadbeef", "--log", str(log)]) == 0
    assert main(["audit", "--group-id", b"0xdeadbeef".hex(), "--log", str(log)]) == 0
    assert main(["audit", "--group-id", b"0xdeadbeef".hex(), *served]) == 0
    assert main(["audit", "--group", "deadbeef", "--log", str(log)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"conclave audit: {log} holds the log of room '0xdeadbeef', not of room 'deadbeef'\n"
    )


@pytest.mark.parametrize(("argv", "named"), [
    (["--group", "nosuch"], "no room 'nosuch'"),
    (["--group", "0x"], "no room '0x'"),
    (["--group-id", "0xdeadbeef"], "no group 0xdeadbeef"),
])
def test_a_missing_group_is_named_as_the_user_typed_it(
    argv: list[str], named: str, served: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", *argv, *served]) == 2
    err = capsys.readouterr().err
    assert err == f"conclave audit: {named} on the delivery service {served[1]}\n"


def test_a_log_that_cannot_be_saved_is_a_file_error(
    served: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save = tmp_path / "no" / "such" / "dir" / "x.log"
    assert main(["audit", "--group", "0xdeadbeef", *served, "--save", str(save)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: cannot save the log to {save}: ")
    assert "network" not in err and err.count("\n") == 1


def test_unreachable_delivery_service(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["join", "--room", "r", "--name", "n", "--ds", url, "--state", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach the delivery service" in err and "Traceback" not in err


def test_serve_prints_its_urls_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", "0", "--sfu-port", "0",
         "--state", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        urls = {line.split()[0]: line.split()[-1] for line in lines[:2]}
        assert set(urls) == {"delivery", "SFU"}
        for url in urls.values():
            host, port = url.split("//")[1].split("/")[0].split(":")
            assert host == "127.0.0.1"
            socket.create_connection((host, int(port)), timeout=5).close()  # listening
        assert (tmp_path / "conclave-ds.sqlite3").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("db", ["{tmp}/no/such/dir/ds.sqlite3",
                                "postgresql://ann:hunter2@127.0.0.1:{port}/conclave"])
def test_serve_says_which_database_it_cannot_open(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = db.format(tmp=tmp_path, port=free_port())
    assert main(["serve", "--db", db, "--ds-port", "0", "--sfu-port", "0"]) == 2
    captured = capsys.readouterr()
    err = captured.err + captured.out
    assert "cannot open the database" in err and "Traceback" not in err
    assert "hunter2" not in err  # the password is not printed


def test_serve_reads_the_database_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CONCLAVE_DS_DB", str(tmp_path / "from-env" / "ds.sqlite3"))
    assert main(["serve", "--ds-port", "0", "--sfu-port", "0", "--state", str(tmp_path)]) == 2
    assert "from-env" in capsys.readouterr().err


def test_a_dsn_is_shown_without_its_password() -> None:
    dsn = "postgresql://ann:hunter2@db.example/conclave"
    assert "hunter2" not in repr(Services(db=dsn)) + repr(DemoConfig(db=dsn))
    assert display_db("postgresql://ann:hunter2@db.example:5432/conclave") == (
        "PostgreSQL postgresql://ann:***@db.example:5432/conclave"
    )
    assert display_db("postgres://db.example/conclave") == "PostgreSQL postgres://db.example/conclave"
    assert display_db("/tmp/ds.sqlite3") == "SQLite file /tmp/ds.sqlite3"


def test_a_bad_video_fails_before_contacting_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: reaching it would be another error
    code = main(["join", "--room", "r", "--name", "n", "--ds", url, "--state", str(tmp_path),
                 "--video", str(tmp_path / "missing.mp4")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot play" in err and "Traceback" not in err


@pytest.mark.parametrize("sfu", ["closed port", "not an SFU"])
def test_join_checks_the_sfu_before_it_joins_the_group(
    served: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], sfu: str
) -> None:
    # Before: the room was created (or joined), and only then did the call-in fail: a member
    # in the group for nothing, and a new epoch at each retry.
    ds_url = served[1]
    url = (f"http://127.0.0.1:{free_port()}/v1/signal" if sfu == "closed port"
           else f"{ds_url}/v1/signal")  # a web server that 404s it
    name = "nora" if sfu == "closed port" else "nils"  # one service for both: two names
    code = main(["join", "--room", "lonely", "--name", name, "--ds", ds_url, "--sfu", url,
                 "--state", str(tmp_path), "--no-audio", "--no-commands", "--duration", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.endswith("(check --sfu; nothing was joined)\n") and "Traceback" not in err
    assert ("cannot reach the SFU" in err) == (sfu == "closed port")
    assert main(["audit", "--group", "lonely", *served]) == 2  # no such group
    assert "no room 'lonely'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["join", "--room", "r", "--name", "n", "--rotation", "-5"],
    # a hundred commits a second for every member: a slip for minutes or milliseconds
    ["join", "--room", "r", "--name", "n", "--rotation", "0.01"],
    ["join", "--room", "r", "--name", "n", "--duration", "nan"],
    ["demo", "--rotation", "0"],
    ["demo", "--phase", "soon"],
])
def test_durations_are_checked(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "seconds" in capsys.readouterr().err


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield []  # the demo's own temporary SQLite file
        return
    dsn = require_postgres()
    schema = "conclave_demo_" + os.urandom(6).hex()
    yield ["--db", dsn, "--pg-schema", schema]
    asyncio.run(drop_schema(dsn, schema))


def test_demo_exits_0(backend: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-live", "--rotation", "3", "--phase", "1.5", *backend]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "success" in out


async def test_a_removed_participants_join_says_so_without_a_traceback(tmp_path: Path) -> None:
    from conclave.participant import Participant

    services = Services(db=str(tmp_path / "ds.sqlite3"))
    await services.start()
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    carol = Participant("carol", services.ds_url, state_dir=state)
    try:
        await alice.start()
        await carol.start()
        await alice.create("r")
        await carol.join("r")
        assert await alice.remove(["carol"])
        async with asyncio.timeout(5):
            while not carol.removed:
                await asyncio.sleep(0.02)
        await carol.close()  # saved: removed, with her identity's keys
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", "carol",
            "--ds", services.ds_url, "--sfu", services.sfu_url, "--state", str(state),
            "--no-audio", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, (out, err)
        assert err.decode().strip() == (
            "conclave join: cannot join room 'r': removed from this group; a member must add "
            "you again"
        )
        assert alice.member_names == ["alice"]
    finally:
        await alice.close()
        await carol.close()
        await services.stop()


def test_a_closed_standard_output_stops_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`conclave join ... | head -1`: once the reader is gone, no 'network error'."""
    import conclave.cli as cli

    async def chatty(args: object) -> int:
        while True:
            print("x" * 1000, flush=True)

    read, write = os.pipe()
    os.close(read)
    saved = os.dup(1)
    monkeypatch.setitem(cli.COMMANDS, "audit", chatty)
    try:
        with capsys.disabled():
            os.dup2(write, 1)
            status = main(["audit", "--group", "g", "--log", "f"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(write)
    assert status == 128 + signal.SIGPIPE
    assert "network error" not in capsys.readouterr().err


def test_a_network_broken_pipe_is_still_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import conclave.cli as cli

    async def broken(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "audit", broken)
    assert main(["audit", "--group", "g", "--log", "f"]) == 2
    assert "network error" in capsys.readouterr().err
