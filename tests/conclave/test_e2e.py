"""End to end, on loopback: the real delivery service (SQLite) and SFU, four participants.

One scenario runs once for the module (it is the expensive part) and records what happened;
each test then asserts one property of it.
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpTransceiver

from conclave.audit import LogEntry, audit, save_log
from conclave.cli import main
from conclave.demo import create_and_invite, fetch_log, until
from conclave.media import MediaSpec
from conclave.participant import Participant
from conclave.services import Services
from e2ee_media.codecs import OPUS, clear_prefix_length
from e2ee_media.context import RecvKeyContext, SendKeyContext, SFrameContext
from e2ee_media.errors import SFrameError
from e2ee_media.header import decode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameDecryptor
from mls import Client, Group

ROOM = "e2e-call"
PHASE = 2.0  # seconds of media between steps
NEEDLE = 16  # bytes of plaintext looked for in what the SFU forwarded


@dataclass
class SentFrame:
    kind: str
    epoch: int
    plaintext: bytes
    ciphertext: bytes


class TapParticipant(Participant):
    """Records its plaintext and ciphertext frames and the RTP payloads it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[SentFrame] = []
        self.rtp: list[tuple[str, str, bytes]] = []  # (publisher, kind, payload)

    async def connect_media(self) -> None:
        await super().connect_media()
        for kind, encryptor in self.encryptors.items():
            original = encryptor.encrypt_frame

            def record(frame: bytes, kind: str = kind, original: Any = original) -> bytes:
                epoch = self.keys.epoch or 0
                out = original(frame)
                self.sent.append(SentFrame(kind, epoch, bytes(frame), bytes(out)))
                return out

            encryptor.encrypt_frame = record  # type: ignore[method-assign]

    def _on_track(
        self, track: MediaStreamTrack, transceiver: RTCRtpTransceiver, info: dict[str, str]
    ) -> None:
        super()._on_track(track, transceiver, info)
        receiver = transceiver.receiver
        original = receiver._handle_rtp_packet
        publisher, kind = info.get("identity", "?"), info.get("kind", track.kind)

        async def tap(packet: Any, arrival_time_ms: int) -> None:
            self.rtp.append((publisher, kind, bytes(packet.payload)))
            await original(packet, arrival_time_ms)

        receiver._handle_rtp_packet = tap  # type: ignore[method-assign]


@dataclass
class Outcome:
    names: list[str]
    # The results of the scenario's waits: a wait that timed out is then the failure reported,
    # rather than whatever it leaves unfinished further on.
    all_decoding_before_join: bool = False
    removal_committed: bool = False
    bob_keys_expired: bool = False
    race_converged: bool = False
    dave_leave_committed: bool = False
    decoded_before_join: dict[tuple[str, str, str], int] = field(default_factory=dict)
    decoded_end: dict[tuple[str, str, str], int] = field(default_factory=dict)
    pre_join_frames: list[SentFrame] = field(default_factory=list)
    pre_join_opened_by_dave: int = -1
    post_join_frames_opened_by_dave: int = 0
    removal_epoch: int = 0
    bob_decrypted_at_removal: int = 0
    bob_decrypted_end: int = 0
    bob_failures_at_removal: int = 0
    bob_failures_end: int = 0
    bob_epochs: set[int] = field(default_factory=set)
    epochs: dict[str, int | None] = field(default_factory=dict)
    codes: dict[str, str] = field(default_factory=dict)
    labels: list[tuple[str, set[str]]] = field(default_factory=list)
    rtp: list[tuple[str, str, str, bytes]] = field(default_factory=list)  # receiver, pub, kind
    plaintexts: list[tuple[str, bytes]] = field(default_factory=list)
    reachable_from_sfu: set[type] = field(default_factory=set)
    reachable_count: int = 0
    log: list[LogEntry] = field(default_factory=list)
    group_id: bytes = b""
    restarted_epoch: int | None = None
    restarted_code: str = ""
    epoch_after_restart: int | None = None
    code_after_restart: str = ""
    errors: list[str] = field(default_factory=list)
    race_epochs: list[int | None] = field(default_factory=list)
    dave_left: bool = False
    recorded: dict[str, int] = field(default_factory=dict)  # file name -> size
    members_after_leave: list[str] = field(default_factory=list)
    carol_decoded_anew: bool = False
    m_lines: tuple[list[int], list[int]] = ([], [])


