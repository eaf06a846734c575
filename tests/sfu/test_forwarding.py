"""The forwarding core on raw packets: rewriting, continuity, keyframe gate, NACK cache, SR."""

from __future__ import annotations

import struct

from sfu import rtcp
from sfu.forwarding import CACHE_SIZE, Slot, SourceStream
from sfu.metrics import Metrics
from sfu.rtp import (
    URI_ABS_SEND_TIME,
    URI_AUDIO_LEVEL,
    URI_MID,
    SequenceUnwrapper,
    pack_extensions,
    parse_rtp,
    vp8_is_keyframe,
)

KEY = b"\x10\x10keyframe-bytes"  # VP8 descriptor (S=1, PID=0) + frame tag with P=0
DELTA = b"\x10\x11delta-bytes"


def rtp_packet(
    seq: int,
    ts: int,
    payload: bytes,
    ssrc: int = 1111,
    pt: int = 97,
    ext: list[tuple[int, bytes]] | None = None,
    marker: int = 0,
) -> bytes:
    extensions = pack_extensions(ext or [])
    b0 = 0x80 | (0x10 if extensions else 0)
    return struct.pack("!BBHII", b0, (marker << 7) | pt, seq, ts, ssrc) + extensions + payload


class Sink:
    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def __call__(self, data: bytes) -> None:
        self.packets.append(data)


def make_source(kind: str = "video", ssrc: int = 1111, **kw: object) -> tuple[SourceStream, Sink]:
    up = Sink()
    source = SourceStream(
        publisher="pub",
        kind=kind,
        mid="0",
        ssrc=ssrc,
        payload_type=97 if kind == "video" else 111,
        clock_rate=90000 if kind == "video" else 48000,
        ext_uris={1: URI_MID, 3: URI_ABS_SEND_TIME, 2: URI_AUDIO_LEVEL},
        send_rtcp=up,
        rtcp_ssrc=4242,
        metrics=Metrics(),
        rtx_ssrc=ssrc + 1,
        rtx_payload_type=98,
        **kw,  # type: ignore[arg-type]
    )
    return source, up


def make_slot(
    kind: str = "video", metrics: Metrics | None = None, subscriber: str = "sub"
) -> tuple[Slot, Sink]:
    down = Sink()
    slot = Slot(
        subscriber=subscriber,
        kind=kind,
        ssrc=7777,
        mid="5",
        payload_type=100,
        ext_ids={URI_MID: 9, URI_ABS_SEND_TIME: 4},
        send=down,
        metrics=metrics or Metrics(),
    )
    return slot, down


def test_rewrites_ssrc_pt_seq_ts_and_extension_ids() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    ext = [(1, b"0"), (3, b"\x01\x02\x03"), (7, b"unknown")]
    source.handle_rtp(rtp_packet(100, 5000, KEY, ext=ext, marker=1), now=0.0)
    source.handle_rtp(rtp_packet(101, 8000, DELTA, ext=ext), now=0.03)
    first, second = (parse_rtp(p) for p in down.packets)
    assert first.ssrc == second.ssrc == 7777
    assert first.payload_type == 100 and first.marker == 1 and second.marker == 0
    assert (second.sequence_number - first.sequence_number) & 0xFFFF == 1
    assert (second.timestamp - first.timestamp) & 0xFFFFFFFF == 3000
    # abs-send-time moved from id 3 to 4, mid rewritten to the subscriber's m-line, unknown dropped
    assert sorted(first.extensions) == [(4, b"\x01\x02\x03"), (9, b"5")]
    assert down.packets[0][first.payload_offset :] == KEY


def test_video_is_held_until_a_keyframe() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    assert source.pli_pending  # a new subscriber asks for a keyframe
    source.handle_rtp(rtp_packet(1, 0, DELTA), now=0.0)
    source.handle_rtp(rtp_packet(2, 3000, DELTA), now=0.0)
    assert down.packets == []
    source.handle_rtp(rtp_packet(3, 6000, KEY), now=0.0)
    source.handle_rtp(rtp_packet(4, 9000, DELTA), now=0.0)
    assert len(down.packets) == 2
    assert down.packets[0].endswith(KEY)


