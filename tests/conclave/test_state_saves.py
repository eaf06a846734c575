"""A participant's state is written and fsynced off the event loop, which runs the call's media
meanwhile: in order (never an older snapshot over a newer one), on disk before what must follow
it (a registration, an upload, a post), the last one at close, and its errors reported."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace

import cbor2
import pytest

from conclave import participant as participant_module
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services
from conclave.threads import LatestOnly
from mls import Group

from .conftest import WAIT

NOWHERE = "http://127.0.0.1:9"  # never reached: the tests fake what the service answers


class Disk:
    """`replace_file` in place of the real one: records each write and the thread it ran in;
    off the loop's thread it can be held (`hold`) until `release`, as a slow fsync would."""

    def __init__(self, loop_thread: threading.Thread) -> None:
        self.loop_thread = loop_thread
        self.loop = asyncio.get_running_loop()
        self.writes: list[bytes] = []
        self.threads: list[threading.Thread] = []
        self.held = asyncio.Event()  # set (on the loop) when a held write has begun
        self._hold = False
        self._go = threading.Event()
        self.fail: OSError | None = None
        self.stuck = False  # a held write was never released: the loop waited for it
        self.real = participant_module.replace_file

    def hold(self) -> None:
        self._hold, self.held = True, asyncio.Event()
        self._go.clear()

    def release(self) -> None:
        self._hold = False
        self._go.set()

    def __call__(self, path: Path, data: bytes, *, keep_mode: bool = False) -> None:
        here = threading.current_thread()
        self.threads.append(here)
        if self._hold:
            self.loop.call_soon_threadsafe(self.held.set)
            if here is not self.loop_thread:  # (on the loop, waiting would hang the test)
                # (bounded: a loop blocked waiting for this write could not release it)
                if not self._go.wait(WAIT):
                    self.stuck = True
        if self.fail is not None:
            raise self.fail
        self.writes.append(data)
        self.real(path, data, keep_mode=keep_mode)


@pytest.fixture
async def disk(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Disk]:
    fake = Disk(threading.current_thread())
    monkeypatch.setattr(participant_module, "replace_file", fake)
    yield fake
    fake.release()  # never leave a writer thread waiting


def _saved(p: Participant) -> dict:
    assert p._state_path is not None
    return cbor2.loads(p._state_path.read_bytes())


def _seq(data: bytes) -> int:
    return cbor2.loads(data)["applied_seq"]


async def _loop_runs() -> bool:
    """Whether the loop still runs callbacks (it would not while blocked in a write)."""
    ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(ran.set)
    await asyncio.wait_for(ran.wait(), WAIT)
    return ran.is_set()


def _fake_register(p: Participant, calls: list[dict]) -> None:
    async def register() -> None:
        calls.append(_saved(p))  # what is on disk when the service hears of the key

    p.ds.register = register  # type: ignore[method-assign]


