"""A first-time user's run of `conclave`: a reader that goes away (141, not 1), an empty
CONCLAVE_STATE, a second Ctrl-C as a call ends, audit's network errors, a serve that cannot
listen, ws:// SFU URLs and a --record that is a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from conclave.cli import default_state_dir, main, parse_args
from tests.conclave.served import conclave_serve
from tests.conclave.test_cli_review import make_log
from tests.delivery_service.procs import free_port

SIGPIPE_STATUS = 128 + signal.SIGPIPE


# -- 1. the reader of the output goes away: 141, as for any command, never 1 ("failed")


def _with_stdout_gone(*argv: str, setup: str = "") -> subprocess.CompletedProcess[str]:
    """`conclave ARGV` (after the Python `setup`) with standard output a pipe whose reader has
    gone (`... | head -1`, once head has exited): every write to it fails with EPIPE. (A
    child process: its stdout is a pipe, buffered as in a user's shell.)"""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-c", f"{setup}\nimport sys\nfrom conclave.cli import main\n"
             f"sys.exit(main({list(argv)!r}))"],
            stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
            # stdout buffered, as by default: rich's flush is then the write that fails
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
    finally:
        os.close(write)


def test_audit_exits_141_when_its_reader_goes_away(tmp_path: Path) -> None:
    log = tmp_path / "room.log"
    make_log(log, b"room", [b"bob", b"carol"])
    # (rich's console, on EPIPE, raised SystemExit(1): the status of a log that does not verify)
    proc = _with_stdout_gone("audit", "--group", "room", "--log", str(log))
    assert proc.returncode == SIGPIPE_STATUS and proc.stderr == ""


def test_demo_exits_141_when_its_reader_goes_away() -> None:
    # The demo's call replaced by one that passed at once: what is printed after it is tested.
    setup = textwrap.dedent("""
        import conclave.demo
        from conclave.demo import DemoResult

        async def passed(config, update):
            result = DemoResult(ok=True)
            result.check("everyone decoded everyone", True)
            return result

        conclave.demo.run_demo = passed
    """)
    proc = _with_stdout_gone("demo", "--no-live", setup=setup)
    assert proc.returncode == SIGPIPE_STATUS and proc.stderr == ""


def test_bench_exits_141_when_its_reader_goes_away(tmp_path: Path) -> None:
    # One benchmark, a script that prints a line and ends: its summary is what is printed.
    (tmp_path / "quick.py").write_text("print('done')\n")
    setup = textwrap.dedent(f"""
        from pathlib import Path
        import conclave.bench
        conclave.bench.BENCH_DIR = Path({str(tmp_path)!r})
        conclave.bench.SCRIPTS = [("sframe", "sframe", "quick.py", [], [])]
    """)
    proc = _with_stdout_gone("bench", "--only", "sframe", "--out", str(tmp_path / "out"),
                             setup=setup)
    assert proc.returncode == SIGPIPE_STATUS and proc.stderr == ""


# -- 2. an empty CONCLAVE_STATE is unset, not the current directory


def test_an_empty_conclave_state_means_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CONCLAVE_STATE", "")
    assert default_state_dir() == tmp_path / ".conclave"
    monkeypatch.setenv("CONCLAVE_STATE", str(tmp_path / "given"))
    assert default_state_dir() == tmp_path / "given"


@pytest.mark.parametrize("argv", [
    ["join", "--room", "r", "--name", "n"], ["serve"],
    ["audit", "--group", "g", "--ds", "http://127.0.0.1:1"],
])
def test_an_empty_state_option_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # `--state "$DIR"` with DIR unset: the keys would go to the current directory.
    with pytest.raises(SystemExit) as info:
        parse_args([*argv, "--state", ""])
    assert info.value.code == 2
    assert "give a directory for the state" in capsys.readouterr().err


# -- 3. a second Ctrl-C as a call ends: still 0


