"""Participant behaviour through the real delivery service, without media."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from typing import Any

import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from conclave.errors import ConclaveError, NotInGroup
from conclave.media import MediaSpec
from conclave.participant import KEY_PACKAGE_TARGET, STREAM_CONTEXT, Participant
from conclave.services import Services
from delivery_service.errors import StaleEpochRejected
from e2ee_media.codecs import OPUS
from e2ee_media.context import SendKeyContext
from e2ee_media.errors import UnknownKeyId, WrongSender
from e2ee_media.header import MAX_VALUE
from e2ee_media.transform import FrameEncryptor
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
    # the directory too: its file names say who calls (umask 022 would make it 0755)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # and the service's database, which `Services` opens once before the storage does
    assert stat.S_IMODE((tmp_path / "ds.sqlite3").stat().st_mode) == 0o600
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
        with pytest.raises(ConclaveError, match="in the call of room 'one'") as refused:
            await again.enter("two")
        # what it advises must work: a new state directory alone would be a new key for erin,
        # which the service refuses
        assert "use another name for 'two'" in str(refused.value)
        assert "state" not in str(refused.value).split("at a time;")[1]
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


async def test_a_member_removed_by_a_commit_drops_its_keys_without_the_services_word(
    trio: list[Participant],
) -> None:
    from e2ee_media.errors import KeyScheduleError

    alice, _, carol = trio
    # The delivery service is not trusted: it may withhold its "removed" push. Carol's push
    # stream is stopped, and she processes the log herself, as after a reconnection.
    pump = next(t for t in carol._tasks if t.get_coro().__name__ == "_pump")  # type: ignore[union-attr]
    pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pump
    assert carol.keys.send_kid() is not None
    assert await alice.remove(["carol"])
    for m in await alice.ds.messages(alice.group_id, after=carol.applied_seq):
        async with carol._lock:
            await carol._handle(m)
    assert carol.removed
    with pytest.raises(KeyScheduleError):  # nothing more is sent under the group's keys
        carol.keys.encrypt(b"", b"frame")
    await asyncio.sleep(carol.keys.grace_period + 0.2)
    assert carol.keys._epochs == {} and carol.keys.sframe.recv_keys == {}


class _Ended(MediaStreamTrack):
    kind = "audio"

    async def recv(self) -> Any:
        raise MediaStreamError


async def test_a_member_cannot_silence_another_with_a_frame_under_its_kid(
    trio: list[Participant],
) -> None:
    # Carol derives alice's key (every member can) and sends one frame under alice's KID with
    # the highest CTR, on her own track. Bob keeps one replay window per KID: were it opened,
    # every genuine frame of alice would be "too old" for the rest of the epoch.
    alice, bob, carol = trio
    pc = RTCPeerConnection()
    try:
        for publisher in ("alice", "carol"):
            info = {"identity": publisher, "kind": "audio"}
            bob._on_track(_Ended(), pc.addTransceiver("audio"), info)
        alice_track, carol_track = bob.remote[("alice", "audio")], bob.remote[("carol", "audio")]
        toc = b"\x78"
        alice_enc = FrameEncryptor(alice.keys, OPUS, context=STREAM_CONTEXT["audio"])
        assert alice_track.decryptor.decrypt_frame(
            alice_enc.encrypt_frame(toc + b"hello"), OPUS
        ) == toc + b"hello"
        assert carol.keys.current is not None
        forger = SendKeyContext(carol.keys.params, alice.keys.send_kid(0),
                                carol.keys.current.base_key)
        forger.next_counter = MAX_VALUE
        forged = toc + forger.encrypt(toc, b"carol speaking as alice")
        with pytest.raises(WrongSender, match="'alice'.*track of 'carol'"):
            carol_track.decryptor.decrypt_frame(forged, OPUS)
        assert carol_track.stats.as_dict()["failed_wrong_sender"] == 1
        for _ in range(20):
            alice_track.decryptor.decrypt_frame(alice_enc.encrypt_frame(toc + b"more"), OPUS)
        assert alice_track.stats.frames_decrypted == 21 and not alice_track.stats.failures
        # and alice's genuine frames are refused on carol's track, carol's own ones open
        with pytest.raises(WrongSender):
            carol_track.decryptor.decrypt_frame(alice_enc.encrypt_frame(toc + b"x"), OPUS)
        carol_enc = FrameEncryptor(carol.keys, OPUS, context=STREAM_CONTEXT["audio"])
        assert carol_track.decryptor.decrypt_frame(carol_enc.encrypt_frame(toc + b"hi"), OPUS)
    finally:
        await pc.close()


async def test_members_derive_keys_only_for_the_stream_contexts_in_use(
    trio: list[Participant],
) -> None:
    alice, bob, carol = trio
    keys = carol.keys
    assert keys.current is not None
    kid = keys.kid(alice.keys.leaf_index or 0, keys.current.epoch, keys.current.index_bits,
                   max(STREAM_CONTEXT.values()) + 1)
    frame = SendKeyContext(keys.params, kid, keys.current.base_key).encrypt(b"", b"")
    with pytest.raises(UnknownKeyId):  # an authentic frame, under a context no one uses
        bob.keys.decrypt(b"", frame)
    assert kid not in bob.keys.sframe.recv_keys


async def test_a_frame_held_for_the_next_epoch_reaches_the_decoder_when_its_commit_does(
    trio: list[Participant],
) -> None:
    """A publisher that falls silent right after a rotation (muted): its last frame, held by a
    member that has not processed the commit yet, is decrypted when the commit arrives, not
    when (if ever) the track's next frame comes."""
    import threading

    from aiortc.jitterbuffer import JitterFrame
    from aiortc.rtcrtpparameters import RTCRtpCodecParameters

    import conclave.participant as participant_module
    from e2ee_media.aiortc_hooks import _DecryptingQueue
    from e2ee_media.transform import FrameDecryptor

    alice, bob, _ = trio
    keys = participant_module._PublisherKeys(bob.keys, "alice", bob._names_by_epoch)
    decryptor = FrameDecryptor(keys, holdback=60.0)
    decoder_queue = _DecryptingQueue(decryptor, threading.Event())
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, payloadType=111)
    toc = b"\x78"
    async with bob._lock:  # bob applies no commit meanwhile
        assert await alice.rotate()
        frame = toc + alice.keys.encrypt(toc, b"said, then muted")
        decoder_queue.put((opus, JitterFrame(frame, 0)))
        assert decryptor.waiting == 1 and decoder_queue.empty()
    async with asyncio.timeout(10):
        while decoder_queue.empty():
            await asyncio.sleep(0.01)
    assert bob.epoch == alice.epoch
    assert bytes(decoder_queue.get_nowait()[1].data) == toc + b"said, then muted"
    assert decryptor.waiting == 0 and not decryptor.stats.failures
    decoder_queue.put(None)


