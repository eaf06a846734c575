"""Four small defects, one section each: the media session's lost line waits for a grace period;
a refused first run removes its state through a symbolic link as saves write it (the file the
link names goes, the link stays); URLs with an IPv6 zone are shown as RFC 6874 writes them; and
`audit --log` refuses what is no regular file instead of waiting for it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conclave import participant as participant_module
from conclave.cli import check_sfu, http_url, main
from conclave.errors import ConclaveError, ServiceUnavailable
from conclave.participant import Participant
from conclave.urls import shown_url, shown_urls

from .test_media_outage_notice import _answers, _session
from .test_media_outage_notice import _participant as _outage_participant

ZONED_SFU = "http://[fe80::1%zz9]:8443/v1/signal"  # as Conclave holds it: the zone decoded

# -- 1. the media session's lost line waits MEDIA_LOST_AFTER, and "back" follows only "lost"


def _participant(lines: list[str]) -> Participant:
    return _outage_participant(lines, ZONED_SFU)


async def test_a_quick_reconnection_of_the_media_session_tells_the_user_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: "lost the media session" at once, then "back in the media session", for a
    # session back within a second.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)  # never over in here
    lines: list[str] = []
    p = _participant(lines)
    tries = 0

    async def connect_media(*, e2ee: bool = True) -> None:
        nonlocal tries
        tries += 1
        p.sfu = _session()
        if tries < 2:
            raise ServiceUnavailable("cannot reach the SFU")

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    caplog.set_level(logging.INFO, logger=participant_module.log.name)
    await first.events.put({"type": "closed"})
    await p._follow_media_session(first, _answers())
    assert tries == 2
    assert lines == []
    async with asyncio.timeout(30):  # no lost line pending for later either: it ends at once
        await asyncio.gather(*p._tasks, return_exceptions=True)
    assert lines == []
    assert not p._media_lost
    logged = caplog.text
    assert "the media session ended" in logged and "back in the media session" in logged


async def test_a_media_session_not_back_in_time_is_told_lost_and_then_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines)

    async def connect_media(*, e2ee: bool = True) -> None:
        p.sfu = _session()
        if not lines:  # back only once the grace period is over and "lost" told
            raise ServiceUnavailable("cannot reach the SFU")

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "error", "code": "session-ended", "message": "SFU restart"})
    await first.events.put({"type": "closed"})
    async with asyncio.timeout(30):
        await p._follow_media_session(first, _answers())
    lost, back = lines
    assert "lost the media session" in lost and "SFU restart" in lost
    assert "[fe80::1%25zz9]" in lost  # (3.) the zone as RFC 6874 writes it
    assert "back in the media session" in back


async def test_the_ds_lost_line_knows_the_media_is_down_within_its_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The media session down and not told yet: the delivery service's line must not claim
    # that the media goes on.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    monkeypatch.setattr(participant_module, "SERVICE_CHECK", 0.01)
    monkeypatch.setattr(participant_module, "SERVICE_LOST_AFTER", 0.02)
    lines: list[str] = []
    p = _participant(lines)
    calling = asyncio.Event()

    async def connect_media(*, e2ee: bool = True) -> None:
        calling.set()
        await asyncio.Event().wait()  # the SFU does not answer while the test runs

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    follow = asyncio.ensure_future(p._follow_media_session(first, _answers()))
    p.stream = SimpleNamespace(connected=False)  # type: ignore[assignment]
    try:
        async with asyncio.timeout(30):
            await calling.wait()
            watch = asyncio.ensure_future(p._watch_delivery_service())
            try:
                while not lines:
                    await asyncio.sleep(0.01)
            finally:
                watch.cancel()
        [line] = lines  # the delivery service's: the media's is not told yet
        assert "lost the connection to the delivery service" in line
        assert "media goes on" not in line
    finally:
        follow.cancel()
        for task in list(p._tasks):
            task.cancel()


# -- 2. a refused first run's state behind a symbolic link: the file it names goes, the link stays


async def test_a_refused_first_runs_state_behind_a_link_is_removed_and_the_link_kept(
    tmp_path: Path,
) -> None:
    # Before: the link was unlinked, and the refused key left in the file it named.
    state, volume = tmp_path / "state", tmp_path / "volume"
    volume.mkdir()
    p = Participant("alice", "http://127.0.0.1:9", state_dir=state)
    p._lock_state()
    target = volume / "alice.state"
    link = state / "alice.state"
    link.symlink_to(target)  # the user's: this name's state lives on another volume
    # (A file there: a save refuses a link to nothing, so a first run gets here only when the
    # file the link names appeared after the state was read.)
    target.write_bytes(b"")
    await p._save()  # as `register` saves the new key before registering it: through the link
    assert target.stat().st_size > 0 and link.is_symlink()
    error = p._name_taken(True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert not target.exists()  # the refused key is not kept
    assert sorted(x.name for x in state.iterdir()) == ["alice.state"]  # the lock is gone too
    assert p._state_lock is None
    assert "this run's new key was never registered: nothing was saved" in str(error)
    assert f"{link} stays, a link to {target}, which is removed" in str(error)


async def test_a_refused_first_runs_own_state_file_is_removed(tmp_path: Path) -> None:
    p = Participant("bob", "http://127.0.0.1:9", state_dir=tmp_path)
    p._lock_state()
    await p._save()
    error = p._name_taken(True)
    assert list(tmp_path.iterdir()) == []
    assert str(error).endswith("(this run's new key was never registered: nothing was saved)")


# -- 3. a URL with an IPv6 zone is shown as RFC 6874 writes it, the form --ds takes


@pytest.mark.parametrize(
    ("held", "shown"),
    [
        ("http://[fe80::1%eth0]:8470", "http://[fe80::1%25eth0]:8470"),
        ("https://u:p@[FE80::1%en0]:8470/x?y", "https://u:***@[FE80::1%25en0]:8470/x?y"),
        ("http://[fe80::1%3]/", "http://[fe80::1%253]/"),
        ("http://[fe80::1%é]:8470", "http://[fe80::1%25%C3%A9]:8470"),
        ("http://[::1]:8470", "http://[::1]:8470"),
        ("http://127.0.0.1:8470", "http://127.0.0.1:8470"),
    ],
)
def test_a_zone_is_shown_in_the_url_form(held: str, shown: str) -> None:
    # Before: shown decoded, `[fe80::1%eth0]`, which the user typed as `%25eth0`.
    assert shown_url(held) == shown
    assert shown_urls(f"cannot reach {held}: refused") == f"cannot reach {shown}: refused"


@pytest.mark.parametrize("typed", ["http://[fe80::1%25eth0]:8470", "http://[fe80::1%eth0]:8470"])
def test_what_is_shown_is_taken_back_as_it_was(typed: str) -> None:
    held = http_url(typed)
    assert http_url(shown_url(held)) == held


def test_a_url_refused_is_quoted_as_typed() -> None:
    typed = "ftp://[fe80::1%25eth0]:8470"
    with pytest.raises(argparse.ArgumentTypeError, match="is not an http") as info:
        http_url(typed)
    assert repr(typed) in str(info.value)


def _no_such_interface() -> str:
    names = {name for _, name in socket.if_nameindex()}
    assert "zz9" not in names
    return "zz9"


async def test_the_error_for_a_derived_sfu_shows_its_zone_in_the_url_form() -> None:
    zone = _no_such_interface()
    with pytest.raises(ConclaveError) as info:
        await check_sfu(f"http://[fe80::1%{zone}]:9/v1/signal", derived=True)
    said = str(info.value)
    # (aiohttp's own words name the host, not a URL: `fe80::1%zz9`, as the system writes it)
    assert "[fe80::1%25zz9]:9" in said and "%zz9]" not in said
    assert "was derived from --ds" in said


async def test_the_delivery_service_unreached_shows_its_zone_in_the_url_form(
    tmp_path: Path,
) -> None:
    zone = _no_such_interface()
    p = Participant("alice", f"http://[fe80::1%{zone}]:9", state_dir=tmp_path)
    try:
        with pytest.raises(ServiceUnavailable) as info:
            await p.start()
    finally:
        await p.close()
    said = str(info.value)
    assert said.startswith("cannot reach the delivery service at http://[fe80::1%25zz9]:9: ")
    assert "%zz9]" not in said


def test_audit_names_the_delivery_service_with_its_zone_in_the_url_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_such_interface()
    typed = "http://[fe80::1%25zz9]:9"
    argv = ["audit", "--group", "r", "--ds", typed, "--state", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the delivery service at {typed}: " in err
    assert "%zz9]" not in err and "Traceback" not in err


# -- 4. `audit --log` reads a file or a pipe; refuses a device or a directory at once; a FIFO
# with no writer waits, as `cat` does, and Ctrl-C ends the wait


def _audit_log(path: Path, data: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`conclave audit --group room --log path` in a process of its own (`data` on its standard
    input), killed after a minute: a regression (a read that nothing interrupts) fails the test
    instead of hanging it."""
    try:
        run = subprocess.run(
            [sys.executable, "-m", "conclave", "audit", "--group", "room", "--log", str(path)],
            input=data, stdin=subprocess.DEVNULL if data is None else None, capture_output=True,
            timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"conclave audit waited on {path}")
    return subprocess.CompletedProcess(
        run.args, run.returncode, run.stdout.decode(), run.stderr.decode()
    )


