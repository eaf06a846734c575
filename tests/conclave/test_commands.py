"""In-call commands of `conclave join`: parsing, carrying them out on a real call, and the
command line end to end (a `conclave join` child process told what to do on its stdin)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conclave.cli import describe_error, printable
from conclave.commands import (
    MAX_LINE,
    MAX_NAMES,
    Command,
    CommandError,
    InCall,
    commands_wanted,
    listed,
    parse_command,
    read_lines,
)
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services
from tests.conclave.conftest import until


@pytest.mark.parametrize(("line", "command"), [
    ("", None),
    ("  \n", None),
    ("members\n", Command("members")),
    ("  REMOVE bob  carol\r\n", Command("remove", ("bob", "carol"))),
    ("invite bob bob dave", Command("invite", ("bob", "dave"))),
    ("leave", Command("leave")),
    ("remove 'mallory x' \"o'brien\" eve", Command("remove", ("mallory x", "o'brien", "eve"))),
    ("remove mal\\xa0lory", Command("remove", ("mal\\xa0lory",))),  # typed as shown
    ("remove #1", Command("remove", ("#1",))),  # no comments
])
def test_commands_parse(line: str, command: Command | None) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(("line", "why"), [
    ("kick bob", "unknown command 'kick'"),
    ("\x1b[2Jnuke", "unknown command '\\x1b[2jnuke'"),
    ("x" * 100, "unknown command '" + "x" * 40 + "...'"),
    ("remove", "remove needs at least one name"),
    ("remove 'mallory", "a quote is not closed"),
    ("remove ''", "1 to 255 bytes"),
    ("invite", "invite needs at least one name"),
    ("rotate now", "rotate takes no names"),
    ("members bob", "members takes no names"),
    ("remove " + " ".join(f"n{i}" for i in range(MAX_NAMES + 1)), f"at most {MAX_NAMES} names"),
    ("remove bob" + " " * (MAX_LINE - 9), f"more than {MAX_LINE} bytes"),
])
def test_a_bad_line_says_what_is_wrong(line: str, why: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_command(line)
    assert why in str(info.value)


def test_names_are_shown_so_that_they_can_be_typed_back() -> None:
    # Hidden characters and spaces other than U+0020 as escapes; quoted when they hold a
    # space, a quote or a comma, so that a list of them reads unambiguously.
    assert printable("mal\xa0lory\u3000\u2028\x1b") == "mal\\xa0lory\\u3000\\u2028\\x1b"
    assert listed(["alice", "mallory x", "a,b", "o'brien", "mal\xa0lory", " eve"]) == (
        "alice, 'mallory x', 'a,b', 'o'\"'\"'brien', mal\\xa0lory, ' eve'"
    )
    for name in ("mallory x", "a,b", "o'brien", " eve"):
        assert parse_command(f"remove {listed([name])}") == Command("remove", (name,))


def test_errors_show_what_the_service_said_without_escape_sequences() -> None:
    from delivery_service.errors import RequestFailed

    assert describe_error(ConclaveError("cannot invite 'dave': \x1b]0;pwned\x07")) == (
        "cannot invite 'dave': \\x1b]0;pwned\\x07"
    )
    said = describe_error(RequestFailed(400, "bad", "no\x1b[2J"))
    assert "\x1b" not in said and "no\\x1b[2J" in said


def test_a_name_that_cannot_be_an_identity_is_refused_before_anything_happens() -> None:
    with pytest.raises(ConclaveError):
        parse_command("remove bo\x00b")


def test_the_longest_line_is_taken() -> None:
    names = tuple(f"{i:02}" + "b" * 253 for i in range(MAX_NAMES))
    line = f"remove {' '.join(names)}".ljust(MAX_LINE)
    assert parse_command(line + "\n") == Command("remove", names)


async def test_lines_come_in_order_an_overlong_one_cut_then_the_end() -> None:
    read, write = os.pipe()
    with os.fdopen(read, "r") as stdin:
        lines = read_lines(asyncio.get_running_loop(), stdin)  # reading before the writes
        with os.fdopen(write, "wb") as w:
            await asyncio.to_thread(
                w.write, b"members\n" + b"y" * (3 * MAX_LINE) + b"\nrotate\n\xffhelp\n"
            )
        got = [await asyncio.wait_for(lines.get(), 5) for _ in range(5)]
    assert got[0] == "members\n"
    assert got[1] is not None and len(got[1]) == MAX_LINE + 1
    with pytest.raises(CommandError, match="more than"):
        parse_command(got[1])
    assert got[2:] == ["rotate\n", "\ufffdhelp\n", None]


def test_commands_are_read_from_a_pipe_not_from_nothing() -> None:
    read, write = os.pipe()
    with os.fdopen(read, "r") as pipe:
        assert commands_wanted(pipe)
    os.close(write)
    closed = open(os.devnull)  # noqa: SIM115
    closed.close()
    assert not commands_wanted(closed)
    assert not commands_wanted(io.StringIO("members\n"))  # no file descriptor


class _Said:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)


async def test_members_remove_invite_and_rotate_change_the_call(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio
    said = _Said()
    call = InCall(alice, said)
    await call.run(Command("members"))
    assert said.lines[-1] == (f"epoch {alice.epoch}: members alice, bob, carol; safety code "
                              f"{alice.safety_code}")

    epoch = alice.epoch
    await call.run(Command("remove", ("bob",)))
    assert alice.epoch == epoch + 1 and alice.member_names == ["alice", "carol"]
    assert said.lines[-1].startswith(f"removed bob: epoch {epoch + 1}, safety code ")
    await until(lambda: bob.removed)
    assert bob.removed_by == "alice"  # from her signed commit

    await call.run(Command("invite", ("bob",)))
    assert alice.epoch == epoch + 2 and alice.member_names == ["alice", "bob", "carol"]
    assert said.lines[-1].startswith(f"added bob: epoch {epoch + 2}")
    await bob.wait_for_welcome(5)  # the Welcome reaches him: he is back in
    assert bob.epoch == epoch + 2 and not bob.removed and bob.removed_by is None

    await call.run(Command("rotate"))
    assert alice.epoch == epoch + 3
    await carol.wait_epoch(epoch + 3)
    assert said.lines[-1] == f"rotated the keys: epoch {epoch + 3}, safety code {carol.safety_code}"


@pytest.mark.parametrize(("command", "why"), [
    (Command("remove", ("bob", "mallory")), "not members of the call: mallory"),
    (Command("remove", ("alice",)), "use leave"),
    (Command("invite", ("dave", "carol")), "members of the call already: carol"),
    (Command("invite", ("nobody",)), "cannot invite 'nobody'"),
])
async def test_a_command_that_cannot_be_done_changes_nothing(
    trio: list[Participant], command: Command, why: str
) -> None:
    alice = trio[0]
    dave = Participant("dave", alice.ds_url, state_dir=alice.state_dir)
    await dave.start()  # registered, with KeyPackages: an Add of him alone would work
    try:
        epoch, members = alice.epoch, alice.member_names
        with pytest.raises(ConclaveError, match=why):
            await InCall(alice, _Said()).run(command)
        assert (alice.epoch, alice.member_names) == (epoch, members)
    finally:
        await dave.close()


async def test_leave_ends_the_call_once_a_member_commits_it(trio: list[Participant]) -> None:
    alice, bob, _ = trio
    said = _Said()
    call = InCall(bob, said)
    await call.run(Command("leave"))
    assert call.left and "asked to leave" in said.lines[-1]
    await until(lambda: bob.removed)
    await until(lambda: alice.member_names == ["alice", "carol"])
    with pytest.raises(CommandError, match="not a member"):
        await call.run(Command("members"))


async def test_the_last_member_leaves_by_itself(services: Services, tmp_path: Path) -> None:
    # No one else can commit its leaving: `leave` forgets the group (a room made by a typo in
    # --room must not hold the name for good, test_sole_member_leave).
    alice = Participant("alice", services.ds_url, state_dir=tmp_path)
    await alice.start()
    try:
        await alice.create("room")
        said = _Said()
        call = InCall(alice, said)
        await call.run(Command("leave"))
        assert call.left and alice.removed
        assert len(said.lines) == 1 and "room" in said.lines[0]
    finally:
        await alice.close()


async def test_a_failing_command_is_reported_and_the_next_one_runs(
    trio: list[Participant],
) -> None:
    said, errors = _Said(), _Said()
    call = InCall(trio[0], said)
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    for line in ("kick bob\n", "remove mallory\n", "\n", "members\n", "quit\n", None):
        lines.put_nowait(line)
    await asyncio.wait_for(call.serve(lines, errors), 10)
    assert errors.lines == ["unknown command 'kick' (help lists them)",
                            "not members of the call: mallory"]
    assert said.lines[0].startswith(f"epoch {trio[0].epoch}: members alice, bob, carol")
    assert call.quit.is_set()


class _SlowMember:
    """What InCall uses of a participant, with a rotation that takes until `release`."""

    name = "alice"
    group = object()
    removed = False
    epoch = 7
    member_names = ["alice", "bob"]
    safety_code = "1"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.rotating = asyncio.Event()
        self.rotated = False

    async def rotate(self) -> bool:
        self.rotating.set()
        await self.release.wait()
        self.rotated = True
        return True


async def _rotating() -> tuple[_SlowMember, _Said, InCall, asyncio.Queue[str | None],
                                asyncio.Future[None]]:
    """A call whose member is in the middle of a `rotate` typed on its input."""
    member, said = _SlowMember(), _Said()
    call = InCall(member, said)  # type: ignore[arg-type]
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    serving = asyncio.ensure_future(call.serve(lines, _Said()))
    lines.put_nowait("rotate\n")
    await asyncio.wait_for(member.rotating.wait(), 5)
    return member, said, call, lines, serving


async def test_quit_and_help_do_not_wait_for_a_command_under_way() -> None:
    member, said, call, lines, serving = await _rotating()
    lines.put_nowait("help\n")
    lines.put_nowait("quit\n")
    await asyncio.wait_for(call.quit.wait(), 5)
    assert said.lines[-1].startswith("commands, one per line") and not member.rotated
    serving.cancel()


async def test_the_end_of_the_call_lets_the_command_under_way_finish() -> None:
    # Cut short after its commit, an invite would leave the invitee without its Welcome.
    member, said, call, _, serving = await _rotating()
    serving.cancel()  # Ctrl-C: the call ends
    asyncio.get_running_loop().call_later(0.2, member.release.set)
    await asyncio.wait_for(call.finish(timeout=30), 10)
    assert member.rotated
    assert said.lines == ["finishing rotate first (at most 30 s)", "rotated the keys: epoch 7, "
                          "safety code 1"]


async def test_a_command_that_does_not_finish_in_time_is_cancelled() -> None:
    member, _, call, _, serving = await _rotating()
    serving.cancel()
    await asyncio.wait_for(call.finish(timeout=0.05), 10)
    assert not member.rotated
    await call.finish()  # nothing under way: at once


async def test_the_end_of_the_input_is_said_and_what_it_asked_for_is_done() -> None:
    member, said = _SlowMember(), _Said()
    member.release.set()
    call = InCall(member, said)  # type: ignore[arg-type]
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    lines.put_nowait("rotate\n")
    lines.put_nowait(None)
    await asyncio.wait_for(call.serve(lines, _Said(), at_end="no more"), 5)
    assert said.lines == ["no more", "rotated the keys: epoch 7, safety code 1"]


async def test_a_member_with_spaces_or_hidden_characters_in_its_name_can_be_removed(
    services: Services, tmp_path: Path
) -> None:
    names = ["alice", "mallory x", "mal\xa0lory", "mal\\xa0lory"]  # a space; a backslash
    people = [Participant(n, services.ds_url, state_dir=tmp_path) for n in names]
    try:
        for p in people:
            await p.start()
        alice = people[0]
        await alice.create("r")
        for p in people[1:]:
            await p.join("r")
        await until(lambda: len(alice.member_names) == 4)
        said = _Said()
        call = InCall(alice, said)
        await call.run(Command("members"))
        assert "members alice, mal\\\\xa0lory, 'mallory x', mal\\xa0lory;" in said.lines[-1]
        # each as `members` shows it: the no-break space's first, then the backslash's
        for line, left in (("remove mal\\xa0lory", names[3]), ("remove mal\\\\xa0lory", None),
                           ("remove 'mallory x'", None)):
            command = parse_command(line)
            assert command is not None
            await call.run(command)
            if left is not None:
                assert left in alice.member_names and names[2] not in alice.member_names
        assert alice.member_names == ["alice"]
    finally:
        for p in people:
            await p.close()


@pytest.mark.parametrize("how", ["ctrl-z-bg", "loses-terminal"])
def test_a_background_job_neither_stops_nor_takes_the_shells_input(
    how: str, tmp_path: Path
) -> None:
    """Ctrl-Z then `bg` (or a job that lost the terminal): a line typed for the shell is not
    read, the call is not stopped by SIGTTIN, and after `fg` commands are read again."""
    log = tmp_path / "log"
    subprocess.run(
        [sys.executable, str(Path(__file__).with_name("job_control.py")), how, str(log)],
        check=True, timeout=120,
    )
    assert log.read_text().splitlines() == [
        "job started", "job state: running", "job read: 'members\\n'"
    ]


async def test_conclave_join_takes_commands_on_its_standard_input(
    services: Services, tmp_path: Path
) -> None:
    """carol's `conclave join` is told `members`, then `remove bob`, then `leave`: alice (in
    this process) commits the leave, and carol's command ends saying so."""
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "a")
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "b")
    proc = None
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("r")
        await bob.join("r")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", "carol",
            "--ds", services.ds_url, "--sfu", services.sfu_url, "--state", str(tmp_path / "c"),
            "--no-audio", "--rotation", "0", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None

        async def said(start: str) -> str:
            while True:
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()  # type: ignore[union-attr]
                assert line, "conclave join ended early"
                if line.startswith(start):
                    return line

        await said("joined room 'r' as carol")
        first = await said("epoch ")  # the call's own line, on entering the epoch
        proc.stdin.write(b"kick bob\nmembers\n")
        assert await said("epoch ") == first  # the answer to `members`: nothing changed
        assert "members alice, bob, carol;" in first
        proc.stdin.write(b"remove bob\n")
        removed = re.fullmatch(r"removed bob: epoch (\d+), safety code (.+)\n",
                               await said("removed bob: "))
        assert removed is not None
        await alice.wait_epoch(int(removed[1]))
        assert removed[2] == alice.safety_code
        await until(lambda: bob.removed)
        proc.stdin.write(b"leave\n")
        await said("asked to leave")
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "you left the call (alice committed it)\n" in out.decode()
        assert re.search(r"^frames: sent \d+ video; received \d+ decrypted, \d+ decoded, "
                         r"\d+ failed$", out.decode(), re.M)
        assert err.decode() == "conclave join: unknown command 'kick' (help lists them)\n"
        await until(lambda: alice.member_names == ["alice"])
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for p in (alice, bob):
            await p.close()


async def test_the_call_ends_cleanly_when_an_error_cannot_even_be_printed(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stderr on a full disk: the refused command's message is lost, but the call goes on to
    its end, and the participant is closed (its state saved, the SFU left, the lock freed)."""
    import io

    from conclave.cli import build_parser, cmd_join

    read, write = os.pipe()
    os.write(write, b"kick bob\n")
    closed: list[str] = []
    real_close = Participant.close

    async def close(self: Participant) -> None:
        closed.append(self.name)
        await real_close(self)

    class FullDisk(io.TextIOBase):
        def write(self, s: str) -> int:
            raise OSError(28, "No space left on device")

    args = build_parser().parse_args([
        "join", "--room", "r", "--name", "carol", "--ds", services.ds_url, "--sfu",
        services.sfu_url, "--state", str(tmp_path), "--no-audio", "--rotation", "0",
        "--duration", "2",
    ])
    with os.fdopen(read, "r") as stdin:
        monkeypatch.setattr(Participant, "close", close)
        monkeypatch.setattr(sys, "stdin", stdin)
        monkeypatch.setattr(sys, "stderr", FullDisk())
        try:
            assert await cmd_join(args) == 0
        finally:
            monkeypatch.undo()
            os.close(write)
    assert closed == ["carol"]