def test_audio_is_not_gated_and_levels_are_reported() -> None:
    levels: list[int] = []
    source, _ = make_source("audio", on_audio_level=levels.append)
    slot, down = make_slot("audio")
    slot.attach(source)
    source.handle_rtp(rtp_packet(1, 0, b"opus", pt=111, ext=[(2, b"\x9e")]), now=0.0)
    assert len(down.packets) == 1 and levels == [0x1E]


def test_numbering_continues_when_the_source_behind_a_slot_changes() -> None:
    a, _ = make_source(ssrc=1000)
    b, _ = make_source(ssrc=2000)
    slot, down = make_slot()
    slot.attach(a)
    for i in range(3):
        a.handle_rtp(rtp_packet(60000 + i, 10 + 3000 * i, KEY, ssrc=1000), now=i * 0.033)
    slot.attach(b)
    # b's numbering is unrelated (and lower): the subscriber must still see +1 steps
    b.handle_rtp(rtp_packet(5, 777, DELTA, ssrc=2000), now=0.2)  # gated: not a keyframe
    b.handle_rtp(rtp_packet(6, 3777, KEY, ssrc=2000), now=0.2)
    b.handle_rtp(rtp_packet(7, 6777, DELTA, ssrc=2000), now=0.233)
    headers = [parse_rtp(p) for p in down.packets]
    seqs = [h.sequence_number for h in headers]
    assert [(s - seqs[0]) & 0xFFFF for s in seqs] == [0, 1, 2, 3, 4]
    ts = [h.timestamp for h in headers]
    assert all(0 < (t2 - t1) & 0xFFFFFFFF < 1 << 31 for t1, t2 in zip(ts, ts[1:], strict=False))
    assert (ts[4] - ts[3]) & 0xFFFFFFFF == 3000
    assert a.slots == [] and b.slots == [slot]


def test_subscriber_nack_is_answered_from_the_cache() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    for i in range(5):
        source.handle_rtp(rtp_packet(100 + i, 3000 * i, KEY), now=0.0)
    lost = parse_rtp(down.packets[2]).sequence_number
    slot.retransmit([lost, (lost + 1000) & 0xFFFF])
    assert down.packets[-1] == down.packets[2] and len(down.packets) == 6
    assert slot.metrics.retransmissions_sent == 1


def test_nacks_are_rebuilt_from_the_source_history_for_the_current_source_only() -> None:
    a, _ = make_source(ssrc=1000)
    b, _ = make_source(ssrc=2000)
    slot, down = make_slot()
    slot.attach(a)
    ext = [(1, b"0"), (3, b"\x01\x02\x03")]
    for i in range(4):
        a.handle_rtp(rtp_packet(700 + i, 3000 * i, KEY, ssrc=1000, ext=ext, marker=i % 2), now=0.0)
    sent = list(down.packets)
    seqs = [parse_rtp(p).sequence_number for p in sent]
    slot.retransmit([seqs[1], seqs[2]])  # rebuilt byte for byte, marker bit included
    assert down.packets[4:] == [sent[1], sent[2]]
    # a copy older than the source's history is not resent
    for i in range(4, 4 + CACHE_SIZE):
        a.handle_rtp(rtp_packet(700 + i, 3000 * i, DELTA, ssrc=1000), now=0.0)
    count = len(down.packets)
    slot.retransmit([seqs[0]])
    assert len(down.packets) == count
    # after a change of source, the old source's packets are not resent (nor another packet
    # that happens to sit at the mapped place of the new source's history)
    last_of_a = parse_rtp(down.packets[-1]).sequence_number
    slot.attach(b)
    b.handle_rtp(rtp_packet(5, 777, KEY, ssrc=2000), now=1.0)
    count = len(down.packets)
    slot.retransmit([last_of_a, (last_of_a - 1) & 0xFFFF])
    assert len(down.packets) == count
    first_of_b = parse_rtp(down.packets[-1]).sequence_number
    slot.retransmit([first_of_b])
    assert down.packets[-1] == down.packets[-2]
    # a restart under a new SSRC forgets the history of the old one
    b.restart(2001)
    b.handle_rtp(rtp_packet(6, 3777, KEY, ssrc=2001), now=1.1)
    count = len(down.packets)
    slot.retransmit([first_of_b])
    assert len(down.packets) == count