def reachable_types(root: object, stop: Callable[[object], bool]) -> tuple[set[type], int]:
    """Types of every object reachable from `root` by references, not entering `stop` objects."""
    seen: set[int] = set()
    found: set[type] = set()
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or stop(obj):
            continue
        seen.add(id(obj))
        found.add(type(obj))
        todo.extend(gc.get_referents(obj))
    return found, len(seen)


def outside_the_sfu(obj: object) -> bool:
    """Where the walk stops: shared interpreter state, not the SFU's own objects. Modules,
    classes and functions lead to globals (and so to everything); the event loop leads to every
    task of the process, the participants' included."""
    return (
        isinstance(obj, types.ModuleType | type | types.FunctionType | types.BuiltinFunctionType
                   | types.CodeType | types.FrameType)
        or isinstance(obj, asyncio.AbstractEventLoop)
        or (isinstance(obj, dict) and "__name__" in obj and "__builtins__" in obj)
    )


def decoded(people: list[TapParticipant]) -> dict[tuple[str, str, str], int]:
    return {(p.name, pub, kind): r.decoded for p in people for (pub, kind), r in p.remote.items()}


def all_decoding(people: list[TapParticipant]) -> bool:
    """Each of `people` has decoded audio and video of each other one."""
    counts = decoded(people)
    return all(
        counts.get((p.name, other.name, kind), 0) > 0
        for p in people for other in people if other is not p for kind in ("audio", "video")
    )


async def _stay() -> None:
    pass


