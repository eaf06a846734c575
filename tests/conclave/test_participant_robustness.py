"""A participant under a failing network or a hostile delivery service or member: it keeps
rotating keys, keeps reading its push stream, keeps its saved state consistent, joins only the
group it asked for, and no member can stop the others from committing."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import pytest

from conclave import participant as participant_module
from conclave.errors import ConclaveError
from conclave.participant import KEY_PACKAGE_TARGET, Participant
from conclave.services import Services
from delivery_service.client import PushError, PushStream, WelcomeMessage
from delivery_service.errors import RequestFailed
from delivery_service.server import DeliveryService
from mls import Client, Group
from tests.conclave.conftest import WAIT, until


def saved_epoch(p: Participant) -> int:
    assert p.state_dir is not None
    saved = cbor2.loads((p.state_dir / f"{p.name}.state").read_bytes())
    return Group.from_bytes(saved["group"], p.client).epoch


# -- H1: periodic rotation survives any failure


async def test_periodic_rotation_goes_on_after_an_unexpected_failure(
    services: Services, tmp_path: Path
) -> None:
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state",
                        rotation_period=0.2)
    real_rotate = alice.rotate
    failures = 0

    async def flaky(**kw: Any) -> bool:
        nonlocal failures
        if failures < 2:  # a connection reset: neither ConclaveError nor RequestFailed
            failures += 1
            raise aiohttp.ServerDisconnectedError()
        return await real_rotate(**kw)

    alice.rotate = flaky  # type: ignore[method-assign]
    try:
        await alice.start()
        await alice.create("room")
        await until(lambda: failures == 2)
        start = alice.epoch or 0
        await until(lambda: (alice.epoch or 0) >= start + 2)  # rotating again
        assert any("rotation" in e and "disconnected" in e.lower() for e in alice.errors)
    finally:
        await alice.close()


# -- H2: a knock joins the room asked for, from a usable Welcome only


async def test_a_knock_joins_the_room_asked_for_not_the_first_welcome(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    carol = Participant("carol", services.ds_url, state_dir=state)
    bob = Participant("bob", services.ds_url, state_dir=state)
    people = [alice, carol]
    try:
        for p in (alice, carol, bob):
            await p.start()
        await alice.create("room-A")
        await carol.create("room-B")
        await bob.close()  # bob goes away ...
        await carol.invite(["bob"])  # ... and is invited to room-B meanwhile
        bob = Participant("bob", services.ds_url, state_dir=state)
        people.append(bob)
        await bob.start()  # room-B's Welcome is pushed again now
        # And a Welcome that is garbage, labelled for room-A, on top.
        bob._keep_welcome(WelcomeMessage(10**9, b"room-A", 1, b"\x00\x01 not a Welcome"))
        await bob.enter("room-A", knock=True)
        assert bob.group is not None and bob.group.group_id == b"room-A"
        assert bob.member_names == ["alice", "bob"]
        await until(lambda: alice.member_names == ["alice", "bob"])
        assert bob.safety_code == alice.safety_code
        # room-B's Welcome is kept for whoever wants it.
        await bob.wait_for_welcome(WAIT, group_id=b"room-B")
        assert bob.group.group_id == b"room-B"
    finally:
        for p in people:
            await p.close()


# -- H3: a poisoned Add proposal blocks no one


async def test_an_add_of_an_unregistrable_identity_blocks_no_commit(
    trio: list[Participant], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # This service refuses such a proposal (`_check_proposed_leaf`); one that does not (older,
    # or hostile) must not get the members stuck either.
    async def unchecked(self: DeliveryService, framed: Any) -> None:
        return None

    monkeypatch.setattr(DeliveryService, "_check_proposed_leaf", unchecked)
    alice, bob, mallory = trio  # carol plays mallory
    mallory.auto_commit = False
    assert mallory.group is not None
    evil = Client(b"\xff\xfe", 1).key_package()  # an identity that is not UTF-8
    async with mallory._lock:
        await mallory.ds.send(mallory.group.group_id, mallory.group.propose_add(evil))
    await bob.request_removal("carol")
    await until(lambda: alice.member_names == bob.member_names == ["alice", "bob"])
    assert alice.safety_code == bob.safety_code
    assert any("ignored an Add proposal" in e for e in alice.errors)


# -- H4: malformed push frames are dropped, and what they hid is fetched


def _tamper_bob(monkeypatch: pytest.MonkeyPatch, tamper: Callable[[bytes], bytes | None]) -> None:
    """Bob's push stream hands `tamper(frame)` on in place of each frame (None: the frame)."""
    real_open = PushStream._open

    class Tampered:
        def __init__(self, ws: Any) -> None:
            self.ws = ws

        def __getattr__(self, name: str) -> Any:
            return getattr(self.ws, name)

        def __aiter__(self) -> Tampered:
            return self

        async def __anext__(self) -> Any:
            msg = await self.ws.__anext__()
            if msg.type == aiohttp.WSMsgType.BINARY:
                changed = tamper(msg.data)
                if changed is not None:
                    msg = msg._replace(data=changed)
            return msg

    async def tampered_open(self: PushStream) -> None:
        await real_open(self)
        if self.client.identity == "bob":
            self._ws = Tampered(self._ws)  # type: ignore[assignment]

    monkeypatch.setattr(PushStream, "_open", tampered_open)


