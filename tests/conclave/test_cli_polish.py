"""A first-time user's run: the audit report piped or at 80 columns, exit statuses documented
in one place, every option's help, which port `serve` found in use, and `remove a\\ b`."""

from __future__ import annotations

import argparse
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conclave.audit import LogEntry, audit, save_log
from conclave.cli import build_parser, main
from mls import Client, Group
from mls.group_framing import parse_key_package
from mls.proposals import Add, Proposal, Remove
from tests.conclave.test_audit import GID, LogBuilder
from tests.delivery_service.procs import free_port

README = Path(__file__).resolve().parents[2] / "README.md"

# -- 1. the audit report at 80 columns and in a file

LONG = ("christopher-longname", "bartholomew-the-third", "maximiliana-second")


def _long_names_log() -> list[LogEntry]:
    """One member adds two; then, in one commit, removes one and lets a fourth in: a wide table
    (long names, two reasons, unconfirmed)."""
    creator, kept, gone = (Client(n.encode()) for n in LONG)
    log = LogBuilder()
    ga = Group.create(creator, GID)
    log.add("group_info", 0, LONG[0], 1000, ga.group_info())
    r = ga.add([kept.key_package(), gone.key_package()])
    log.add("commit", 0, LONG[0], 1100, r.commit)
    ga.merge_pending_commit()
    assert r.welcome is not None
    gb = Group.join(kept, r.welcome)
    log.add("proposal", 1, LONG[1], 1200, gb.propose_update())
    gone_leaf = next(m.leaf_index for m in ga.members if m.identity == gone.identity)
    fresh = parse_key_package(Client(b"dave").key_package())
    both = ga.commit([Proposal(Remove(gone_leaf)), Proposal(Add(fresh))], include_pending=False)
    log.add("commit", 1, LONG[0], 2300, both.commit)
    return log.entries


def _audit_out(tmp_path: Path, capsys: pytest.CaptureFixture[str],
               entries: list[LogEntry]) -> str:
    save_log(tmp_path / "log.cbor", GID, entries)
    assert main(["audit", "--group-id", GID.hex(), "--log", str(tmp_path / "log.cbor")]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("columns", ["80", "64"])
def test_the_audit_report_piped_keeps_headings_whole_and_says_signature_keys_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    columns: str,
) -> None:
    # Captured, stdout is no terminal: rich lays it out at $COLUMNS, as for a pipe or `less`.
    monkeypatch.setenv("COLUMNS", columns)
    entries = _long_names_log()
    out = _audit_out(tmp_path, capsys, entries)
    lines = out.splitlines()
    assert all(len(line) <= int(columns) for line in lines), out
    assert all(line == line.rstrip() for line in lines), "trailing spaces in a file"
    rule = next(i for i, line in enumerate(lines) if line.strip().startswith("\u2500"))
    heading = " ".join(lines[:rule]).split()
    for word in ("epoch", "seq", "committer", "why", "added", "removed", "since", "last",
                 "removal", "latency"):
        assert word in heading, (word, out)  # whole, not "committe" over "r"
    # the reasons are words, never cut either
    body = [word.rstrip(",") for word in " ".join(lines[rule + 1:]).split()]
    assert "remove" in body and {"(not", "yet", "confirmed)"} <= set(body)
    # one heading for the keys, then each name with its fingerprint on a line of its own
    assert out.count("signature keys") == 1
    keys = audit(GID, entries).keys
    for name, fingerprint in keys.items():
        assert re.search(rf"^  {re.escape(name)} +{fingerprint}$", out, re.M), out
    # a note's continuation lines are indented under it, words whole
    times = next(i for i, line in enumerate(lines) if line.startswith("times are"))
    assert lines[times + 1].startswith("  ") and not lines[times + 1].startswith("   ")
    words = " ".join(out.split())
    assert "times are the delivery service's, signed by no one; removal latency counts " \
           "from the first request in this log" in words
    assert f"members at the end of this log: {LONG[1]}, {LONG[0]}, dave" in words


# -- 4. a port in use: which one, and the option that changes it


def _serve(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conclave.cli", "serve", "--state", str(tmp_path), *options],
        capture_output=True, text=True, timeout=30,
    )


def test_serve_names_the_sfu_port_in_use_and_the_option_that_changes_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(tmp_path, "--ds-port", "0", "--sfu-port", str(port))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"conclave serve: cannot listen on 127.0.0.1 port {port} for the "
                           "SFU: the port is in use; give it another with --sfu-port\n"), proc.stderr


def test_serve_with_one_port_for_both_says_they_must_differ(tmp_path: Path) -> None:
    port = str(free_port())
    proc = _serve(tmp_path, "--ds-port", port, "--sfu-port", port)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"conclave serve: cannot listen on 127.0.0.1 port {port} for the "
                           "SFU: the port is in use; --sfu-port is the same as --ds-port: give "
                           "them different ports\n"), proc.stderr


# -- 5. `remove a\ b`: a backslash is an ordinary character in the commands


class _Members:
    """What `InCall` uses of a participant to remove members, with none removed for real."""

    name = "alice"
    group = object()
    removed = False
    epoch = 3
    safety_code = "0"

    def __init__(self, *members: str) -> None:
        self.member_names = ["alice", *members]
        self.removals: list[list[str]] = []

    async def remove(self, names: list[str]) -> bool:
        self.removals.append(names)
        return True