def test_a_slot_without_nack_ignores_nacks() -> None:
    source, _ = make_source(kind="audio")
    down = Sink()
    slot = Slot(
        subscriber="sub",
        kind="audio",
        ssrc=7777,
        mid="5",
        payload_type=111,
        ext_ids={URI_MID: 9},
        send=down,
        metrics=source.metrics,
        nack=False,
    )
    slot.attach(source)
    source.handle_rtp(rtp_packet(10, 960, b"opus", ssrc=1111, pt=111), now=0.0)
    assert len(down.packets) == 1 and not slot.nack
    slot.retransmit([parse_rtp(down.packets[0]).sequence_number])
    assert len(down.packets) == 1
    assert source.metrics.nacks_received == 1 and source.metrics.retransmissions_sent == 0


def test_upstream_gap_is_nacked_and_rtx_repair_forwarded() -> None:
    source, up = make_source()
    slot, down = make_slot()
    slot.attach(source)
    source.handle_rtp(rtp_packet(65534, 0, KEY), now=0.0)
    source.handle_rtp(rtp_packet(1, 3000, DELTA), now=0.01)  # 65535 and 0 lost
    source.send_nacks(now=0.02)
    nacks = [p for p in rtcp.parse_rtcp(up.packets[-1]) if isinstance(p, rtcp.NackPacket)]
    assert nacks and nacks[0].media_ssrc == 1111 and nacks[0].ssrc == 4242
    assert sorted(s & 0xFFFF for s in nacks[0].lost) == [0, 65535]
    # RTX (RFC 4588): original sequence number first in the payload, on the RTX SSRC and PT
    source.handle_rtp(rtp_packet(9, 0, b"\xff\xff" + DELTA, ssrc=1112, pt=98), now=0.03)
    repaired = parse_rtp(down.packets[-1])
    assert repaired.payload_type == 100 and repaired.ssrc == 7777
    assert down.packets[-1][repaired.payload_offset :] == DELTA
    first = parse_rtp(down.packets[0]).sequence_number
    assert (repaired.sequence_number - first) & 0xFFFF == 1
    assert list(source.missing) == [65536]  # only 0 still missing
    # duplicates are not forwarded twice
    source.handle_rtp(rtp_packet(9, 0, b"\xff\xff" + DELTA, ssrc=1112, pt=98), now=0.04)
    assert len(down.packets) == 3


def test_pli_is_throttled() -> None:
    source, up = make_source(pli_interval=0.3)
    source.request_keyframe_now(now=10.0)
    source.request_keyframe_now(now=10.1)
    assert len(up.packets) == 1 and source.pli_pending
    source.tick(now=10.35)
    assert len(up.packets) == 2 and not source.pli_pending
    pli = rtcp.parse_rtcp(up.packets[0])[0]
    assert isinstance(pli, rtcp.RtcpPsfbPacket) and pli.fmt == 1 and pli.media_ssrc == 1111


def test_sender_report_is_mapped_to_the_slot() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    source.handle_rtp(rtp_packet(100, 90000, KEY), now=0.0)
    out_ts = parse_rtp(down.packets[0]).timestamp
    ntp = 0x0123456789ABCDEF
    [(s, sr_bytes)] = source.handle_sender_report(ntp, 90000 + 45000, now=1.0)
    sr = rtcp.parse_rtcp(sr_bytes)[0]
    assert s is slot and isinstance(sr, rtcp.RtcpSrPacket)
    assert sr.ssrc == 7777 and sr.sender_info.ntp_timestamp == ntp
    assert sr.sender_info.rtp_timestamp == (out_ts + 45000) & 0xFFFFFFFF
    assert sr.sender_info.packet_count == 1
    block = source.report_block(now=1.5)
    assert block is not None and block.ssrc == 1111 and block.lsr == (ntp >> 16) & 0xFFFFFFFF
    assert block.dlsr == 32768  # 0.5 s in 1/65536 s