async def scenario(tmp: Path) -> Outcome:
    services = Services(db=str(tmp / "ds.sqlite3"))
    await services.start()
    state = tmp / "state"
    media = [MediaSpec(width=96, height=64, fps=10, seed=i) for i in range(4)]
    alice, bob, carol, dave = people = [
        TapParticipant(n, services.ds_url, services.sfu_url, state_dir=state, media=media[i],
                       record_dir=tmp / "received" if n == "carol" else None)
        for i, n in enumerate(["alice", "bob", "carol", "dave"])
    ]
    out = Outcome([p.name for p in people])
    # bob, once removed, stays in the media session as a hostile client would (conclave's own
    # leave at once; the SFU keeps such a client until its room token expires): what he still
    # receives must not open
    bob._leave_media_session = _stay  # type: ignore[method-assign]
    restarted: Participant | None = None
    try:
        for p in people:
            await p.start()
        await create_and_invite(ROOM, alice, [bob, carol])
        for p in (alice, bob, carol):
            await p.connect_media()
        # ICE, DTLS, the SFU's renegotiations, a keyframe and a decode per track: seconds on a
        # loaded machine. Then PHASE more of media, for the frame counts asserted below.
        out.all_decoding_before_join = await until(lambda: all_decoding([alice, bob, carol]), 15)
        await asyncio.sleep(PHASE)
        out.decoded_before_join = decoded([alice, bob, carol])

        # dave joins by an external commit; what was sent before must stay closed to him.
        out.pre_join_frames = [f for p in (alice, bob, carol) for f in p.sent]
        await dave.join(ROOM)
        await dave.connect_media()
        for p in (alice, bob, carol):
            await p.wait_epoch(dave.epoch or 0)
        probe = FrameDecryptor(dave.keys, holdback=0)
        opened = 0
        for f in out.pre_join_frames:
            mime = OPUS if f.kind == "audio" else "video/vp8"
            try:
                probe.decrypt_frame(f.ciphertext, mime)
                opened += 1
            except SFrameError:
                pass
        out.pre_join_opened_by_dave = opened
        await asyncio.sleep(PHASE)

        # alice asks for bob's removal; the first member to see the request commits it.
        before = dave.epoch or 0
        await alice.request_removal("bob")
        out.removal_committed = await until(
            lambda: bob.removed and all((p.epoch or 0) > before for p in (alice, carol, dave)), 10
        )
        out.removal_epoch = min(p.epoch or 0 for p in (alice, carol, dave))
        # bob keeps the last epoch's receive keys for the grace period (`retire`): frames of it
        # still in flight open legitimately until then. Count from when they are gone (frames
        # are decrypted in the event loop: none can open after this).
        out.bob_keys_expired = await until(
            lambda: bob.keys.retained_epochs == [], bob.keys.grace_period + 3
        )
        out.bob_decrypted_at_removal = sum(r.stats.frames_decrypted for r in bob.remote.values())
        out.bob_failures_at_removal = sum(sum(r.stats.failures.values())
                                          for r in bob.remote.values())

        # Two members rotate at once: one wins, the other processes it and retries.
        await asyncio.gather(carol.rotate(), dave.rotate())
        out.race_converged = await until(
            lambda: len({p.epoch for p in (alice, carol, dave)}) == 1, 5
        )
        out.race_epochs = [p.epoch for p in (alice, carol, dave)]
        await asyncio.sleep(PHASE)
        out.bob_decrypted_end = sum(r.stats.frames_decrypted for r in bob.remote.values())
        out.bob_failures_end = sum(sum(r.stats.failures.values()) for r in bob.remote.values())
        out.bob_epochs = set().union(*(r.epochs for r in bob.remote.values()))
        out.decoded_end = decoded([alice, carol, dave])
        out.epochs = {p.name: p.epoch for p in people}
        out.codes = {p.name: p.safety_code for p in (alice, carol, dave)}
        out.labels = [(r.publisher, r.senders) for p in people for r in p.remote.values()]
        out.rtp = [(p.name, pub, kind, payload) for p in people for pub, kind, payload in p.rtp]
        out.plaintexts = [(f.kind, f.plaintext) for p in people for f in p.sent]

        assert services.sfu is not None
        out.reachable_from_sfu, out.reachable_count = reachable_types(
            services.sfu, outside_the_sfu
        )

        # carol restarts from her saved state while the group moves on without her.
        await carol.close()
        out.recorded = {f.name: f.stat().st_size for f in (tmp / "received").iterdir()}
        await alice.rotate()
        restarted = Participant("carol", services.ds_url, services.sfu_url, state_dir=state)
        await restarted.start()
        out.restarted_epoch = restarted.epoch
        await restarted.wait_epoch(alice.epoch or 0)
        out.epoch_after_restart = restarted.epoch
        out.code_after_restart = restarted.safety_code
        out.restarted_code = alice.safety_code

        # ... and calls in again: the SFU gives her streams the m-lines that bob and the first
        # carol left (sfu.room reuses them); alice and dave decrypt and decode her anew.
        old_remotes = {p.name: p.remote.get(("carol", "video")) for p in (alice, dave)}
        m_lines_before = [len(p.sfu.pc.getTransceivers()) for p in (alice, dave) if p.sfu]
        await restarted.connect_media()

        def carol_decoded_anew() -> bool:
            return all(
                (r := p.remote.get(("carol", kind))) is not None
                and r is not old_remotes[p.name]
                and r.decoded > 0
                for p in (alice, dave)
                for kind in ("audio", "video")
            )

        out.carol_decoded_anew = await until(carol_decoded_anew, 15)
        m_lines_after = [len(p.sfu.pc.getTransceivers()) for p in (alice, dave) if p.sfu]
        out.m_lines = (m_lines_before, m_lines_after)

        # dave leaves: his own Remove proposal, committed by whoever sees it first.
        epoch = alice.epoch or 0
        await dave.leave()
        out.dave_leave_committed = await until(
            lambda: dave.removed and (alice.epoch or 0) > epoch, 10
        )
        out.dave_left = dave.removed
        out.members_after_leave = alice.member_names

        out.group_id = alice.group_id
        out.log = await fetch_log(services.ds_url, alice.group_id, state)
        out.errors = [e for p in people for e in p.errors]
    finally:
        for p in people:
            await p.close()
        if restarted is not None:
            await restarted.close()
        await services.stop()
    return out


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return asyncio.run(asyncio.wait_for(scenario(tmp_path_factory.mktemp("e2e")), 90))


