"""A participant's RTCP from the transport: PLI/FIR and REMB reach the right publisher stream."""

from __future__ import annotations

import struct

from sfu import rtcp
from sfu.config import SFUConfig
from sfu.metrics import Metrics
from sfu.room import Participant, Room
from tests.sfu.conftest import send_nothing
from tests.sfu.test_forwarding import make_slot, make_source


def _fir(sender_ssrc: int, targets: list[int]) -> bytes:
    """Full Intra Request (RFC 5104 §4.3.1): FCI entries of SSRC, seq nr, 3 reserved bytes."""
    fci = b"".join(struct.pack("!IB3x", ssrc, n) for n, ssrc in enumerate(targets))
    body = struct.pack("!II", sender_ssrc, 0) + fci
    return struct.pack("!BBH", 0x80 | rtcp.PSFB_FIR, rtcp.RTCP_PSFB, len(body) // 4) + body


async def test_fir_and_pli_from_a_subscriber_become_throttled_plis_upstream(
    sub: Participant,
) -> None:
    source, up = make_source()
    slot, _ = make_slot()
    slot.attach(source)
    sub.slots_by_ssrc[slot.ssrc] = slot
    await sub._on_rtcp(_fir(99, [12345, slot.ssrc]))  # one FCI entry is not ours
    assert up.packets == [rtcp.pack_pli(4242, 1111)]
    await sub._on_rtcp(rtcp.pack_pli(99, slot.ssrc))  # within pli_interval: held back
    assert len(up.packets) == 1 and source.pli_pending
    assert sub.metrics.plis_received == 2
    await sub._on_rtcp(rtcp.pack_remb(99, 500_000, [slot.ssrc, 4321]))
    assert slot.remb is not None and slot.remb[0] == 500_000
    [remb] = rtcp.parse_rtcp(up.packets[-1])
    assert isinstance(remb, rtcp.RtcpPsfbPacket) and remb.fmt == rtcp.PSFB_APP
    assert rtcp.unpack_remb_fci(remb.fci) == (500_000, [1111])
    await sub._on_rtcp(rtcp.pack_remb(99, 1, [slot.ssrc])[:-2])  # truncated: ignored
    # an FCI that announces five SSRCs but carries one: ignored, no exception
    fci = b"REMB" + bytes([5, 0, 0, 1]) + struct.pack("!I", slot.ssrc)
    body = struct.pack("!II", 99, 0) + fci
    header = struct.pack("!BBH", 0x80 | rtcp.PSFB_APP, rtcp.RTCP_PSFB, len(body) // 4)
    await sub._on_rtcp(header + body)
    assert slot.remb[0] == 500_000


async def test_unknown_ssrcs_are_matched_to_publishing_m_lines_by_mid() -> None:
    from tests.sfu.test_forwarding import KEY, rtp_packet

    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    pub = Participant(room, "pub", ["video"], send_nothing, config, room.metrics)
    try:
        source, _ = make_source()  # mid "0", SSRC 1111, PT 97, RTX 1112/98, mid extension id 1
        pub.sources[source.mid] = source
        pub.sources_by_ssrc.update({1111: source, 1112: source})
        # an unknown mid, or the right mid with a payload type the m-line does not carry: dropped
        await pub._on_rtp(rtp_packet(1, 0, KEY, ssrc=5000, ext=[(1, b"7")]))
        await pub._on_rtp(rtp_packet(1, 0, KEY, ssrc=5000, pt=55, ext=[(1, b"0")]))
        await pub._on_rtp(rtp_packet(1, 0, KEY, ssrc=5000))  # no mid at all
        assert set(pub.sources_by_ssrc) == {1111, 1112} and source.ssrc == 1111
        # a new RTX SSRC on the m-line
        await pub._on_rtp(rtp_packet(1, 0, b"\x00\x01" + KEY, ssrc=6000, pt=98, ext=[(1, b"0")]))
        assert source.rtx_ssrc == 6000 and set(pub.sources_by_ssrc) == {1111, 6000}
        # the media restarted under a new SSRC
        await pub._on_rtp(rtp_packet(9, 0, KEY, ssrc=7000, ext=[(1, b"0")]))
        assert source.ssrc == 7000 and set(pub.sources_by_ssrc) == {7000, 6000}
        assert source.received == 1
        # a late packet of the stream before the restart is not another restart
        await pub._on_rtp(rtp_packet(500, 0, KEY, ssrc=1111, ext=[(1, b"0")]))
        assert source.ssrc == 7000 and set(pub.sources_by_ssrc) == {7000, 6000}
        assert source.received == 1
    finally:
        await pub.close()
        await room.close()


async def test_one_room_timer_ticks_every_participant_and_survives_a_failing_one(
    caplog,
) -> None:
    import asyncio
    import logging

    caplog.set_level(logging.ERROR, logger="sfu.room")
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    ticks: dict[str, int] = {"a": 0, "b": 0}

    class _Ticking:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def tick(self, now: float) -> None:
            ticks[self.name] += 1
            if self.fail:
                raise RuntimeError("boom")

    room.participants = {"a": _Ticking("a", True), "b": _Ticking("b", False)}  # type: ignore[dict-item]
    try:
        await asyncio.sleep(0.2)
        assert ticks["a"] >= 2 and ticks["b"] >= 2
        assert "timer of" in caplog.text
        assert not room._task.done()
    finally:
        room.participants = {}
        await room.close()


async def test_room_timers_share_one_wake_up_grid(monkeypatch) -> None:
    import asyncio

    from sfu import room
    from sfu.room import TICK_INTERVAL, sleep_until_tick

    loop = asyncio.get_running_loop()
    deadlines: list[float] = []
    call_at = loop.call_at

    def recording_call_at(when: float, *args, **kwargs):  # type: ignore[no-untyped-def]
        if args and args[0] is room._wake:  # not asyncio.sleep's own timers
            deadlines.append(when)
        return call_at(when, *args, **kwargs)

    # start right after a grid point, ~45 ms before the next one: the two sleepers below read
    # loop.time() one after the other, and a grid point between them would part their deadlines
    await sleep_until_tick()
    monkeypatch.setattr(loop, "call_at", recording_call_at)
    await asyncio.gather(sleep_until_tick(), asyncio.sleep(0.003), sleep_until_tick())
    await asyncio.gather(asyncio.sleep(0.004), sleep_until_tick())
    # concurrent sleepers get the same deadline, a multiple of TICK_INTERVAL
    assert len(deadlines) == 3 and deadlines[0] == deadlines[1]
    for when in deadlines:
        assert abs(when / TICK_INTERVAL - round(when / TICK_INTERVAL)) < 1e-6
    assert deadlines[2] > deadlines[0]


async def test_a_loop_that_runs_timers_early_does_not_make_the_room_timer_spin(
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """uvloop runs timers up to 1 ms early: the timer must still wake once per tick."""
    import asyncio
    import time

    from sfu.room import TICK_INTERVAL, sleep_until_tick

    loop = asyncio.get_running_loop()
    call_at = loop.call_at

    def early_call_at(when: float, *args, **kwargs):  # type: ignore[no-untyped-def]
        return call_at(when - 0.002, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", early_call_at)
    wake_ups = 6
    async with asyncio.timeout(5):  # the timer does wake up: a hang fails here
        start = time.monotonic()
        for _ in range(wake_ups):
            await sleep_until_tick()
        elapsed = time.monotonic() - start
    # one wake-up per tick: six of them span five whole ticks (it spun thousands of times a
    # second before, waking six times within a few ms). Counting wake-ups over a fixed time
    # instead would fail whenever a busy machine stalled the loop; a stall only adds time here.
    assert elapsed >= (wake_ups - 1) * TICK_INTERVAL


def _with_extension(packet: bytes, extension: bytes) -> bytes:
    """An SR or RR with profile-specific extension words after its report blocks (RFC 3550
    §6.4.1-6.4.2), its length field grown to match."""
    first, packet_type, length = struct.unpack_from("!BBH", packet)
    return (
        struct.pack("!BBH", first, packet_type, length + len(extension) // 4)
        + packet[4:]
        + extension
    )


async def test_one_odd_packet_does_not_hide_the_rest_of_a_compound(sub: Participant) -> None:
    source, up = make_source(pli_interval=0.0)
    slot, down = make_slot()
    slot.attach(source)
    sub.slots_by_ssrc[slot.ssrc] = slot
    sub.sources_by_ssrc[source.ssrc] = source
    rr = rtcp.pack_rr(99, [rtcp.ReportBlock(slot.ssrc, 0, 0, 1, 0, 0, 0)])
    await sub._on_rtcp(_with_extension(rr, b"ext1ext2") + rtcp.pack_pli(99, slot.ssrc))
    assert up.packets == [rtcp.pack_pli(4242, 1111)]
    # an RR whose count promises two blocks but carries one: skipped, the PLI still counts
    bad = bytearray(rr)
    bad[0] += 1
    await sub._on_rtcp(bytes(bad) + rtcp.pack_pli(99, slot.ssrc))
    assert len(up.packets) == 2
    # a publisher's SR with an extension still maps onto its subscribers (lip sync)
    from tests.sfu.test_forwarding import KEY, rtp_packet

    source.handle_rtp(rtp_packet(1, 90000, KEY), now=0.0)
    sr = rtcp.pack_sr(1111, 1 << 40, 90000, 1, len(KEY))
    await sub._on_rtcp(_with_extension(sr, b"abcd"))
    [mapped] = rtcp.parse_rtcp(down.packets[-1])
    assert isinstance(mapped, rtcp.RtcpSrPacket) and mapped.ssrc == slot.ssrc
    # broken framing (a length beyond the datagram): the compound is dropped whole
    await sub._on_rtcp(rtcp.pack_pli(99, slot.ssrc) + b"\x81\xce\x00\x05")
    assert len(up.packets) == 2


async def test_a_repeated_fir_is_one_request(sub: Participant) -> None:
    source, up = make_source(pli_interval=0.0)
    slot, _ = make_slot()
    slot.attach(source)
    sub.slots_by_ssrc[slot.ssrc] = slot
    for _ in range(4):  # retransmissions of one request keep its seq nr (RFC 5104 §4.3.1.2)
        await sub._on_rtcp(_fir(99, [slot.ssrc]))
    assert len(up.packets) == 1
    await sub._on_rtcp(_fir(99, [12345, slot.ssrc]))  # seq nr 1 for our SSRC: a new request
    assert len(up.packets) == 2


async def test_a_participant_who_left_is_never_the_speaker_again() -> None:
    from tests.sfu.test_forwarding import rtp_packet

    config = SFUConfig(token_secret=b"x" * 16, speaker_interval=3600)  # ticked by hand here
    room = Room("r", config, Metrics())
    seen: list[dict] = []

    async def bob_json(message: dict) -> None:
        seen.append(message)

    alice = Participant(room, "alice", ["audio"], send_nothing, config, room.metrics)
    bob = Participant(room, "bob", [], bob_json, config, room.metrics)
    room.participants.update(alice=alice, bob=bob)
    try:
        # alice's audio stream, wired to the room's detector as `_on_publish_params` does
        source, _ = make_source(
            "audio", on_audio_level=lambda level: room.speaker.add_level("alice", level)
        )
        alice.sources[source.mid] = source

        def loud_interval(first_seq: int) -> str | None:
            for i in range(15):  # 0.3 s of 20 ms packets at -10 dBov (audio-level id 2)
                seq = first_seq + i
                source.handle_rtp(rtp_packet(seq, seq * 960, b"opus", pt=111, ext=[(2, b"\x0a")]))
            return room.speaker.tick()

        assert "alice" in [loud_interval(15 * n) for n in range(3)]
        await room.remove(alice)
        assert room.speaker.speaker is None
        assert seen[-1] == {"type": "participant-left", "identity": "alice"}
        # packets still in flight from alice's connection (it closes after the leave) must not
        # make her the speaker again
        assert [loud_interval(45 + 15 * n) for n in range(4)] == [None] * 4
        assert room.speaker.speaker is None
    finally:
        await bob.close()
        await room.close()


async def test_one_remb_counts_as_one_estimate_however_many_streams_it_names(
    sub: Participant,
) -> None:
    source, up = make_source()
    slots = []
    for ssrc in (7001, 7002, 7003):
        slot, _ = make_slot()
        slot.ssrc = ssrc
        slot.attach(source)
        sub.slots_by_ssrc[ssrc] = slot
        slots.append(slot)
    # browsers name every stream they receive on the connection in one REMB
    await sub._on_rtcp(rtcp.pack_remb(99, 300_000, [7001, 7002, 7003, 4321]))
    assert sub.metrics.rembs_received == 1
    assert all(s.remb is not None and s.remb[0] == 300_000 for s in slots)
    await sub._on_rtcp(rtcp.pack_remb(99, 200_000, [4321]))  # none of ours: not counted
    assert sub.metrics.rembs_received == 1
    await sub._on_rtcp(rtcp.pack_remb(99, 200_000, [7002]))
    assert sub.metrics.rembs_received == 2