def _refused(path: Path) -> str:
    """The one-line refusal (status 2) of `_audit_log(path)`: its stderr."""
    run = _audit_log(path)
    assert run.returncode == 2, run.stderr
    err = run.stderr
    assert err.startswith(f"conclave audit: cannot read the log file {path}: it is ")
    assert err.count("\n") == 1 and "Traceback" not in err and "FAILED" not in err
    return err


def _saved_log(tmp_path: Path) -> Path:
    from conclave.audit import save_log
    from conclave.participant import group_id_for_room

    path = tmp_path / "room.log"
    save_log(path, group_id_for_room("room"), [])
    return path


def _as_read_from_the_file(run: subprocess.CompletedProcess[str], saved: Path, given: Path) -> None:
    """`run` did what the audit of the file `saved` itself does (the name aside)."""
    direct = _audit_log(saved)
    assert "cannot read the log file" not in direct.stderr, direct.stderr
    assert (run.returncode, run.stdout, run.stderr.replace(str(given), str(saved))) == (
        direct.returncode, direct.stdout, direct.stderr
    )


def test_a_log_piped_into_dev_stdin_is_read(tmp_path: Path) -> None:
    # Before (3b44107): refused as "a FIFO (a pipe)"; `cat log | conclave audit --log
    # /dev/stdin` and `--log <(zcat log.gz)` had worked until then.
    saved = _saved_log(tmp_path)
    run = _audit_log(Path("/dev/stdin"), saved.read_bytes())
    _as_read_from_the_file(run, saved, Path("/dev/stdin"))