def test_vp8_keyframe_detection_with_extended_descriptor() -> None:
    # X=1, S=1; I=1 with 15-bit PictureID, L=1, T=1: 6 descriptor bytes before the frame tag
    assert vp8_is_keyframe(bytes([0x90, 0xE0, 0x80, 0x01, 0x00, 0x20, 0x10]))
    assert not vp8_is_keyframe(bytes([0x90, 0xE0, 0x80, 0x01, 0x00, 0x20, 0x11]))
    assert not vp8_is_keyframe(bytes([0x00, 0x10]))  # not the start of a partition
    assert not vp8_is_keyframe(bytes([0x11, 0x10]))  # partition 1
    assert not vp8_is_keyframe(b"\x90")


def test_sequence_unwrapper_across_wrap() -> None:
    u = SequenceUnwrapper()
    assert [u.unwrap(s) for s in (65534, 65535, 0, 1, 65535, 2)] == [
        65534,
        65535,
        65536,
        65537,
        65535,
        65538,
    ]


def test_nack_packing_across_wrap() -> None:
    packet = rtcp.pack_nack(1, 2, [65535, 0, 5, 40])
    [nack] = rtcp.parse_rtcp(packet)
    assert isinstance(nack, rtcp.NackPacket)
    assert sorted(s & 0xFFFF for s in nack.lost) == [0, 5, 40, 65535]


def test_two_byte_extensions_roundtrip() -> None:
    data = rtp_packet(1, 2, b"x", ext=[(1, b"a" * 20)])
    assert parse_rtp(data).extensions == [(1, b"a" * 20)]


async def test_transport_hooks_never_raise_into_aiortc() -> None:
    from sfu.aiortc_hooks import hook_transport

    class FakeTransport:
        pass

    async def boom(data: bytes) -> None:
        raise RuntimeError("bug")

    transport = FakeTransport()
    assert hook_transport(transport, boom, boom)  # type: ignore[arg-type]
    assert not hook_transport(transport, boom, boom)  # type: ignore[arg-type]
    await transport._handle_rtp_data(b"\x80" * 12, 0)  # type: ignore[attr-defined]
    await transport._handle_rtcp_data(b"\x80\xc8")  # type: ignore[attr-defined]


def test_restart_under_a_new_ssrc_continues_the_slot_numbering() -> None:
    source, _ = make_source(ssrc=1000)
    slot, down = make_slot()
    slot.attach(source)
    for i in range(3):
        source.handle_rtp(rtp_packet(500 + i, 3000 * i, KEY, ssrc=1000), now=i * 0.033)
    source.pli_pending = False
    source.restart(3000)
    assert source.pli_pending and source.base_seq is None and not slot.started
    source.handle_rtp(rtp_packet(501, 0, KEY, ssrc=1000), now=0.1)  # old SSRC: ignored
    source.handle_rtp(rtp_packet(9, 50, DELTA, ssrc=3000), now=0.1)  # gated until a keyframe
    source.handle_rtp(rtp_packet(10, 3050, KEY, ssrc=3000), now=0.133)
    source.handle_rtp(rtp_packet(11, 6050, DELTA, ssrc=3000), now=0.166)
    seqs = [parse_rtp(p).sequence_number for p in down.packets]
    assert [(s - seqs[0]) & 0xFFFF for s in seqs] == [0, 1, 2, 3, 4]
    assert source.report_block(now=0.2).highest_sequence == 11  # type: ignore[union-attr]


def remb_bitrates(up: Sink) -> list[tuple[int, list[int]]]:
    """The REMBs (bitrate, SSRCs) a source sent its publisher, in order."""
    out = []
    for packet in up.packets:
        for p in rtcp.parse_rtcp(packet):
            if isinstance(p, rtcp.RtcpPsfbPacket) and p.fmt == rtcp.PSFB_APP:
                assert p.ssrc == 4242
                out.append(rtcp.unpack_remb_fci(p.fci))
    return out