def test_a_second_ctrl_c_after_the_call_ended_still_exits_0(tmp_path: Path) -> None:
    # The call is replaced by one that ends at once, as the first Ctrl-C ends it; the second
    # Ctrl-C comes as the process exits (a signal sent to itself: no timing).
    script = textwrap.dedent("""
        import os, signal, sys
        from conclave import cli

        async def ended(args):
            cli.call_ended(args)
            print("frames: sent nothing", flush=True)
            return 0

        cli.COMMANDS["join"] = ended
        sys.argv = ["conclave", "join", "--room", "r", "--name", "n", "--no-commands"]
        status = cli.main()
        os.kill(os.getpid(), signal.SIGINT)
        print("not reached", flush=True)
        sys.exit(status)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "frames: sent nothing\n" and proc.stderr == ""


def test_the_readme_says_a_second_ctrl_c_keeps_0() -> None:
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = " ".join(text[text.index("## Exit statuses"):].split())
    assert ("a second Ctrl-C or SIGTERM while the call ends does not cut its state's save "
            "short, and the status stays 0" in section)


# -- 4. audit --ds: network errors name the URL and what to check


def _audit_ds(url: str, state: Path) -> int:
    return main(["audit", "--group", "standup", "--ds", url, "--state", str(state)])


def test_audit_names_a_delivery_service_it_cannot_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert _audit_ds(url, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: cannot reach the delivery service at {url}: ")
    assert "check --ds" in err and "network error" not in err and err.count("\n") == 1


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_audit_says_when_the_delivery_service_does_not_answer(
    tmp_path: Path, silent_port: int, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import delivery_service.client

    # (30 s by default: the test needs only that it runs out)
    monkeypatch.setattr(delivery_service.client, "REQUEST_TIMEOUT",
                        aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=0.1))
    url = f"http://127.0.0.1:{silent_port}"
    assert _audit_ds(url, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"conclave audit: cannot reach the delivery service at {url}: no answer in time"
    ), err
    assert "check --ds" in err


# -- 5. a serve that cannot listen leaves nothing behind


def _serve(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conclave.cli", "serve", *options],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("option", ["--ds-port", "--sfu-port"])
def test_a_serve_whose_port_is_in_use_leaves_no_files(tmp_path: Path, option: str) -> None:
    state = tmp_path / "st2"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        other = "--sfu-port" if option == "--ds-port" else "--ds-port"
        proc = _serve("--state", str(state), option, port, other, "0")
    assert proc.returncode == 2
    assert "the port is in use" in proc.stderr and proc.stdout == ""
    assert not state.exists(), sorted(state.iterdir())


def test_a_serve_whose_port_is_in_use_keeps_an_existing_state_as_it_was(tmp_path: Path) -> None:
    state = tmp_path / "st"
    state.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _serve("--state", str(state), "--ds-port", str(taken.getsockname()[1]))
    assert proc.returncode == 2
    assert list(state.iterdir()) == []


def test_a_refused_join_leaves_no_new_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "otherstate" / "inner"
    with conclave_serve(tmp_path / "serve") as url:
        # the service's auditor's name: refused, and nothing saved
        assert main(["join", "--room", "r", "--name", "auditor", "--ds", url, "--state",
                     str(state), "--no-commands"]) == 2
    assert "refused to register auditor" in capsys.readouterr().err
    assert not (tmp_path / "otherstate").exists()


def test_a_join_that_keeps_a_key_keeps_its_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "otherstate"
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["join", "--room", "r", "--name", "n", "--ds", url, "--state", str(state),
                 "--no-commands"]) == 2
    assert "the new key of n is kept in" in capsys.readouterr().err
    assert (state / "n.state").exists()


# -- 6. --sfu ws:// and --record FILE


@pytest.mark.parametrize(("given", "used"), [
    ("ws://callhost:8443/v1/signal", "http://callhost:8443/v1/signal"),
    ("wss://callhost/v1/signal", "https://callhost/v1/signal"),
    ("WS://callhost:8443/v1/signal", "http://callhost:8443/v1/signal"),
    ("http://callhost:8443/v1/signal", "http://callhost:8443/v1/signal"),
])
def test_sfu_takes_a_websocket_url(given: str, used: str) -> None:
    args = parse_args(["join", "--room", "r", "--name", "n", "--sfu", given])
    assert args.sfu == used and not args.sfu_derived


def test_ds_is_still_an_http_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["join", "--room", "r", "--name", "n", "--ds", "ws://callhost:8470"])
    assert "not an http:// or https:// URL" in capsys.readouterr().err


def test_record_to_a_file_says_it_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "out.webm"
    file.write_text("")
    assert main(["join", "--room", "r", "--name", "n", "--record", str(file),
                 "--state", str(tmp_path / "state"), "--no-commands"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave join: cannot record to {file}: it is not a directory")
    assert "File exists" not in err