BAD_FRAMES: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "not CBOR": lambda frame: b"\xff\xff\xff",
    "not a map": lambda frame: cbor2.dumps(7),
    "missing fields": lambda frame: cbor2.dumps({"type": "message"}),
    "epoch as text": lambda frame: cbor2.dumps({**frame, "epoch": str(frame["epoch"])}),
    "seq as float": lambda frame: cbor2.dumps({**frame, "seq": frame["seq"] + 0.5}),
}


@pytest.mark.parametrize("bad", list(BAD_FRAMES))
async def test_a_malformed_push_frame_in_place_of_a_commit_is_caught_up(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    done = False

    def tamper(data: bytes) -> bytes | None:
        nonlocal done
        frame = cbor2.loads(data)
        if done or frame.get("type") != "message" or frame.get("kind") != "commit":
            return None
        done = True
        return BAD_FRAMES[bad](frame)

    _tamper_bob(monkeypatch, tamper)
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state")
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("room")
        await alice.invite(["bob"])
        await bob.wait_for_welcome(WAIT)
        await alice.rotate()  # its commit reaches bob malformed
        await alice.rotate()
        await until(lambda: done and bob.epoch == alice.epoch)
        assert bob.safety_code == alice.safety_code
        assert bob.stream is not None and bob.stream._task is not None
        assert not bob.stream._task.done()  # still reading
        assert any("push frame" in e for e in bob.errors)
    finally:
        await alice.close()
        await bob.close()  # does not raise
    assert saved_epoch(bob) == bob.epoch


async def test_a_failing_handler_does_not_stop_the_pump(trio: list[Participant]) -> None:
    alice, bob, _ = trio
    real_handle = bob._handle
    calls = 0

    async def broken(m: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        await real_handle(m)

    bob._handle = broken  # type: ignore[method-assign]
    await alice.rotate()  # bob fails on this one (he catches up by rejoining)
    await alice.rotate()
    await until(lambda: calls >= 2 and bob.epoch == alice.epoch
                and bob.safety_code == alice.safety_code)
    assert any("a bug" in e for e in bob.errors)


# -- M1: numbers from the service are checked; a commit's merge and install go together


async def test_a_bad_seq_in_a_commits_answer_leaves_the_state_consistent(
    trio: list[Participant],
) -> None:
    alice, bob, _ = trio
    real_request = bob.ds._request

    async def lying(method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        answer = await real_request(method, path, body, auth)
        if method == "POST" and path.endswith("/messages"):
            answer = {**answer, "seq": "x"}
        return answer

    bob.ds._request = lying  # type: ignore[method-assign]
    epoch = bob.epoch or 0
    # A yes bob cannot read says nothing of his commit: the log says it is in, and he merges it
    # (no resynchronisation, which would cost a Welcome it carried).
    assert await bob.rotate()
    bob.ds._request = real_request  # type: ignore[method-assign]
    assert bob.group is not None
    assert bob.keys.epoch == bob.group.epoch == saved_epoch(bob) == epoch + 1
    assert isinstance(bob.applied_seq, int)
    await until(lambda: bob.epoch == alice.epoch and bob.safety_code == alice.safety_code)
    assert bob.resyncs == 0


# -- M2: a KeyPackage count from the service cannot make the client generate without end


async def test_a_negative_key_package_count_makes_no_more_than_the_target(
    services: Services, tmp_path: Path
) -> None:
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")
    try:
        await bob.start()
        before = len(bob.client.key_package_refs())

        async def negative() -> int:
            return -50

        bob.ds.key_package_count = negative  # type: ignore[method-assign]
        await bob.top_up_key_packages()
        assert len(bob.client.key_package_refs()) - before <= KEY_PACKAGE_TARGET
    finally:
        await bob.close()


# -- M3: a lost Welcome is posted again; a knock already let in rejoins


async def test_a_welcome_that_fails_to_post_is_posted_again(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(participant_module, "WELCOME_RETRY_FIRST", 0.05, raising=False)
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state")
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")
    real_send_welcome = alice.ds.send_welcome
    failures = 0

    async def flaky(group_id: bytes, welcome: bytes) -> int:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise aiohttp.ServerDisconnectedError()
        return await real_send_welcome(group_id, welcome)

    alice.ds.send_welcome = flaky  # type: ignore[method-assign]
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("room")
        assert await bob.knock("room", timeout=WAIT) == "was let into"
        assert failures == 2
        assert bob.member_names == ["alice", "bob"]
        await until(lambda: alice.safety_code == bob.safety_code)
    finally:
        await alice.close()
        await bob.close()


@pytest.mark.parametrize(("failure", "again"), [
    (RequestFailed(503, "unavailable", "restarting"), True),
    (RequestFailed(429, "too_many_requests", "slow down"), True),
    (RequestFailed(409, "conflict", "the group is too busy: retry shortly"), True),
    (aiohttp.ServerDisconnectedError(), True),
    (RequestFailed(409, "not_added", "no commit of this group added KeyPackageRef 00"), False),
    (RequestFailed(403, "forbidden", "not yours"), False),
    (RequestFailed(400, "bad_request", "malformed"), False),
])
def test_which_welcome_failures_are_worth_another_try(failure: Exception, again: bool) -> None:
    # Our commit is in when its Welcome is posted: "not added" will not change later.
    assert participant_module._worth_retrying(failure) is again


async def test_a_knock_let_in_without_a_welcome_rejoins_on_the_next_knock(
    services: Services, tmp_path: Path
) -> None:
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state")
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")

    async def lost(group_id: bytes, welcome: bytes) -> int:
        raise RequestFailed(400, "bad_request", "lost for good")

    alice.ds.send_welcome = lost  # type: ignore[method-assign]
    try:
        for p in (alice, bob):
            await p.start()
        await alice.create("room")
        knocking = asyncio.ensure_future(bob.knock("room", timeout=3600))
        await until(lambda: alice.member_names == ["alice", "bob"])  # added, no Welcome
        knocking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await knocking
        assert await bob.enter("room", knock=True) == "rejoined"
        assert bob.member_names == ["alice", "bob"]  # the same leaf taken back, no second
        await until(lambda: alice.epoch == bob.epoch and alice.safety_code == bob.safety_code)
        assert alice.member_names == ["alice", "bob"]
    finally:
        await alice.close()
        await bob.close()


# -- M4: the state is saved crash-safely, and one process runs an identity at a time


async def test_the_state_is_synced_and_private_whatever_was_left_behind(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # Another's leftover temp file, readable by all, where an older save wrote its own.
    leftover = state / "alice.tmp"
    leftover.write_bytes(b"")
    leftover.chmod(0o644)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_IFMT(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    alice = Participant("alice", services.ds_url, state_dir=state)
    try:
        await alice.start()
        await alice.create("room")
    finally:
        await alice.close()
    assert stat.S_IMODE((state / "alice.state").stat().st_mode) == 0o600
    assert stat.S_IFREG in synced and stat.S_IFDIR in synced  # the file, then its rename
    assert not [f for f in os.listdir(state) if f.endswith(".tmp") and f != "alice.tmp"]


async def test_a_second_process_of_one_identity_is_refused(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    alice = Participant("alice", services.ds_url, state_dir=state)
    await alice.start()
    try:
        await alice.create("room")
        saved = (state / "alice.state").read_bytes()
        again = Participant("alice", services.ds_url, state_dir=state)
        with pytest.raises(ConclaveError, match="alice is running already") as info:
            await again.start()
        assert "\n" not in str(info.value)
        await again.close()
        assert (state / "alice.state").read_bytes() == saved  # untouched by the second
    finally:
        await alice.close()
    after = Participant("alice", services.ds_url, state_dir=state)  # once the first is gone
    try:
        await after.start()
        assert after.epoch == alice.epoch
    finally:
        await after.close()


# -- bounded memory under a hostile service


async def test_errors_and_kept_welcomes_are_bounded(services: Services, tmp_path: Path) -> None:
    bob = Participant("bob", services.ds_url, state_dir=tmp_path / "state")
    try:
        await bob.start()
        assert bob.stream is not None
        n = 1000
        for i in range(1, n + 1):  # as if the service pushed them
            bob.stream._events.put_nowait(PushError("flood", f"error {i}", None))
            bob.stream._events.put_nowait(WelcomeMessage(10**6 + i, b"g", i, b"w"))
        await until(lambda: any(e.endswith(f"error {n}") for e in bob.errors))
        assert len(bob.errors) <= participant_module.MAX_ERRORS
        assert len(bob._welcomes) <= participant_module.MAX_KEPT_WELCOMES
    finally:
        await bob.close()


# -- `conclave demo` stopped by SIGTERM cleans up


def test_the_demo_stopped_by_sigterm_leaves_no_temporary_directory(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave.cli", "demo", "--no-live"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not any(tmp_path.glob("conclave-demo-*")):  # the demo is under way
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not any(tmp_path.glob("conclave-demo-*"))


async def test_a_restarted_member_refuses_frames_it_received_before_the_restart(
    trio: list[Participant], services: Services, tmp_path: Path
) -> None:
    # The replay windows are not saved: the saved epoch's keys must be gone by the time the
    # restarted member calls in, or an SFU that kept its frames could play them to it again.
    from conclave.media import MediaSpec
    from e2ee_media.errors import SFrameError

    alice, bob, _ = trio
    toc = b"\x78"
    frames = [toc + alice.keys.encrypt(toc, b"opus %d" % i) for i in range(20)]
    for frame in frames:
        bob.keys.decrypt(frame[:1], frame[1:])
    saved = bob.epoch
    await bob.close()
    again = Participant("bob", services.ds_url, services.sfu_url, state_dir=tmp_path / "state",
                        media=MediaSpec(audio=False))
    try:
        await again.start()
        assert await again.enter("room") == "rejoined"
        await again.connect_media()
        assert again.epoch is not None and saved is not None and again.epoch > saved
        assert saved not in again.keys.retained_epochs
        for frame in frames:
            with pytest.raises(SFrameError):
                again.keys.decrypt(frame[:1], frame[1:])
    finally:
        await again.close()


def test_a_file_where_the_state_directory_should_be_is_named_as_such(tmp_path: Path) -> None:
    # Before: "cannot save the state to .../x/alice.state: File exists", as if all were well.
    blocker = tmp_path / "x"
    blocker.write_text("")
    p = Participant("alice", "http://127.0.0.1:9", state_dir=blocker)
    with pytest.raises(ConclaveError, match=r"x/alice\.state: Not a directory$"):
        p._lock_state()
    with pytest.raises(ConclaveError, match=r"x/alice\.state: Not a directory$"):
        p.save()
    assert blocker.read_text() == ""


async def test_opening_the_media_for_a_call_in_leaves_the_loop_running(
    trio: list[Participant], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: `connect_media` opened the media on the loop: a device or stream that takes
    # seconds to open (or never does) stalled the group's messages too, at each call-in again.
    alice = trio[0]
    alice.sfu_url = "http://127.0.0.1:9/v1/signal"  # never reached: the open fails first
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    def slow_open(self: Participant) -> list[Any]:
        start = ticks
        time.sleep(0.5)
        seen.append(ticks - start)
        raise ConclaveError("cannot play the device")

    monkeypatch.setattr(Participant, "open_media", slow_open)
    running = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(ConclaveError, match="cannot play the device"):
            await alice.connect_media()
    finally:
        running.cancel()
    assert seen and seen[0] >= 10  # about 50 ticks of 10 ms while it opened
