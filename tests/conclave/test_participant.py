"""Participant behaviour through the real delivery service, without media."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from conclave.errors import ConclaveError, NotInGroup
from conclave.media import MediaSpec
from conclave.participant import KEY_PACKAGE_TARGET, Participant
from conclave.services import Services
from delivery_service.errors import StaleEpochRejected
from mls import MLSError


async def test_invited_members_share_the_epoch(trio: list[Participant]) -> None:
    alice, bob, carol = trio
    assert bob.epoch == carol.epoch == alice.epoch
    assert bob.member_names == ["alice", "bob", "carol"]
    assert len({p.safety_code for p in trio}) == 1


async def test_key_packages_are_topped_up_after_an_invitation(trio: list[Participant]) -> None:
    # alice claimed one KeyPackage each of bob and carol; joining replaced it.
    for p in trio[1:]:
        assert await p.ds.key_package_count() == KEY_PACKAGE_TARGET


async def test_a_member_that_cannot_process_a_commit_rejoins(trio: list[Participant]) -> None:
    alice, bob, carol = trio
    assert carol.group is not None
    real_process = carol.group.process
    calls = 0

    def broken(message: bytes):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise MLSError("simulated corruption of carol's state")
        return real_process(message)

    carol.group.process = broken  # type: ignore[method-assign]
    await alice.rotate()
    await asyncio.wait_for(_until(lambda: carol.resyncs == 1 and carol.epoch == alice.epoch
                                  == bob.epoch and alice.epoch is not None and
                                  alice.epoch >= 3), 10)
    assert carol.safety_code == alice.safety_code == bob.safety_code
    assert alice.member_names == ["alice", "bob", "carol"]  # the old leaf went, one carol left
    assert carol.errors == []


async def test_state_is_private_and_identity_is_kept(
    trio: list[Participant], services: Services, tmp_path: Path
) -> None:
    alice = trio[0]
    path = tmp_path / "state" / "alice.state"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A second "alice" with other keys is refused by the service.
    impostor = Participant("alice", services.ds_url, state_dir=tmp_path / "elsewhere")
    with pytest.raises(ConclaveError, match="refused to register"):
        await impostor.start()
    await impostor.close()
    assert alice.epoch is not None


async def test_bad_requests_say_what_is_wrong(trio: list[Participant]) -> None:
    alice = trio[0]
    with pytest.raises(ConclaveError, match="cannot invite 'nobody'"):
        await alice.invite(["nobody"])
    with pytest.raises(ConclaveError, match="not a member"):
        await alice.request_removal("nobody")


async def test_joining_a_missing_room_is_a_clear_error(services: Services) -> None:
    p = Participant("zoe", services.ds_url)
    await p.start()
    try:
        with pytest.raises(ConclaveError, match="cannot join room 'nowhere'"):
            await p.join("nowhere")
    finally:
        await p.close()


async def _until(predicate, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    while not predicate():
        await asyncio.sleep(interval)


async def test_a_join_request_is_committed_by_a_member(
    trio: list[Participant], services: Services, tmp_path: Path
) -> None:
    alice, bob, carol = trio
    dave = Participant("dave", services.ds_url, state_dir=tmp_path / "state")
    await dave.start()
    try:
        await dave.knock("room", timeout=10)
        await asyncio.wait_for(_until(lambda: alice.epoch == bob.epoch == carol.epoch
                                      == dave.epoch), 5)
        assert dave.member_names == ["alice", "bob", "carol", "dave"]
        assert dave.safety_code == alice.safety_code
    finally:
        await dave.close()


async def test_a_restarted_participant_returns_to_its_own_room_only(
    services: Services, tmp_path: Path
) -> None:
    erin = Participant("erin", services.ds_url, state_dir=tmp_path)
    await erin.start()
    assert await erin.enter("one") == "created"
    await erin.close()
    again = Participant("erin", services.ds_url, state_dir=tmp_path)
    await again.start()
    try:
        with pytest.raises(ConclaveError, match="in the call of room 'one'"):
            await again.enter("two")
        assert await again.enter("one") == "rejoined"
        assert again.group_id == b"one"
    finally:
        await again.close()


async def test_a_removal_request_that_loses_a_race_is_sent_again(trio: list[Participant]) -> None:
    alice, bob, carol = trio
    real_send = carol.ds.send
    raced = False
    refused: list[Exception] = []

    async def send_after_a_rotation(group_id: bytes, message: bytes, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal raced
        if raced:
            return await real_send(group_id, message, **kwargs)
        raced = True
        await alice.rotate()  # alice's commit lands first: carol's proposal is for a stale epoch
        try:
            return await real_send(group_id, message, **kwargs)
        except StaleEpochRejected as exc:
            refused.append(exc)
            raise

    carol.ds.send = send_after_a_rotation  # type: ignore[method-assign]
    epoch = alice.epoch or 0
    assert await carol.request_removal("bob")
    await asyncio.wait_for(_until(lambda: bob.removed and alice.member_names == ["alice", "carol"]
                                  and carol.member_names == ["alice", "carol"]), 10)
    assert len(refused) == 1  # refused as stale once, then sent again in the new epoch
    assert (alice.epoch or 0) >= epoch + 2  # the rotation, then the removal


async def test_a_removed_member_cannot_come_back_until_added_again(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio
    assert await alice.remove(["carol"])
    await asyncio.wait_for(_until(lambda: carol.removed), 5)
    for attempt in (carol.join, carol.knock, carol.enter):
        with pytest.raises(NotInGroup, match="removed from this group; a member must add you"):
            await attempt("room")
    assert alice.member_names == ["alice", "bob"]
    # A member adds her again: she is in, and no longer marked removed.
    assert await bob.invite(["carol"])
    await carol.wait_for_welcome(5)
    await asyncio.wait_for(_until(lambda: alice.epoch == bob.epoch == carol.epoch), 5)
    assert not carol.removed and carol.member_names == ["alice", "bob", "carol"]
    assert carol.safety_code == alice.safety_code


async def test_a_member_who_left_may_join_again(trio: list[Participant]) -> None:
    alice, bob, carol = trio
    await carol.leave()  # a Remove proposal of her own leaf: alice or bob commits it
    await asyncio.wait_for(_until(lambda: carol.removed and alice.member_names
                                  == ["alice", "bob"]), 5)
    assert await carol.enter("room") == "joined"
    await asyncio.wait_for(_until(lambda: alice.epoch == bob.epoch == carol.epoch), 5)
    assert not carol.removed and alice.member_names == ["alice", "bob", "carol"]
    assert carol.safety_code == alice.safety_code


async def test_a_restarted_member_sends_nothing_before_a_fresh_epoch(
    trio: list[Participant], services: Services, tmp_path: Path
) -> None:
    # Its SFrame counters start from 0 again in a new process: in the saved epoch, under the
    # same keys, its first frames would repeat the nonces of frames sent before (RFC 9605 §9.1).
    alice, bob, _ = trio
    await bob.close()
    saved_epoch = bob.epoch
    again = Participant("bob", services.ds_url, services.sfu_url, state_dir=tmp_path / "state",
                        media=MediaSpec(audio=False))
    try:
        await again.start()
        assert await again.enter("room") == "rejoined" and again.epoch == saved_epoch
        await again.connect_media()
        assert again.epoch == saved_epoch + 1  # a commit of its own, before any frame
        await alice.wait_epoch(again.epoch)
        assert again.keys.send_kid() != bob.keys.send_kid()
    finally:
        await again.close()


async def test_old_epoch_keys_go_when_their_grace_ends_even_without_frames(
    trio: list[Participant],
) -> None:
    alice, bob, _ = trio
    assert await alice.rotate()
    await bob.wait_epoch(alice.epoch or 0)
    assert len(bob.keys._epochs) == 2  # the old one, for frames in flight
    await asyncio.sleep(bob.keys.grace_period + 0.2)  # no frame comes to make it look
    assert [k.epoch for k in bob.keys._epochs.values()] == [bob.epoch]


async def test_frames_are_credited_to_their_kids_sender_not_to_the_sfus_label(
    trio: list[Participant],
) -> None:
    from types import SimpleNamespace

    from conclave.participant import RemoteTrack
    from e2ee_media.transform import TrackStats

    alice, bob, _ = trio
    # The SFU says this track is carol's, but the frames' KIDs are alice's (the SFU cannot
    # change a KID: it selects the key that opens the frame).
    remote = RemoteTrack("carol", "audio", TrackStats(), SimpleNamespace(on_decrypted=None))
    bob._watch_epochs(remote)
    toc = b"\x78"
    frame = toc + alice.keys.encrypt(toc, b"opus payload")
    remote.decryptor.on_decrypted(frame, "audio/opus")
    assert remote.senders == {"alice"} and remote.mislabelled
    labelled = RemoteTrack("alice", "audio", TrackStats(), SimpleNamespace(on_decrypted=None))
    bob._watch_epochs(labelled)
    labelled.decryptor.on_decrypted(frame, "audio/opus")
    assert labelled.senders == {"alice"} and not labelled.mislabelled
