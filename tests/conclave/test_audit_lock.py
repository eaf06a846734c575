"""`conclave audit --ds` as a name whose `conclave join` is running: refused, its state left be."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from conclave import demo
from conclave.cli import main
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import DEFAULT_AUDITOR


def _nothing_listening() -> str:
    # Never reached: the refusal comes before any request.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _running(state: Path, ds: str) -> Participant:
    """A participant holding its state's lock, as a running `conclave join` does."""
    running = Participant(DEFAULT_AUDITOR, ds, state_dir=state)
    running._lock_state()
    running.save()
    return running


def test_fetch_log_refuses_a_running_name_and_leaves_its_state(tmp_path: Path) -> None:
    ds = _nothing_listening()
    running = _running(tmp_path, ds)
    path = tmp_path / f"{DEFAULT_AUDITOR}.state"
    before = path.stat()
    try:
        with pytest.raises(ConclaveError, match="is running with the state directory"):
            asyncio.run(demo.fetch_log(ds, b"room", tmp_path))
        after = path.stat()
        # not saved over (a save replaces the file: another inode, another mtime)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    finally:
        running._unlock_state()


def test_audit_command_says_the_name_is_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _nothing_listening()
    running = _running(tmp_path, ds)
    try:
        assert main(["audit", "--group", "room", "--ds", ds, "--state", str(tmp_path)]) == 2
    finally:
        running._unlock_state()
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: {DEFAULT_AUDITOR} is running"), err
    assert "--as" in err and err.count("\n") == 1


def test_fetch_log_releases_the_lock_it_took(tmp_path: Path) -> None:
    ds = _nothing_listening()
    Participant(DEFAULT_AUDITOR, ds, state_dir=tmp_path).save()
    with pytest.raises(Exception):  # noqa: B017 - nothing listens: any network error
        asyncio.run(demo.fetch_log(ds, b"room", tmp_path))
    # a join under the name may start now
    after = Participant(DEFAULT_AUDITOR, ds, state_dir=tmp_path)
    after._lock_state()
    after._unlock_state()