def test_lowest_subscriber_estimate_is_relayed_upstream_throttled() -> None:
    source, up = make_source()
    slow, _ = make_slot(subscriber="slow")
    fast, _ = make_slot(subscriber="fast")
    slow.attach(source)
    fast.attach(source)
    source.tick(now=1.0)
    assert up.packets == [rtcp.pack_pli(4242, 1111)]  # no estimate yet: no REMB

    def rembs() -> list[tuple[int, list[int]]]:
        return remb_bitrates(up)

    fast.remb, slow.remb = (2_000_000, 1.0), (300_000, 1.0)
    source.relay_remb(now=1.0)
    assert rembs() == [(300_000, [1111])]
    slow.remb = (290_000, 1.1)  # small drop, within the interval: held back
    source.relay_remb(now=1.1)
    slow.remb = (200_000, 1.2)  # large drop: relayed at once
    source.relay_remb(now=1.2)
    assert [b for b, _ in rembs()] == [300_000, 200_000]
    slow.attach(None)  # the slow subscriber left: the fast one sets the pace after the interval
    source.tick(now=1.5)
    source.tick(now=2.3)
    assert [b for b, _ in rembs()] == [300_000, 200_000, 2_000_000]
    source.tick(now=9.0)  # every estimate is stale
    assert len(rembs()) == 3


def test_slots_of_one_packet_each_get_their_own_ids_and_mid() -> None:
    """Slots share serialized packet tails only when their extension IDs and mid agree."""
    source, _ = make_source()
    layouts = [
        ({URI_MID: 9, URI_ABS_SEND_TIME: 4}, "5"),
        ({URI_MID: 9, URI_ABS_SEND_TIME: 4}, "5"),  # same tail as the first
        ({URI_MID: 9, URI_ABS_SEND_TIME: 4}, "6"),  # other mid
        ({URI_MID: 2, URI_ABS_SEND_TIME: 12}, "5"),  # other ids
        ({URI_ABS_SEND_TIME: 4}, "7"),  # no mid extension negotiated
        ({URI_MID: 9, URI_ABS_SEND_TIME: 4}, "m" * 20),  # mid too long for one-byte form
        ({}, "8"),  # no extensions at all
    ]
    sinks = []
    for i, (ext_ids, mid) in enumerate(layouts):
        down = Sink()
        slot = Slot(
            subscriber=f"s{i}",
            kind="video",
            ssrc=7000 + i,
            mid=mid,
            payload_type=100,
            ext_ids=ext_ids,
            send=down,
            metrics=source.metrics,
        )
        slot.attach(source)
        sinks.append(down)
    ext = [(1, b"0"), (3, b"\x01\x02\x03")]
    source.handle_rtp(rtp_packet(100, 5000, KEY, ext=ext), now=0.0)
    for i, ((ext_ids, mid), down) in enumerate(zip(layouts, sinks, strict=True)):
        (packet,) = down.packets
        header = parse_rtp(packet)
        expected = [(ext_ids[URI_ABS_SEND_TIME], b"\x01\x02\x03")] if ext_ids else []
        if URI_MID in ext_ids:
            expected.append((ext_ids[URI_MID], mid.encode()))
        assert header.ssrc == 7000 + i
        assert sorted(header.extensions) == sorted(expected)
        assert packet[header.payload_offset :] == KEY
        assert bool(packet[0] & 0x10) == bool(expected)