@pytest.mark.parametrize(("line", "why"), [
    ("remove a\\ b", "not members of the call: a\\\\ (a backslash does not escape a space "
                     "here: quote a name with spaces, remove 'a b')"),
    # "b" is a member, "a\" is not: still nothing is removed, and the hint names 'a b'
    ("remove b a\\ b", "not members of the call: a\\\\ (a backslash does not escape a space "
                       "here: quote a name with spaces, remove 'a b')"),
    ("remove mary\\ ann\\ lee", "not members of the call: mary\\\\, ann\\\\, lee (a backslash "
                               "does not escape a space here: quote a name with spaces, "
                               "remove 'mary ann lee')"),
    ("remove x\\", "not members of the call: x\\\\ (a backslash does not escape a space here: "
                   "quote a name with spaces, remove 'a b')"),
    ("remove mallory", "not members of the call: mallory"),  # no backslash: no hint
])
async def test_remove_with_a_shell_escaped_space_hints_to_quote_the_name(
    line: str, why: str,
) -> None:
    from conclave.commands import CommandError, InCall, parse_command

    member = _Members("a b", "b", "mary ann lee")
    command = parse_command(line + "\n")
    assert command is not None
    with pytest.raises(CommandError) as info:
        await InCall(member, lambda text: None).run(command)  # type: ignore[arg-type]
    assert str(info.value) == why
    assert member.removals == []


async def test_a_member_whose_name_ends_with_a_backslash_is_still_removed_as_shown() -> None:
    # The design kept: a name is typed as `members` shows it, its backslash doubled.
    from conclave.commands import InCall, parse_command

    member = _Members("a\\", "b")
    said: list[str] = []
    command = parse_command("remove a\\\\ b\n")
    assert command is not None
    await InCall(member, said.append).run(command)  # type: ignore[arg-type]
    assert member.removals == [["a\\", "b"]]
    assert said == ["removed a\\\\, b: epoch 3, safety code 0"]


# -- 3. every option's help says what it does and its default


def _options() -> list[tuple[str, argparse.Action, bool]]:
    """(subcommand, option, whether a choice among required alternatives) for every option."""
    parser = build_parser()
    found = [("conclave", a, False) for a in parser._actions
             if a.option_strings and a.dest != "help"]
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, sub in subparsers.choices.items():
        alternatives = {id(a) for g in sub._mutually_exclusive_groups if g.required
                        for a in g._group_actions}
        found += [(command, a, id(a) in alternatives) for a in sub._actions
                  if a.option_strings and a.dest != "help"]
    return found


def test_every_option_says_what_it_does_and_its_default() -> None:
    options = _options()
    assert {"--host", "--room", "--no-audio", "--out"} <= {a.option_strings[0]
                                                          for _, a, _ in options}
    silent = [f"{command} {a.option_strings[0]}" for command, a, _ in options
              if not (a.help or "").strip()]
    assert silent == []
    # A required option, or one of a required choice (audit --ds or --log), has no default.
    no_default = [f"{command} {a.option_strings[0]}" for command, a, alternative in options
                  if not (a.required or alternative) and "default" not in (a.help or "")]
    assert no_default == []


def test_serve_help_says_what_host_is_for(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--host HOST the address both services listen on (default 127.0.0.1" in out


# -- 2. exit statuses: as the README's list says


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`conclave serve` on free ports: its delivery service's and SFU's URLs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", "0", "--sfu-port", "0",
         "--state", str(tmp_path / "serve")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        ds, sfu = (proc.stdout.readline().split()[-1] for _ in range(2))
        yield ds, sfu
    finally:
        proc.send_signal(signal.SIGINT)
        # Ctrl-C ends `serve` with status 0
        assert proc.wait(timeout=15) == 0


def _read_until(proc: subprocess.Popen[str], start: str, timeout: float = 60) -> str:
    """The first line of the child's output that starts with `start`."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1)[0]:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith(start):
                return line
    raise AssertionError(f"no line starting {start!r} (status {proc.poll()})")


@pytest.mark.parametrize("how", ["ctrl-c", "quit"])
def test_a_call_ended_by_ctrl_c_or_quit_exits_0(
    served: tuple[str, str], tmp_path: Path, how: str,
) -> None:
    ds, sfu = served
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", "alice",
         "--ds", ds, "--sfu", sfu, "--state", str(tmp_path / "alice"), "--rotation", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _read_until(proc, "epoch ")  # in the call
        assert proc.stdin is not None
        if how == "quit":
            proc.stdin.write("quit\n")
            proc.stdin.flush()
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_join_that_fails_exits_2(tmp_path: Path) -> None:
    # nothing listens there: a network error, one line, status 2
    proc = subprocess.run(
        [sys.executable, "-m", "conclave.cli", "join", "--room", "r", "--name", "alice",
         "--ds", f"http://127.0.0.1:{free_port()}", "--state", str(tmp_path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("conclave join: ") and proc.stderr.count("\n") == 1


def test_the_readme_lists_the_exit_statuses_in_one_place() -> None:
    text = README.read_text()
    section = text[text.index("## Exit statuses"):]
    section = " ".join(section[: section.index("\n## ")].split())
    for said in ("`join`: 0 when the call ends (Ctrl-C, SIGTERM, `quit`",
                 "2 for an error", "130 for Ctrl-C or SIGTERM while still joining",
                 "`serve`: 0 after Ctrl-C or SIGTERM",
                 "`demo`: 0 when every check passes, 1 when one fails",
                 "`audit`: 0 when the log verifies, 1 when it does not",
                 "141 when the reader of its output goes away"):
        assert said in section, said
    # `conclave --help` says the same, in short, and points there
    out = " ".join(build_parser().format_help().split())
    assert "exit status: 0 success (for join: the call ended, by Ctrl-C or quit too)" in out
    assert "README's Exit statuses" in out