def test_three_participants_decode_each_others_audio_and_video(outcome: Outcome) -> None:
    assert outcome.all_decoding_before_join, "not all 12 tracks decoded within 15 s"
    for who in ("alice", "bob", "carol"):
        for other in ("alice", "bob", "carol"):
            if who != other:
                for kind in ("audio", "video"):
                    assert outcome.decoded_before_join.get((who, other, kind), 0) > 0, (
                        who, other, kind)


def test_all_remaining_members_decode_each_other_after_join_and_removal(outcome: Outcome) -> None:
    for who in ("alice", "carol", "dave"):
        for other in ("alice", "carol", "dave"):
            if who != other:
                for kind in ("audio", "video"):
                    assert outcome.decoded_end.get((who, other, kind), 0) > 0, (who, other, kind)


def test_the_fourth_cannot_decrypt_frames_sent_before_its_epoch(outcome: Outcome) -> None:
    assert len(outcome.pre_join_frames) > 50
    assert outcome.pre_join_opened_by_dave == 0


def test_the_removed_member_decrypts_nothing_after_the_transition(outcome: Outcome) -> None:
    assert outcome.removal_committed, "bob's removal was not committed within 10 s"
    # his receive keys went when the grace period ended
    assert outcome.bob_keys_expired, "bob still holds receive keys after the grace period"
    # Frames kept arriving (they fail)...
    assert outcome.bob_failures_end > outcome.bob_failures_at_removal
    # ...and none decrypted, none of an epoch after the removal.
    assert outcome.bob_decrypted_end == outcome.bob_decrypted_at_removal
    assert outcome.bob_epochs and max(outcome.bob_epochs) < outcome.removal_epoch
    assert outcome.epochs["bob"] is not None and outcome.epochs["bob"] < outcome.removal_epoch


def test_concurrent_commits_converge(outcome: Outcome) -> None:
    assert outcome.removal_committed  # removal_epoch, below, is the epoch it made
    assert outcome.race_converged, "the members did not reach one epoch within 5 s"
    assert len(set(outcome.race_epochs)) == 1
    assert outcome.race_epochs[0] is not None
    assert outcome.race_epochs[0] >= outcome.removal_epoch + 2  # both rotations landed


def test_every_track_carries_frames_of_the_publisher_the_sfu_named(outcome: Outcome) -> None:
    # the senders come from the frames' KIDs, which the SFU cannot change
    assert outcome.labels and all(senders <= {label} for label, senders in outcome.labels)
    assert sum(1 for _, senders in outcome.labels if senders) >= 6


def test_members_share_the_safety_code(outcome: Outcome) -> None:
    assert outcome.race_converged
    assert len(set(outcome.codes.values())) == 1


def test_every_forwarded_payload_is_sframe_ciphertext(outcome: Outcome) -> None:
    assert len(outcome.rtp) > 500
    needles = set()
    for kind, plaintext in outcome.plaintexts:
        n = clear_prefix_length(OPUS if kind == "audio" else "video/vp8", plaintext)
        body = plaintext[n:]
        if len(body) >= NEEDLE:
            needles.add(body[:NEEDLE])
            needles.add(body[-NEEDLE:])
    assert len(needles) > 100
    for _, _, _, payload in outcome.rtp:
        for needle in needles:
            assert needle not in payload
    # Each Opus RTP payload is one frame: TOC byte, then an SFrame header.
    audio = [p for _, _, kind, p in outcome.rtp if kind == "audio"]
    assert audio
    for payload in audio:
        kid, _, header_len = decode_header(payload[1:])
        assert len(payload) > 1 + header_len + 16  # header, ciphertext, 16-byte tag