def test_a_two_part_sender_gets_the_same_bytes_live_and_on_nack() -> None:
    source, _ = make_source()
    whole, whole_down = make_slot()
    parts_got: list[tuple[bytes, bytes]] = []
    split, unused = make_slot()
    split.send_parts = lambda head, rest: parts_got.append((head, rest))
    whole.attach(source)
    split.attach(source)
    for i in range(3):
        source.handle_rtp(rtp_packet(100 + i, 3000 * i, KEY, ext=[(3, b"\x01\x02\x03")]), now=0.0)
    assert unused.packets == []  # the two-part sender is preferred
    assert all(len(head) == 12 for head, _ in parts_got)
    split_packets = [head + rest for head, rest in parts_got]
    # same rewriting as the one-part path, apart from each slot's own random numbering
    for a, b in zip(whole_down.packets, split_packets, strict=True):
        assert a[0:2] == b[0:2] and a[8:] == b[8:]
    lost = parse_rtp(split_packets[1]).sequence_number
    split.retransmit([lost])
    assert parts_got[-1][0] + parts_got[-1][1] == split_packets[1]
    assert source.metrics.bytes_forwarded == sum(len(p) for p in whole_down.packets) * 2


def _nack_times(source: SourceStream, up: Sink, until: float) -> list[float]:
    times = []
    for k in range(int(until / 0.05) + 1):
        n = len(up.packets)
        source.send_nacks(now=k * 0.05)
        if len(up.packets) > n:
            times.append(round(k * 0.05, 2))
    return times


def test_upstream_nacks_back_off_and_a_late_repair_is_still_taken() -> None:
    source, up = make_source()
    slot, down = make_slot()
    slot.attach(source)
    source.handle_rtp(rtp_packet(1, 0, KEY), now=0.0)
    source.handle_rtp(rtp_packet(3, 6000, DELTA), now=0.0)  # 2 lost
    assert _nack_times(source, up, 0.4) == [0.0, 0.05, 0.15, 0.35]
    # a publisher 400 ms away repairs after the last NACK: still forwarded, in its place
    source.handle_rtp(rtp_packet(50, 0, b"\x00\x02" + DELTA, ssrc=1112, pt=98), now=0.4)
    assert len(down.packets) == 3 and down.packets[-1][12 + 8 :] == DELTA
    assert (
        parse_rtp(down.packets[-1]).sequence_number
        == (parse_rtp(down.packets[0]).sequence_number + 1) & 0xFFFF
    )
    # a loss is given up after MISSING_GIVE_UP: its repair is then too late
    source.handle_rtp(rtp_packet(5, 12000, DELTA), now=0.0)  # 4 lost
    assert _nack_times(source, up, 1.1) == [0.0, 0.05, 0.15, 0.35]
    assert source.missing == {}
    source.handle_rtp(rtp_packet(51, 0, b"\x00\x04" + DELTA, ssrc=1112, pt=98), now=1.1)
    assert len(down.packets) == 4


def test_a_repair_cannot_move_the_stream() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    source.handle_rtp(rtp_packet(1, 0, KEY), now=0.0)
    # RTX naming a packet that is not missing, far ahead or just ahead: dropped
    source.handle_rtp(rtp_packet(50, 0, b"\x75\x30" + DELTA, ssrc=1112, pt=98), now=0.01)
    source.handle_rtp(rtp_packet(51, 0, b"\x00\x02" + DELTA, ssrc=1112, pt=98), now=0.01)
    assert len(down.packets) == 1 and source.unwrapper.highest == 1
    source.handle_rtp(rtp_packet(2, 3000, DELTA), now=0.02)
    assert len(down.packets) == 2 and not source.missing


