"""The CLI against hostile names, services and files: names printed as they are, a service
that repeats its log, saves that cannot destroy a good copy, DSN passwords, `audit --as` for
a service's auditor, option combinations that would do nothing, IPv6 loopback, bad names."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aioice.ice
import pytest

from conclave.audit import LogEntry, load_log, read_log, save_log
from conclave.cli import main
from conclave.errors import AuditFailure, ConclaveError
from conclave.participant import Participant
from conclave.safety import key_fingerprint
from conclave.services import Services, display_db
from mls import Client, Group
from sfu import aiortc_hooks
from tests.conclave.served import conclave_serve, create_room
from tests.delivery_service.procs import free_port


def make_log(path: Path, group_id: bytes, names: list[bytes]) -> list[LogEntry]:
    """A valid log: alice creates the group and adds `names` in one commit."""
    alice = Group.create(Client(b"alice"), group_id)
    entries = [LogEntry(1, "group_info", 0, "alice", 1000, alice.group_info())]
    result = alice.add([Client(n).key_package() for n in names])
    entries.append(LogEntry(2, "commit", 0, "alice", 2000, result.commit))
    alice.merge_pending_commit()
    entries.append(LogEntry(3, "group_info", 1, "alice", 2001, result.group_info))
    save_log(path, group_id, entries)
    return entries


# -- 1. names and rooms are printed as they are, never as rich markup


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich: no line breaks inside what the tests look for


@pytest.mark.usefixtures("wide")
def test_the_audit_prints_names_and_rooms_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    room = "ops[/]"
    log = tmp_path / "markup.log"
    make_log(log, room.encode(), [b"[b]alice", b"x[/]", b"[conceal]eve[/conceal]"])
    assert main(["audit", "--group", room, "--log", str(log)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert "key rotations of room 'ops[/]'" in out
    # In the table (added), the list of keys and the summary line: each exactly as the member
    # named itself.
    for name in ("[b]alice", "x[/]", "[conceal]eve[/conceal]"):
        assert out.count(name) == 3, name
    assert ("members at the end of this log: [b]alice, [conceal]eve[/conceal], alice, x[/]"
            in " ".join(out.split()))  # the summary line is long: rich folds it


@pytest.mark.usefixtures("wide")
def test_control_characters_in_names_are_shown_as_escapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A hostile service's log can hold any name: an ESC sequence must not reach the terminal.
    log = tmp_path / "esc.log"
    make_log(log, b"room", [b"e\x1b[8mve", "bob\u202e".encode()])
    assert main(["audit", "--group", "room", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "e\\x1b[8mve" in out and "bob\\u202e" in out


# -- 2. a service that repeats or rewinds its log


class RepeatingService:
    """Answers every request with the same page, whatever `after` says."""

    def __init__(self, page: list[LogEntry]) -> None:
        self.page = page
        self.calls = 0

    async def audit_log(self, group_id: bytes, after: int = 0) -> list[LogEntry]:
        self.calls += 1
        if self.calls > 50:  # a reader that never stops would otherwise hang the test
            raise RuntimeError("read_log keeps asking for the same page")
        return self.page


class PagingService:
    """An honest service: pages of two entries after `after`."""

    def __init__(self, entries: list[LogEntry]) -> None:
        self.entries = entries

    async def audit_log(self, group_id: bytes, after: int = 0) -> list[LogEntry]:
        return [e for e in self.entries if e.seq > after][:2]


def test_read_log_refuses_a_service_that_repeats_a_page(tmp_path: Path) -> None:
    entries = make_log(tmp_path / "log", b"room", [b"bob"])
    service = RepeatingService(entries)
    with pytest.raises(AuditFailure, match=r"message seq 1: out of order: follows seq 3"):
        asyncio.run(read_log(service, b"room"))
    assert service.calls == 2


def test_read_log_refuses_a_page_that_goes_back_inside(tmp_path: Path) -> None:
    a, b, c = make_log(tmp_path / "log", b"room", [b"bob"])
    with pytest.raises(AuditFailure, match=r"message seq 2: out of order: follows seq 3"):
        asyncio.run(read_log(RepeatingService([a, c, b]), b"room"))


def test_read_log_reads_every_page_of_an_honest_service(tmp_path: Path) -> None:
    entries = make_log(tmp_path / "log", b"room", [b"bob"])
    assert asyncio.run(read_log(PagingService(entries), b"room")) == entries


# -- 3. a failed save keeps the previous copy


def test_a_save_that_fails_keeps_the_previous_log(tmp_path: Path) -> None:
    good = tmp_path / "standup.log"
    entries = make_log(good, b"room", [b"bob"])
    before = good.read_bytes()
    # A file size limit (ulimit -f) just above the saved log, and a much larger log to save:
    # the write fails with EFBIG (Python ignores SIGXFSZ) after writing part of it.
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from conclave.audit import LogEntry, load_log, save_log\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, {len(before) + 100}))\n"
        f"gid, entries = load_log(Path({str(good)!r}))\n"
        "entries.append(LogEntry(9, 'welcome', 1, 'alice', 3000, bytes(100_000)))\n"
        "try:\n"
        f"    save_log(Path({str(good)!r}), gid, entries)\n"
        "except OSError as exc:\n"
        "    sys.exit(f'failed: {exc.errno}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("failed:"), proc.stderr
    assert good.read_bytes() == before
    assert load_log(good) == (b"room", entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["standup.log"]  # no temporary left


def test_a_save_replaces_the_previous_log_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    make_log(path, b"old", [b"bob"])
    path.chmod(0o640)
    entries = make_log(tmp_path / "other", b"new", [b"carol"])
    save_log(path, b"new", entries)
    assert load_log(path) == (b"new", entries)
    assert path.stat().st_mode & 0o777 == 0o640


# -- 4. a DSN's password, wherever it is


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://ann@db:5432/conclave?password=hunter2",
     "postgresql://ann@db:5432/conclave?password=***"),
    ("postgres://db/conclave?sslmode=require&PASSWORD=hunter2&application_name=x",
     "postgres://db/conclave?sslmode=require&PASSWORD=***&application_name=x"),
    ("postgresql://ann:hunter2@db/c?sslpassword=hunter2&pass%77ord=hunter2",
     "postgresql://ann:***@db/c?sslpassword=***&pass%77ord=***"),
])
def test_a_dsn_is_shown_without_any_password(dsn: str, shown: str) -> None:
    assert display_db(dsn) == f"PostgreSQL {shown}"


def test_serve_does_not_print_a_password_given_as_a_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = f"postgresql://ann@127.0.0.1:{free_port()}/conclave?password=hunter2"
    assert main(["serve", "--db", dsn, "--ds-port", "0", "--sfu-port", "0",
                 "--state", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "cannot open the database" in captured.err
    assert "hunter2" not in captured.err + captured.out


# -- 5 and 6. audit --as a service's auditor; options that would do nothing with --log


@pytest.fixture(scope="module")
def ops_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`conclave serve --auditor ops`, with a room `ops[/]` created by `[b]alice`: the URL and
    a state directory."""
    state = tmp_path_factory.mktemp("ops")
    with conclave_serve(state / "serve", "--auditor", "ops") as ds_url:
        create_room(ds_url, state / "alice", "[b]alice", "ops[/]")
        yield ds_url, state