def test_no_key_object_is_reachable_from_the_sfu(outcome: Outcome) -> None:
    assert RTCPeerConnection in outcome.reachable_from_sfu  # the walk did reach the media
    assert outcome.reachable_count > 1000
    forbidden = (MLSKeyManager, SFrameContext, SendKeyContext, RecvKeyContext, Group, Client,
                 Participant, TapParticipant)
    # subclasses too: the key manager's context is one of SFrameContext's
    assert not [t for t in outcome.reachable_from_sfu if issubclass(t, forbidden)]


def test_the_walk_would_find_keys_next_to_the_sfu() -> None:
    holder = types.SimpleNamespace(keys=MLSKeyManager())
    found, _ = reachable_types(holder, outside_the_sfu)
    assert MLSKeyManager in found and any(issubclass(t, SFrameContext) for t in found)


def test_a_restarted_participant_rejoins_without_a_new_identity(outcome: Outcome) -> None:
    assert outcome.restarted_epoch is not None
    assert outcome.epoch_after_restart is not None
    assert outcome.epoch_after_restart > outcome.restarted_epoch
    assert outcome.code_after_restart == outcome.restarted_code


def test_a_restarted_participant_is_decoded_again_on_reused_m_lines(outcome: Outcome) -> None:
    assert outcome.carol_decoded_anew
    before, after = outcome.m_lines
    assert len(before) == 2 and before == after  # no m-line added for the returning carol


def test_a_member_leaves_by_its_own_remove_proposal(outcome: Outcome) -> None:
    assert outcome.dave_leave_committed, "dave's leave was not committed within 10 s"
    assert outcome.dave_left
    assert outcome.members_after_leave == ["alice", "carol"]


def test_received_media_is_recorded(outcome: Outcome) -> None:
    # carol recorded everyone she received, decrypted: a WAV and an MP4 per publisher.
    for who in ("alice", "bob", "dave"):
        assert outcome.recorded.get(f"{who}-audio.wav", 0) > 44  # more than a WAV header
        assert outcome.recorded.get(f"{who}-video.mp4", 0) > 1000


def test_no_participant_reported_errors(outcome: Outcome) -> None:
    assert outcome.errors == []


def test_audit_passes_on_the_log(outcome: Outcome, tmp_path: Path) -> None:
    # the log is fetched after both removals: each must have been committed by then
    assert outcome.removal_committed and outcome.dave_leave_committed
    report = audit(outcome.group_id, outcome.log)
    reasons = [r.reasons for r in report.rotations]
    assert ["add"] in reasons and ["external-join"] in reasons and ["remove"] in reasons
    assert ["periodic"] in reasons
    # alice asked for bob's removal; dave asked to leave.
    removals = [r for r in report.rotations if r.reasons in (["remove"], ["leave"])]
    assert [(r.removed, r.reasons) for r in removals] == [
        (["bob"], ["remove"]), (["dave"], ["leave"])
    ]
    for removal, who in zip(removals, ("bob", "dave"), strict=True):
        latency = removal.removal_latency_ms[who]
        assert latency is not None and 0 <= latency < 10_000
    assert report.members == ["alice", "carol"]
    path = tmp_path / "log.cbor"
    save_log(path, outcome.group_id, outcome.log)
    assert main(["audit", "--group", ROOM, "--log", str(path)]) == 0


def test_audit_fails_on_a_tampered_copy(
    outcome: Outcome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = list(outcome.log)
    i = next(i for i, e in enumerate(entries) if e.kind == "commit" and e.epoch > 2)
    victim = entries[i]
    data = bytearray(victim.message)
    data[-100] ^= 0x01  # inside the signature (see test_audit.SIGNATURE_FROM_END)
    entries[i] = LogEntry(victim.seq, victim.kind, victim.epoch, victim.sender,
                          victim.time_ms, bytes(data))
    path = tmp_path / "tampered.cbor"
    save_log(path, outcome.group_id, entries)
    assert main(["audit", "--group", ROOM, "--log", str(path)]) == 1
    assert f"seq {victim.seq}" in capsys.readouterr().err

