"""Review of the first-registration change (b29571d): the lock a refused first run removes, the
audit's registration race, and URL passwords in the errors that name a service."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest

import conclave.demo as demo
from conclave.errors import ConclaveError, ServiceUnavailable
from conclave.participant import Participant
from conclave.services import DEFAULT_AUDITOR, Services
from delivery_service.errors import RequestFailed
from tests.delivery_service.procs import free_port


async def test_a_lock_file_removed_by_its_holder_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refused first run removes <name>.lock while holding it (`_name_taken`). A second run
    # that opened the file just before, and locks it just after, holds a lock on a removed
    # file, which excludes no one: a third run of the name then ran beside it.
    lock = tmp_path / "alice.lock"
    holder = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    real_flock = fcntl.flock
    first = True

    def flock(fd: int, operation: int) -> None:
        nonlocal first
        if first:  # between the second run's open and its flock: the holder's refusal
            first = False
            lock.unlink()
            os.close(holder)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    ds = f"http://127.0.0.1:{free_port()}"
    second = Participant("alice", ds, state_dir=tmp_path)
    third = Participant("alice", ds, state_dir=tmp_path)
    try:
        second._lock_state()
        with pytest.raises(ConclaveError, match="alice is running already"):
            third._lock_state()
        assert lock.exists()  # the one the second run holds, where others look for it
    finally:
        second._unlock_state()
        third._unlock_state()
        await second.ds.close()
        await third.ds.close()


async def _registered_state(ds_url: str, state: Path, name: str) -> bytes:
    p = Participant(name, ds_url, state_dir=state)
    if name == DEFAULT_AUDITOR:
        # registered as a first audit registers it: an auditor joins no group (no KeyPackages)
        p.save()
        await p.ds.register()
        p._registered = True
        p.save()
        await p.ds.close()
    else:
        await p.start()
        await p.close()
    return (state / f"{name}.state").read_bytes()


async def test_an_audit_keeps_a_registered_state_that_appeared_as_it_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, two_services: tuple[Services, Services]
) -> None:
    # fetch_log judged "new" by the file's absence before it read the state: an auditor state
    # saved meanwhile by another audit (registered with the service it used) was deleted when
    # this service refused the name.
    one, two = two_services
    registered = await _registered_state(one.ds_url, tmp_path / "one", DEFAULT_AUDITOR)
    await _registered_state(two.ds_url, tmp_path / "two", DEFAULT_AUDITOR)  # another key
    home = tmp_path / "home"
    home.mkdir()

    def appearing(*args: Any, **kwargs: Any) -> Participant:
        # The other audit finishes between fetch_log's look and its read.
        (home / f"{DEFAULT_AUDITOR}.state").write_bytes(registered)
        return Participant(*args, **kwargs)

    monkeypatch.setattr(demo, "Participant", appearing)
    with pytest.raises(RequestFailed) as info:
        await demo.fetch_log(two.ds_url, b"\x01" * 32, home)
    assert info.value.code == "conflict"
    assert (home / f"{DEFAULT_AUDITOR}.state").read_bytes() == registered


async def test_a_password_in_ds_is_not_in_the_errors(tmp_path: Path, services: Services) -> None:
    down = f"127.0.0.1:{free_port()}"
    p = Participant("bob", f"http://ann:hunter2@{down}", state_dir=tmp_path / "b")
    with pytest.raises(ServiceUnavailable) as unreachable:
        await p.start()
    await p.close()
    assert "hunter2" not in str(unreachable.value)
    assert f"cannot reach the delivery service at http://ann:***@{down}: " in str(
        unreachable.value
    )
    # Refused as another key's name: that error names the service too.
    await _registered_state(services.ds_url, tmp_path / "home", "alice")
    host = services.ds_url.removeprefix("http://")
    taken = Participant("alice", f"http://ann:hunter2@{host}", state_dir=tmp_path / "new")
    with pytest.raises(ConclaveError) as refused:
        await taken.start()
    await taken.close()
    assert "hunter2" not in str(refused.value)
    assert f"the delivery service at http://ann:***@{host} refused" in str(refused.value)


async def test_a_password_in_sfu_is_not_in_the_errors(tmp_path: Path, services: Services) -> None:
    sfu = f"http://ann:hunter2@127.0.0.1:{free_port()}/v1/signal"  # nothing listens there
    p = Participant("carol", services.ds_url, sfu, state_dir=tmp_path)
    try:
        await p.start()
        await p.create("r")
        with pytest.raises(ServiceUnavailable) as info:
            await asyncio.wait_for(p.connect_media(), 30)
    finally:
        await p.close()
    assert "hunter2" not in str(info.value)
    assert "cannot reach the SFU at http://ann:***@127.0.0.1:" in str(info.value)