async def test_the_key_is_written_off_the_loop_and_on_disk_before_it_is_registered(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    calls: list[dict] = []
    _fake_register(p, calls)
    disk.hold()
    registering = asyncio.ensure_future(p.register())
    try:
        await asyncio.wait_for(disk.held.wait(), WAIT)
        assert disk.threads[-1] is not disk.loop_thread
        assert await _loop_runs()  # the write is under way, and the loop runs meanwhile
        assert calls == [] and not registering.done()  # not registered before it is on disk
        disk.release()
        await asyncio.wait_for(registering, WAIT)
    finally:
        disk.release()
        await p.close()
    assert calls and calls[0]["client"] == p.client.to_bytes()
    assert all(t is not disk.loop_thread for t in disk.threads)


async def test_saves_that_queue_up_write_the_newest_only_and_never_an_older_one_after_it(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    disk.hold()
    p.applied_seq = 1
    first = asyncio.ensure_future(p._save())
    await asyncio.wait_for(disk.held.wait(), WAIT)  # seq 1 being written
    assert disk.threads[-1] is not disk.loop_thread
    queued = []
    for seq in (2, 3, 4):  # each snapshot taken when its save is asked for
        p.applied_seq = seq
        queued.append(asyncio.ensure_future(p._save()))
        await asyncio.sleep(0)  # (the task's first step: the snapshot)
    p.applied_seq = 5  # after the last save: in none of them
    disk.release()
    await asyncio.wait_for(asyncio.gather(first, *queued), WAIT)
    assert [_seq(d) for d in disk.writes] == [1, 4]  # 2 and 3 were covered by 4
    assert _saved(p)["applied_seq"] == 4
    # A blocking save (tools, tests) after them is not overtaken by an older one either.
    p.save()
    assert _saved(p)["applied_seq"] == 5


async def test_a_commit_is_on_disk_when_it_is_posted(tmp_path: Path, disk: Disk) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    p.group = Group.create(p.client, b"room", **p._group_policy())
    posted: list[bool] = []

    async def send(group_id: bytes, commit: bytes, **kwargs: object) -> SimpleNamespace:
        saved = Group.from_bytes(_saved(p)["group"], p.client, **p._group_policy())
        posted.append(saved.has_pending_commit and saved.pending_commit.commit == commit)
        return SimpleNamespace(seq=1)

    async def publish_group_info(group_id: bytes, group_info: bytes) -> int:
        return 2

    p.ds.send = send  # type: ignore[method-assign]
    p.ds.publish_group_info = publish_group_info  # type: ignore[method-assign]
    try:
        assert await p.rotate()
        assert posted == [True]
        # and the new epoch is on disk once the commit is in
        assert Group.from_bytes(_saved(p)["group"], p.client).epoch == p.epoch == 1
        assert all(t is not disk.loop_thread for t in disk.threads)
    finally:
        await p.close()


async def test_close_writes_the_last_state_after_one_under_way_and_then_unlocks(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    p._lock_state()
    p.applied_seq = 1
    disk.hold()
    under_way = asyncio.ensure_future(p._save())
    await asyncio.wait_for(disk.held.wait(), WAIT)
    assert disk.threads[-1] is not disk.loop_thread
    p.applied_seq = 7  # in memory only, until close saves it
    closing = asyncio.ensure_future(p.close())
    assert await _loop_runs()
    assert not closing.done() and p._state_lock is not None  # locked while writing
    disk.release()
    await asyncio.wait_for(asyncio.gather(under_way, closing), WAIT)
    assert [_seq(d) for d in disk.writes] == [1, 7]
    assert _saved(p)["applied_seq"] == 7 and p._state_lock is None
    assert all(t is not disk.loop_thread for t in disk.threads)


async def test_close_cancelled_meanwhile_still_writes_the_last_state_before_unlocking(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    p._lock_state()
    p.applied_seq = 3
    disk.hold()
    at_unlock: list[int] = []
    unlock = p._unlock_state

    def unlock_state() -> None:
        at_unlock.append(_saved(p)["applied_seq"])  # what another run would read
        unlock()

    p._unlock_state = unlock_state  # type: ignore[method-assign]
    closing = asyncio.ensure_future(p.close())
    await asyncio.wait_for(disk.held.wait(), WAIT)
    assert disk.threads[-1] is not disk.loop_thread
    closing.cancel()  # a close cut short (its waiter gone) while the last state is written
    disk.release()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert at_unlock == [3] and p._state_lock is None


def test_a_job_handed_over_runs_in_a_thread_the_process_waits_for() -> None:
    where: list[threading.Thread] = []
    writer = LatestOnly("save")
    writer.run(lambda: where.append(threading.current_thread()))
    assert where[0] is not threading.current_thread() and not where[0].daemon


async def test_a_full_disk_stops_the_registration_with_the_reason(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    calls: list[dict] = []
    _fake_register(p, calls)
    disk.fail = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ConclaveError, match=r"cannot save the state to .*alice\.state: No space"):
        await p.register()
    assert calls == []  # not registered: the key is not on disk
    p._unlock_state()
    await p.ds.close()


async def test_a_commit_that_cannot_be_saved_is_posted_all_the_same_and_noted(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    p.group = Group.create(p.client, b"room", **p._group_policy())
    posted: list[bytes] = []

    async def send(group_id: bytes, commit: bytes, **kwargs: object) -> SimpleNamespace:
        posted.append(commit)
        disk.fail = None  # the new epoch can be saved
        return SimpleNamespace(seq=1)

    async def publish_group_info(group_id: bytes, group_info: bytes) -> int:
        return 2

    p.ds.send = send  # type: ignore[method-assign]
    p.ds.publish_group_info = publish_group_info  # type: ignore[method-assign]
    disk.fail = OSError(errno.ENOSPC, "No space left on device")
    try:
        assert await p.rotate()
        assert len(posted) == 1 and p.epoch == 1
        assert any("could not save the commit before posting it" in e and "No space" in e
                   for e in p.errors)
    finally:
        await p.close()


async def test_a_new_epoch_that_cannot_be_saved_fails_the_invite_but_its_welcome_goes(
    services: Services, tmp_path: Path, disk: Disk
) -> None:
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state")
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("room")
        fail_after_post: Callable[..., object] = alice.ds.send

        async def send(*args: object, **kwargs: object) -> object:
            accepted = await fail_after_post(*args, **kwargs)  # type: ignore[misc]
            disk.fail = OSError(errno.ENOSPC, "No space left on device")
            return accepted

        alice.ds.send = send  # type: ignore[method-assign]
        with pytest.raises(ConclaveError, match="No space left"):
            await alice.invite(["bob"])
        disk.fail = None
        await bob.wait_for_welcome(WAIT)  # the commit is in: bob was welcomed all the same
        assert bob.member_names == ["alice", "bob"]
    finally:
        disk.fail = None
        await alice.close()
        await bob.close()


async def test_a_welcome_posted_is_saved_as_settled_off_the_loop(
    tmp_path: Path, disk: Disk
) -> None:
    p = Participant("alice", NOWHERE, state_dir=tmp_path)
    owed = p._owe_welcome(b"room", b"welcome", seq=1, epoch=1)
    p.save()
    assert len(_saved(p)["owed_welcomes"]) == 1

    async def send_welcome(group_id: bytes, welcome: bytes) -> int:
        return 1

    p.ds.send_welcome = send_welcome  # type: ignore[method-assign]
    disk.hold()
    sending = asyncio.ensure_future(p._send_welcome(owed))
    try:
        await asyncio.wait_for(disk.held.wait(), WAIT)
        assert disk.threads[-1] is not disk.loop_thread
        released = asyncio.get_running_loop().call_soon(disk.release)
        assert await _loop_runs() and not released.cancelled()  # not blocked by the write
        await asyncio.wait_for(sending, WAIT)
        assert _saved(p)["owed_welcomes"] == [] and not disk.stuck
    finally:
        disk.release()
        await p.close()