async def _invited_while_away(
    services: Services, tmp_path: Path
) -> tuple[Participant, Participant]:
    """alice in a room of her own, who invited bob while he was away; bob started again."""
    alice = Participant("alice", services.ds_url, state_dir=tmp_path)
    bob = Participant("bob", services.ds_url, state_dir=tmp_path)
    await alice.start()
    await bob.start()  # registered, with KeyPackages
    await bob.close()
    await alice.create("room")
    assert await alice.invite(["bob"])
    bob = Participant("bob", services.ds_url, state_dir=tmp_path)
    await bob.start()
    return alice, bob


async def test_an_invitee_that_was_away_joins_from_its_welcome(
    services: Services, tmp_path: Path
) -> None:
    """Invited while away (as `invite` in a call does), bob's next `enter` uses the Welcome:
    he is in the epoch that added him, with no commit of his own."""
    alice, bob = await _invited_while_away(services, tmp_path)
    try:
        epoch = alice.epoch
        assert await bob.enter("room") == "was let into"
        assert bob.epoch == alice.epoch == epoch
        assert bob.safety_code == alice.safety_code and not bob.removed
    finally:
        await alice.close()
        await bob.close()


async def test_a_welcome_whose_leaf_was_replaced_since_is_not_used(
    services: Services, tmp_path: Path
) -> None:
    """bob was invited while away, then took his leaf back by external commit, then lost his
    saved group: the old Welcome would put him in an old epoch, and catching up would end in
    the removal of its leaf. He joins by external commit instead, and stays a member."""
    alice, bob = await _invited_while_away(services, tmp_path)
    try:
        await bob.join("room")  # his leaf replaced: the Welcome's leaf is gone
        bob.group = None  # the saved group lost (his identity's keys kept)
        bob.save()
        await bob.close()
        bob = Participant("bob", services.ds_url, state_dir=tmp_path)
        await bob.start()
        assert await bob.enter("room") == "joined"
        await asyncio.wait_for(_until(lambda: alice.epoch == bob.epoch), 5)
        await asyncio.sleep(0.2)  # had he joined from the old Welcome, he would be out now
        assert not bob.removed and alice.member_names == ["alice", "bob"]
        assert bob.safety_code == alice.safety_code
    finally:
        await alice.close()
        await bob.close()


