"""SIGHUP (the terminal closed, an ssh session dropped) stops `conclave join`, `serve` and `demo`
as SIGTERM does: a join's recordings are finished and its state saved, even with the terminal
or the pipes of its output gone; a join started with SIGHUP ignored (`nohup`) ignores it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from .served import PATIENCE, lines_until

CONCLAVE = [sys.executable, "-m", "conclave"]


@contextlib.contextmanager
def _running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def call(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`conclave serve`, and alice in room 'r' sending audio and video: (--ds, --sfu)."""
    where = tmp_path_factory.mktemp("call")
    serve = subprocess.Popen(
        [*CONCLAVE, "serve", "--ds-port", "0", "--sfu-port", "0", "--state", str(where / "s")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    with _running(serve):
        ds = lines_until(serve, "delivery service", "delivery service URL")[-1].split()[-1]
        sfu = lines_until(serve, "SFU signalling", "SFU signalling URL")[-1].split()[-1]
        alice = subprocess.Popen(
            [*CONCLAVE, "join", "--room", "r", "--name", "alice", "--ds", ds, "--sfu", sfu,
             "--state", str(where / "alice"), "--no-commands"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        with _running(alice):
            lines_until(alice, "epoch 0:", "call-in line from alice")
            yield ds, sfu
            alice.terminate()
        serve.terminate()


def _join(call: tuple[str, str], name: str, state: Path, *options: str) -> list[str]:
    ds, sfu = call
    return [*CONCLAVE, "join", "--room", "r", "--name", name, "--ds", ds, "--sfu", sfu,
            "--state", str(state), "--no-audio", *options]


def _wait_for_recordings(proc: subprocess.Popen[str], rec: Path) -> None:
    """Until alice's audio and video have reached the join (each file is made at its first
    frame)."""
    give_up = time.monotonic() + PATIENCE
    wanted = (rec / "alice-audio.wav", rec / "alice-video.mp4")
    while not all(path.exists() for path in wanted):
        assert proc.poll() is None, "the join ended by itself"
        assert time.monotonic() < give_up, "no media reached the join"
        time.sleep(0.05)


def _frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams[0]))


def _check_finished(call: tuple[str, str], name: str, state: Path, rec: Path) -> None:
    """The recordings decode, and a second join resumes the saved state."""
    assert _frames(rec / "alice-video.mp4") > 0  # (unfinished: its frames were never written)
    assert _frames(rec / "alice-audio.wav") > 0
    again = subprocess.run(
        _join(call, name, state, "--no-commands", "--duration", "1"),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"rejoined room 'r' as {name} "), again.stdout


def test_sighup_ends_a_recording_join_as_sigterm_does(
    call: tuple[str, str], tmp_path: Path
) -> None:
    # Before: SIGHUP's default killed the join: its video recording had no frame (the MP4's
    # fragments are written as the file is finished), the call was never left.
    state, rec = tmp_path / "bob", tmp_path / "rec"
    proc = subprocess.Popen(
        _join(call, "bob", state, "--no-commands", "--record", str(rec)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with _running(proc):
        _wait_for_recordings(proc, rec)
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err  # as SIGTERM: the call ended (README's Exit statuses)
    assert err == ""
    assert out.splitlines()[-1].startswith("frames: sent ")  # the output still there is kept
    _check_finished(call, "bob", state, rec)


def _controlling_terminal() -> None:
    """In the child (a session of its own): its standard input, a pty, as its terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("how", ["terminal-closed", "pipes-closed"])
def test_a_join_whose_output_is_gone_still_finishes_and_saves(
    how: str, call: tuple[str, str], tmp_path: Path
) -> None:
    # Before the output was let go of: the join's last lines failed (EIO, or EPIPE), and its
    # status with them (1 with a traceback, or 141), even though the state was saved.
    name = how.split("-")[0]  # terminal or pipes: a name per test, in one room
    state, rec = tmp_path / name, tmp_path / "rec"
    argv = _join(call, name, state, "--record", str(rec))
    if how == "terminal-closed":
        controller, terminal = os.openpty()
        try:
            # As in a terminal window: the join's session has it as its controlling terminal,
            # and takes commands from it. Closing the window hangs it up: the kernel sends
            # SIGHUP once writes to it fail.
            proc = subprocess.Popen(
                argv, stdin=terminal, stdout=terminal, stderr=terminal, text=True,
                start_new_session=True, preexec_fn=_controlling_terminal,
            )  # fmt: skip
        finally:
            os.close(terminal)
        with _running(proc):
            try:
                _wait_for_recordings(proc, rec)
            finally:
                os.close(controller)  # the window closed
            proc.wait(timeout=PATIENCE)
    else:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with _running(proc):
            _wait_for_recordings(proc, rec)
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
            proc.send_signal(signal.SIGHUP)
            proc.wait(timeout=PATIENCE)
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
    assert proc.returncode == 0
    _check_finished(call, name, state, rec)


def _bit(sig: int) -> int:
    return 1 << (sig - 1)


def _signal_masks(pid: int) -> tuple[int, int]:
    """The signals process `pid` ignores and those it catches (Linux's /proc)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["SigIgn"], 16), int(fields["SigCgt"], 16)


def test_a_join_started_with_sighup_ignored_ignores_it(
    call: tuple[str, str], tmp_path: Path
) -> None:
    # `nohup conclave join ...`: the user asked for the call to outlive the terminal.
    proc = subprocess.Popen(
        _join(call, "nohup", tmp_path / "nohup"), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )  # fmt: skip
    with _running(proc):
        assert proc.stdin is not None
        lines_until(proc, "epoch ", "call-in line from the join")
        # Its handlers are set by now (before it joins): SIGHUP is still ignored, not caught.
        ignored, caught = _signal_masks(proc.pid)
        assert ignored & _bit(signal.SIGHUP) and not caught & _bit(signal.SIGHUP)
        assert caught & _bit(signal.SIGTERM)  # (while SIGTERM is caught: the masks are read)
        proc.send_signal(signal.SIGHUP)
        proc.stdin.write("members\n")  # answered after the SIGHUP: the call goes on
        proc.stdin.flush()
        # The answer: its epoch line, as the join prints at each new epoch too (a rotation,
        # say), then the media session's, which only `members` prints.
        lines = lines_until(proc, "in the media session", "answer to `members` after SIGHUP")
        assert len(lines) >= 2 and lines[-2].startswith("epoch "), lines
        assert ": members " in lines[-2] and proc.poll() is None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1].startswith("frames: sent ")


def test_sighup_while_joining_is_130_as_sigterm(silent: socket.socket, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    proc = subprocess.Popen(
        [*CONCLAVE, "join", "--room", "r", "--name", "bob", "--ds", url, "--sfu",
         f"{url}/v1/signal", "--state", str(tmp_path / "bob"), "--no-audio"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with _running(proc):
        conn, _ = silent.accept()  # the join waits for the service's answer
        try:
            proc.send_signal(signal.SIGHUP)
            _, err = proc.communicate(timeout=PATIENCE)
        finally:
            conn.close()
    assert proc.returncode == 130, err
    assert err == (
        "conclave join: stopped while joining room 'r' as bob: not in its call; the same "
        "`conclave join` again joins it\n"
    )


def test_sighup_stops_serve_as_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CONCLAVE, "serve", "--ds-port", "0", "--sfu-port", "0", "--state", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with _running(proc):
        lines_until(proc, "Ctrl-C to stop.", "line that serve started")
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, err
    assert err == ""


def test_sighup_stops_the_demo_and_leaves_no_temporary_directory(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CONCLAVE, "demo", "--no-live"], env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with _running(proc):
        give_up = time.monotonic() + PATIENCE
        while not any(tmp_path.glob("conclave-demo-*")):  # the demo is under way
            assert proc.poll() is None and time.monotonic() < give_up
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not any(tmp_path.glob("conclave-demo-*"))


def test_the_readme_names_sighup_in_the_exit_statuses() -> None:
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = " ".join(text[text.index("## Exit statuses"):].split())
    assert ("SIGHUP (the terminal closed, an ssh session dropped) counts as SIGTERM in each of "
            "these, unless it was ignored at the start (`nohup conclave ...`)") in section