@pytest.mark.usefixtures("wide")
def test_audit_as_an_auditor_named_by_serve(
    ops_served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds_url, served_state = ops_served
    state, log = tmp_path / "st", tmp_path / "ops.log"
    argv = ["audit", "--group", "ops[/]", "--ds", ds_url, "--as", "ops", "--state", str(state)]
    assert main(argv) == 2  # a new name is registered only when asked to
    assert "add --register" in capsys.readouterr().err and not state.exists()
    # serve pinned the key it made for ops in its state: no other key can take the name
    assert main([*argv, "--register"]) == 2
    assert "'ops' is reserved for an auditor" in capsys.readouterr().err
    serve_argv = ["audit", "--group", "ops[/]", "--ds", ds_url, "--as", "ops",
                  "--state", str(served_state / "serve")]
    assert main([*serve_argv, "--save", str(log)]) == 0
    out = capsys.readouterr().out
    assert "key rotations of room 'ops[/]'" in out
    assert "members at the end of this log: [b]alice" in out
    assert main(serve_argv) == 0  # again, logged in with the saved key
    assert main(["audit", "--group", "ops[/]", "--log", str(log)]) == 0


@pytest.mark.parametrize("identity", ["stranger", "auditor"])  # `auditor` is not one here
def test_audit_as_a_name_that_is_no_auditor_is_refused(
    identity: str, ops_served: tuple[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ds_url, _ = ops_served
    register = ["--register"] if identity != "auditor" else []
    assert main(["audit", "--group", "ops[/]", "--ds", ds_url, "--as", identity,
                 "--state", str(tmp_path), *register]) == 2
    err = capsys.readouterr().err
    registered = f" ({identity!r} is registered now, with the key in {tmp_path})"
    key = Participant(identity, ds_url, state_dir=tmp_path).client.signature_key.hex()
    assert err == (
        f"conclave audit: {identity!r} may not read the audit log of room 'ops[/]': it is "
        "neither a member nor an auditor of the delivery service"
        f"{registered if register else ''}; to audit as {identity!r}, have the service's "
        f"operator pin its key: --auditor {identity}={key}\n"
    )


def test_audit_as_a_member_without_its_state_is_refused_and_leaves_no_file(
    ops_served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds_url, _ = ops_served
    assert main(["audit", "--group", "ops[/]", "--ds", ds_url, "--as", "[b]alice",
                 "--state", str(tmp_path), "--register"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conclave audit: the identity '[b]alice' is registered with another key")
    assert list(tmp_path.iterdir()) == []  # the unregistered key was not kept


def test_audit_as_a_member_with_its_state(
    ops_served: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    ds_url, state = ops_served
    assert main(["audit", "--group", "ops[/]", "--ds", ds_url, "--as", "[b]alice",
                 "--state", str(state / "alice")]) == 0
    out = capsys.readouterr().out
    assert "checked against [b]alice's saved state: its signature key, and the group as it " \
        "lived epoch 0" in " ".join(out.split())


def test_audit_as_a_member_expects_its_own_key(
    ops_served: tuple[str, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A member knows its own key: a log showing its name with another one fails the audit.
    # (The service refuses such a leaf; a member whose key is not the log's stands for it.)
    ds_url, state = ops_served
    argv = ["audit", "--group", "ops[/]", "--ds", ds_url, "--as", "[b]alice",
            "--state", str(state / "alice")]
    other = key_fingerprint(b"\x01" * 32)
    monkeypatch.setattr(Participant, "key_fingerprint", property(lambda self: other))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "'[b]alice' signs with the key" in err and f"not {other}" in err


def test_a_log_file_over_the_limit_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--log` reads at most --max-log-mb (default 2 GiB) of a file: a huge file is refused
    with a usage error instead of taking all memory; a device that never ends (/dev/zero) is
    refused before it is opened, a pipe that never ends read up to the limit (test_stop27_small)."""
    log = tmp_path / "saved.log"
    make_log(log, b"room", [b"bob"])
    size = log.stat().st_size
    with log.open("ab") as f:  # past 1 MiB: the smallest limit the option takes
        f.write(bytes((1 << 20) + 1 - size))
    assert main(["audit", "--group", "room", "--log", str(log), "--max-log-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: the log file {log} is larger than 1 MiB: not read")
    assert err.count("\n") == 1
    assert main(["audit", "--group", "room", "--log", "/dev/zero", "--max-log-mb", "1"]) == 2
    assert "/dev/zero: it is a character device, not a file or a pipe" in capsys.readouterr().err
    # within the limit the same file is read (and found to have trailing data: exit 1)
    assert main(["audit", "--group", "room", "--log", str(log), "--max-log-mb", "2"]) == 1
    assert "trailing data" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "named"), [
    (["--save", "{tmp}/copy.log"], "--save"),
    (["--as", "ops"], "--as"),
    (["--state", "{tmp}/st"], "--state"),
    (["--save", "{tmp}/copy.log", "--as", "ops"], "--save and --as"),
    (["--register"], "--register"),
])
def test_options_for_the_service_are_refused_with_a_log_file(
    extra: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "saved.log"
    make_log(log, b"room", [b"bob"])
    extra = [a.format(tmp=tmp_path) for a in extra]
    assert main(["audit", "--group", "room", "--log", str(log), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    verb = "work" if " and " in named else "works"
    assert captured.err.startswith(f"conclave audit: {named} only {verb} with --ds, not with --log")
    # the hint for --save alone: copying the file is what it would have done
    assert ("copy the file" in captured.err) == ("--save" in named)
    assert captured.err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.log"]


# -- 7. IPv6 loopback


async def test_serve_on_ipv6_loopback_gives_urls_the_cli_takes(tmp_path: Path) -> None:
    from conclave.cli import http_url

    before = aioice.ice.get_host_addresses
    aiortc_hooks.restore_ice_addresses()
    services = Services(db=str(tmp_path / "ds.sqlite3"), host="::1")
    try:
        await services.start()
        assert services.ds_url.startswith("http://[::1]:")
        assert services.sfu_url.startswith("http://[::1]:")
        assert http_url(services.ds_url) == services.ds_url
        # Loopback: ICE offers 127.0.0.1, which the participants on this machine reach.
        assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
        await Participant("alice", services.ds_url, state_dir=tmp_path).ds.register()
    finally:
        await services.stop()
        aioice.ice.get_host_addresses = before


async def test_a_call_over_ipv6_loopback_decrypts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conclave.demo import create_and_invite, until

    services = Services(db=str(tmp_path / "ds.sqlite3"), host="::1")
    await services.start()
    # Each participant, too, sees that http://[::1]:.../v1/signal is loopback.
    restricted: list[bool] = []
    restrict = aiortc_hooks.restrict_ice_to_loopback
    monkeypatch.setattr(aiortc_hooks, "restrict_ice_to_loopback",
                        lambda: (restricted.append(True), restrict())[-1])
    people = [Participant(n, services.ds_url, services.sfu_url, state_dir=tmp_path)
              for n in ("alice", "bob")]
    try:
        for p in people:
            await p.start()
        await create_and_invite("room", people[0], people[1:])
        for p in people:
            await p.connect_media()
        assert restricted == [True, True]
        assert await until(lambda: all(p.stats().decrypted > 10 for p in people), 15)
    finally:
        for p in people:
            await p.close()
        await services.stop()


# -- 8. names that are no file name; join --duration


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".", "bad\x01name", "tab\there"])
def test_a_bad_name_is_refused_before_any_file_is_written(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "a" / "state"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: reaching it would be another error
    code = main(["join", "--room", "r", "--name", name, "--ds", url, "--state", str(state),
                 "--record", str(tmp_path / "rec")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave join: the name {name!r} is not allowed")
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # no state, no record directory


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "nul\x00"])
async def test_a_participant_with_a_bad_name_is_refused_before_any_file_is_written(
    name: str, tmp_path: Path
) -> None:
    with pytest.raises(ConclaveError, match="is not allowed"):
        p = Participant(name, "http://127.0.0.1:1", state_dir=tmp_path / "state")
        await p.start()  # (where the state was written before)
    assert list(tmp_path.rglob("*")) == []


def test_audit_as_a_bad_name_is_refused_before_any_file_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "a" / "state"
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["audit", "--group", "r", "--ds", url, "--as", "../evil",
                 "--state", str(state)]) == 2
    assert capsys.readouterr().err.startswith("conclave audit: the name '../evil' is not allowed")
    assert list(tmp_path.rglob("*")) == []


def test_join_duration_says_the_participant_stays_a_member(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["join", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "end the call after this long, staying a member of the group" in help_text
    assert "leave after" not in help_text