def test_a_pipe_that_never_ends_is_read_up_to_the_limit(tmp_path: Path) -> None:
    endless = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "conclave", "audit", "--group", "room", "--log", "/dev/stdin",
             "--max-log-mb", "1"],
            stdin=endless.stdout, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        endless.kill()
        endless.wait()
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        "conclave audit: the log file /dev/stdin is larger than 1 MiB: not read (a larger "
        "limit: --max-log-mb)\n"
    )


def test_a_fifo_given_as_the_log_is_read_once_its_writer_comes(tmp_path: Path) -> None:
    saved = _saved_log(tmp_path)
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"sleep 0.5; cat {saved} > {fifo}"])
    try:
        run = _audit_log(fifo)
    finally:
        writer.wait(60)
    _as_read_from_the_file(run, saved, fifo)


def test_ctrl_c_ends_the_wait_for_a_fifos_writer(tmp_path: Path) -> None:
    # Before: the open waited for good for a writer, and Ctrl-C could not stop it (the
    # loop's signal handler only ran once the open returned).
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave", "audit", "--group", "room", "--log", str(fifo)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)  # (any moment will do: waiting for the writer, or not there yet)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        (Path("/dev/null"), "a character device"),
        (Path("/dev/zero"), "a character device"),
        (Path("."), "a directory"),
    ],
)
def test_a_device_or_a_directory_given_as_the_log_is_refused(path: Path, kind: str) -> None:
    # Before: /dev/null read as an empty log, a failed audit (status 1).
    assert f"it is {kind}, not a file or a pipe" in _refused(path.resolve())