async def test_an_invite_cancelled_after_the_service_took_its_commit_still_lets_them_in(
    trio: list[Participant], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gives up (Ctrl-C) while the service's answer to the commit is on its way:
    the commit is in, so it is merged and its Welcome posted all the same."""
    alice, bob, _ = trio
    dave = Participant("dave", alice.ds_url, state_dir=alice.state_dir)
    await dave.start()
    try:
        real_send = alice.ds.send
        taken = asyncio.Event()

        async def slow_answer(*args: Any, **kwargs: Any) -> Any:
            answer = await real_send(*args, **kwargs)
            taken.set()
            await asyncio.sleep(0.3)  # the answer is on its way
            return answer

        monkeypatch.setattr(alice.ds, "send", slow_answer)
        inviting = asyncio.ensure_future(alice.invite(["dave"]))
        await asyncio.wait_for(taken.wait(), 5)
        inviting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await inviting
        await dave.wait_for_welcome(5)
        await asyncio.wait_for(_until(lambda: alice.epoch == bob.epoch == dave.epoch), 5)
        assert "dave" in alice.member_names and alice.safety_code == dave.safety_code
        assert not alice.errors and alice.resyncs == 0
    finally:
        await dave.close()


async def test_a_leaf_with_a_members_name_and_another_key_is_refused(
    trio: list[Participant],
) -> None:
    """RFC 9420 §5.3.1: the service registers a name with one key, so only a dishonest one
    could pass on an external commit under bob's name with another key: members refuse it, and
    their group is as it was. Nor may a KeyPackage leaf live longer than MAX_LEAF_LIFETIME."""
    from mls import Client, Group
    from mls.client import _CLOCK_SKEW, MAX_LEAF_LIFETIME
    from mls.framing import MLSMessage

    alice, _, carol = trio
    assert alice.group is not None
    epoch, members = alice.epoch, alice.member_names
    _, commit = Group.join_external(Client(b"bob"), alice.group.group_info())
    with pytest.raises(MLSError, match="credential"):
        alice.group.process(commit)
    assert (alice.epoch, alice.member_names) == (epoch, members)
    long_lived = MLSMessage.decode(
        Client(b"dave").key_package(lifetime=MAX_LEAF_LIFETIME - _CLOCK_SKEW + 1)
    ).body
    with pytest.raises(MLSError, match="lifetime"):
        carol.group.add([long_lived])  # type: ignore[union-attr, list-item]
    assert (carol.epoch, carol.member_names) == (epoch, members)


async def test_a_commit_given_up_before_it_started_is_not_made(trio: list[Participant]) -> None:
    """Cancelled while it waits for the participant's lock (nothing sent yet), a removal is
    dropped, not made later when the lock is free."""
    alice, bob, _ = trio
    epoch = alice.epoch
    async with alice._lock:
        removing = asyncio.ensure_future(alice.remove(["bob"]))
        await asyncio.sleep(0.05)
        removing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await removing
    await asyncio.sleep(0.3)  # had it been made, it would be in by now
    assert alice.epoch == epoch and "bob" in alice.member_names and not bob.removed


@pytest.mark.parametrize("added_back", [True, False])
async def test_a_member_removed_while_away_learns_it_on_entering(
    trio: list[Participant], added_back: bool
) -> None:
    """carol quits (staying a member, her group saved); alice removes her, and perhaps adds her
    back. carol's next `enter` does not resume the group she is out of: she joins from the
    Welcome, or is told that a member must add her again."""
    alice, _, carol = trio
    await carol.close()
    assert await alice.remove(["carol"])
    if added_back:
        assert await alice.invite(["carol"])
    carol = Participant("carol", alice.ds_url, state_dir=alice.state_dir)
    trio[2] = carol  # closed by the fixture
    await carol.start()
    if added_back:
        assert await carol.enter("room") == "was let into"
        assert carol.epoch == alice.epoch and not carol.removed
        assert carol.safety_code == alice.safety_code
    else:
        with pytest.raises(NotInGroup, match="removed from this group; a member must add you"):
            await carol.enter("room")
        assert carol.removed and alice.member_names == ["alice", "bob"]