def test_a_sender_that_restarts_its_numbering_is_followed_after_two_packets() -> None:
    source, up = make_source()
    slot, down = make_slot()
    slot.attach(source)
    for i in range(3):
        source.handle_rtp(rtp_packet(100 + i, 3000 * i, DELTA if i else KEY), now=0.0)
    # one stray number far ahead (RFC 3550 Appendix A.1: MAX_DROPOUT) or behind: dropped, and
    # the stream goes on as before
    source.handle_rtp(rtp_packet(40000, 0, KEY), now=0.01)
    source.handle_rtp(rtp_packet((100 - 5000) & 0xFFFF, 0, KEY), now=0.01)
    source.handle_rtp(rtp_packet(103, 9000, DELTA), now=0.02)
    assert len(down.packets) == 4 and not source.missing
    last = parse_rtp(down.packets[-1]).sequence_number
    # the numbering restarts at 40000: the next packet in sequence confirms the jump, and the
    # slot restarts from a keyframe, its own numbering continuous
    for i in range(3):
        source.handle_rtp(rtp_packet(40000 + i, 777000 + 3000 * i, DELTA), now=0.1)
    assert len(down.packets) == 4 and source.pli_pending and not slot.started
    source.handle_rtp(rtp_packet(40003, 786000, KEY), now=0.2)
    source.handle_rtp(rtp_packet(40004, 789000, DELTA), now=0.23)
    seqs = [parse_rtp(p).sequence_number for p in down.packets[4:]]
    assert seqs == [(last + 1) & 0xFFFF, (last + 2) & 0xFFFF]
    assert not source.missing  # 40000-40002 were before the restart point, not losses


def _padded(seq: int, payload: bytes, padding: bytes) -> bytes:
    packet = bytearray(rtp_packet(seq, seq * 3000, payload) + padding)
    packet[0] |= 0x20
    return bytes(packet)


def test_padding_is_checked_and_never_taken_for_payload() -> None:
    from aiortc.rtp import RtpPacket

    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    # padding-only (as senders probe bandwidth) whose bytes look like a keyframe start
    source.handle_rtp(_padded(1, b"", b"\x10\x10\x00\x04"), now=0.0)
    assert not slot.started and source.keyframes == 0
    source.handle_rtp(rtp_packet(2, 0, KEY), now=0.0)
    # RFC 3550 §5.1: the count includes itself, so 0 is malformed, as is more than the payload
    source.handle_rtp(_padded(3, DELTA, b"\x00"), now=0.0)
    source.handle_rtp(_padded(4, DELTA, b"\x00\xc8"), now=0.0)
    assert len(down.packets) == 1
    source.handle_rtp(_padded(5, DELTA, bytes(99) + b"\x64"), now=0.0)
    forwarded = RtpPacket.parse(down.packets[-1])  # as the subscriber's stack reads it
    assert forwarded.padding_size == 100 and forwarded.payload == DELTA
    [(_, sr)] = source.handle_sender_report(1 << 40, 0, now=1.0)
    [report] = rtcp.parse_rtcp(sr)
    assert isinstance(report, rtcp.RtcpSrPacket)
    assert report.sender_info.octet_count == len(KEY) + len(DELTA)  # without padding (§6.4.1)


def test_retransmissions_are_counted_in_the_sender_report() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    for i in range(3):
        source.handle_rtp(rtp_packet(100 + i, 3000 * i, KEY), now=0.0)
    slot.retransmit([parse_rtp(down.packets[1]).sequence_number], now=0.5)
    assert len(down.packets) == 4
    [(_, sr)] = source.handle_sender_report(1 << 40, 0, now=1.0)
    [report] = rtcp.parse_rtcp(sr)
    assert isinstance(report, rtcp.RtcpSrPacket)
    # RFC 3550 §6.4.1: every RTP data packet transmitted, a retransmission on the SSRC too
    assert report.sender_info.packet_count == 4
    assert report.sender_info.octet_count == 4 * len(KEY)
    assert slot.metrics.retransmissions_sent == 1


def test_nacks_cannot_multiply_the_output() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    for i in range(20):
        source.handle_rtp(rtp_packet(100 + i, 3000 * i, KEY), now=0.0)
    wanted = [parse_rtp(p).sequence_number for p in down.packets[:17]]
    slot.retransmit(wanted * 330, now=1.0)  # 330 FCIs naming the same 17 packets
    assert down.packets[20:] == down.packets[:17]
    slot.retransmit(wanted, now=1.0 + 0.04)  # asked again within RESEND_INTERVAL: not resent
    assert len(down.packets) == 37
    slot.retransmit(wanted[:2], now=1.0 + 0.06)
    assert down.packets[37:] == down.packets[:2]
    assert slot.metrics.retransmissions_sent == 19
