"""Three small CLI items: a join stopped by Ctrl-C before its call says where that leaves the
user; `audit --log` refuses a terminal in words a user at a prompt understands; and a Ctrl-C
caught after it left code run by `exec` of a string still ends `conclave` with its status."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .served import conclave_serve, create_room

PATIENCE = 60.0  # seconds: far more than any step here takes on a loaded machine
ROOT = str(Path(__file__).resolve().parents[2])

# -- 1. a join stopped before its call says whether the user is a member, and what to do


@pytest.mark.parametrize("member", [True, False], ids=["member", "not-member"])
def test_a_join_stopped_before_its_call_says_where_that_leaves_the_user(
    member: bool, silent: socket.socket, tmp_path: Path
) -> None:
    # Before: status 130 and not a word, whether the user was a member of the room or not.
    state = tmp_path / "alice"
    with conclave_serve(tmp_path / "serve") as ds_url:
        if member:
            create_room(ds_url, state, "alice", "standup")  # her saved state: a member
        sfu = f"http://127.0.0.1:{silent.getsockname()[1]}/v1/signal"
        proc = subprocess.Popen(
            [sys.executable, "-m", "conclave", "join", "--room", "standup", "--name", "alice",
             "--ds", ds_url, "--sfu", sfu, "--state", str(state), "--no-audio",
             "--no-commands"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            conn, _ = silent.accept()  # the join checks the SFU: it is not in the call yet
            try:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=PATIENCE)
            finally:
                conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert out == ""
    if member:
        assert err == (
            "conclave join: stopped: alice is a member of room 'standup' but not in its call; "
            "the same `conclave join` again calls in\n"
        )
    else:
        assert err == (
            "conclave join: stopped while joining room 'standup' as alice: not in its call; the "
            "same `conclave join` again joins it\n"
        )


def test_a_join_stopped_while_its_service_is_silent_says_it_joined_nothing(
    silent: socket.socket, tmp_path: Path
) -> None:
    # (The silent server as the delivery service: stopped before anything was joined.)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave", "join", "--room", "r", "--name", "bob", "--ds", url,
         "--sfu", f"{url}/v1/signal", "--state", str(tmp_path / "bob"), "--no-audio"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        conn, _ = silent.accept()  # the join waits for the service's answer
        try:
            proc.send_signal(signal.SIGTERM)  # as Ctrl-C (README: 130 for either)
            _, err = proc.communicate(timeout=PATIENCE)
        finally:
            conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err == (
        "conclave join: stopped while joining room 'r' as bob: not in its call; the same "
        "`conclave join` again joins it\n"
    )


# -- 2. `audit --log` refuses a terminal: give a file, or pipe one in


@pytest.mark.parametrize("given", ["/dev/stdin", "the terminal's name"])
def test_audit_refuses_a_terminal_as_its_log_and_says_to_give_a_file_or_a_pipe(given: str) -> None:
    # Before: "it is a character device, not a file or a pipe", which a user who typed
    # `--log /dev/stdin` at a prompt (to paste the log?) does not read as "your terminal".
    controller, terminal = os.openpty()
    try:
        path = given if given == "/dev/stdin" else os.ttyname(terminal)
        try:
            run = subprocess.run(
                [sys.executable, "-m", "conclave", "audit", "--group", "room", "--log", path],
                stdin=terminal, capture_output=True, text=True, timeout=PATIENCE,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"conclave audit waited on the terminal {path}")
    finally:
        os.close(terminal)
        os.close(controller)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"conclave audit: cannot read the log file {path}: it is a terminal, not a file or a "
        "pipe: give a file saved with --save, or pipe one in (`--log /dev/stdin < FILE`)\n"
    )


def test_audit_still_calls_another_character_device_by_its_kind(tmp_path: Path) -> None:
    controller, terminal = os.openpty()  # a terminal there, but not the log's file
    try:
        run = subprocess.run(
            [sys.executable, "-m", "conclave", "audit", "--group", "room", "--log", "/dev/null"],
            stdin=terminal, capture_output=True, text=True, timeout=PATIENCE,
        )  # fmt: skip
    finally:
        os.close(terminal)
        os.close(controller)
    assert run.returncode == 2, run.stderr
    assert "it is a character device, not a file or a pipe" in run.stderr


# -- 3. a KeyboardInterrupt caught after it left `exec`'d code: still conclave's own status


def test_an_interrupt_inside_exec_of_a_string_still_exits_with_the_status(tmp_path: Path) -> None:
    # Before: Ctrl-C while a dataclass was being built (as `conclave.cli` loads) made CPython
    # mark its KeyboardInterrupt as unhandled, though `main` caught it: the process then ended
    # by SIGINT (-2) instead of with 130.
    (tmp_path / "interrupted.py").write_text(
        "import sys\n"
        "import conclave.cli\n"
        "import conclave.__main__ as m\n"
        "conclave.cli.main = lambda: exec('raise KeyboardInterrupt')\n"
        "sys.exit(m.main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted"], cwd=tmp_path, env=env, capture_output=True,
        timeout=PATIENCE,
    )
    assert proc.returncode == 130, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr


# -- 4. --pg-schema without PostgreSQL is refused, as the delivery service refuses it


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_a_schema_without_postgresql_is_refused_before_anything_starts(
    command: str, tmp_path: Path
) -> None:
    # Before: ignored; the groups went to a SQLite file the user did not mean.
    env = {k: v for k, v in os.environ.items() if k != "CONCLAVE_DS_DB"}
    args = [sys.executable, "-m", "conclave", command, "--pg-schema", "calls"]
    if command == "serve":
        args += ["--state", str(tmp_path / "state"), "--ds-port", "0", "--sfu-port", "0"]
    else:
        args += ["--no-live", "--phase", "0"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=PATIENCE)
    assert done.returncode == 2, done
    given = "--db or $CONCLAVE_DS_DB" if command == "serve" else "--db"
    assert done.stderr == (
        f"conclave {command}: --pg-schema applies to PostgreSQL only, and the database is a "
        f"SQLite file: leave it out, or give a postgresql:// DSN ({given})\n"
    ), done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "state" / "conclave-ds.sqlite3").exists()


# -- 5. a join stopped while its modules load or its command line is read still says so


_LOADING = """
import sys, types

class Loading(types.ModuleType):
    def __getattr__(self, name):  # `from .cli import main`: Ctrl-C while it loads
        raise KeyboardInterrupt

sys.modules["conclave.cli"] = Loading("conclave.cli")
sys.argv = ["conclave", *sys.argv[1:]]
from conclave.__main__ import main
sys.exit(main())
"""


@pytest.mark.parametrize("command", ["join", "demo"])
def test_a_join_stopped_while_its_modules_load_says_nothing_was_joined(
    command: str, tmp_path: Path
) -> None:
    # Before: status 130 and not a word, where README promises a line for a stopped join.
    args = ["--debug", command, "--room", "r", "--name", "a"] if command == "join" else [command]
    done = subprocess.run([sys.executable, "-c", _LOADING, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 130, done
    expected = ("conclave join: stopped while starting: nothing was joined; the same "
                "`conclave join` again joins\n") if command == "join" else ""
    assert done.stderr == expected and done.stdout == "", done


def test_a_join_stopped_while_its_command_line_is_read_says_nothing_was_joined(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from conclave import cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["join", "--room", "r", "--name", "a"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == ("conclave join: stopped while starting: nothing was joined; "
                                 "the same `conclave join` again joins\n")
    assert cli.main(["audit", "--group", "r"]) == 130
    assert capsys.readouterr() == ("", "")
