"""RTCP semantics (RFC 3550 §6.4): SRs mapped per subscriber, the SFU's RRs field by field."""

from __future__ import annotations

import random
import struct

from sfu import rtcp
from sfu.forwarding import SourceStream
from sfu.rtp import parse_rtp
from tests.sfu.test_forwarding import DELTA, KEY, make_slot, make_source, rtp_packet


def _sr(data: bytes) -> rtcp.RtcpSrPacket:
    [packet] = rtcp.parse_rtcp(data)
    assert isinstance(packet, rtcp.RtcpSrPacket)
    return packet


def _block(source: SourceStream, now: float) -> rtcp.ReportBlock:
    block = source.report_block(now)
    assert block is not None
    return block


# --- sender reports to subscribers (§6.4.1) ------------------------------------------------------


def test_sender_reports_follow_the_slots_timestamp_offset_across_source_changes() -> None:
    a, _ = make_source(ssrc=1000)
    b, _ = make_source(ssrc=2000)
    slot, down = make_slot()
    slot.attach(a)
    a.handle_rtp(rtp_packet(1, 5000, KEY, ssrc=1000), now=0.0)
    a.handle_rtp(rtp_packet(2, 8000, DELTA, ssrc=1000), now=0.033)
    [(_, sr)] = a.handle_sender_report(0x11 << 32, 8000 + 900, now=0.05)
    out_ts = parse_rtp(down.packets[-1]).timestamp
    assert _sr(sr).sender_info.rtp_timestamp == (out_ts + 900) & 0xFFFFFFFF
    slot.attach(b)
    # b's SR before the slot started on b: no mapping exists yet, nothing is sent
    assert b.handle_sender_report(0x22 << 32, 777, now=0.1) == []
    b.handle_rtp(rtp_packet(7, 4_000_000_000, KEY, ssrc=2000), now=0.2)
    assert a.handle_sender_report(0x11 << 32, 0, now=0.25) == []  # a no longer feeds the slot
    [(_, sr)] = b.handle_sender_report(0x22 << 32, 4_000_000_000 + 500_000_000, now=0.3)
    out_ts = parse_rtp(down.packets[-1]).timestamp
    report = _sr(sr)
    assert report.ssrc == 7777 and report.sender_info.ntp_timestamp == 0x22 << 32
    assert report.sender_info.rtp_timestamp == (out_ts + 500_000_000) & 0xFFFFFFFF  # wraps
    # what this subscriber got: 3 packets (of 3 sent upstream, one before the change)
    assert report.sender_info.packet_count == 3
    assert report.sender_info.octet_count == 2 * len(KEY) + len(DELTA)
    # the publisher restarts under a new SSRC: the next SR maps with the slot's new offset
    b.restart(3000)
    assert b.handle_sender_report(0x33 << 32, 0, now=0.4) == []
    b.handle_rtp(rtp_packet(50, 123, KEY, ssrc=3000), now=0.5)
    [(_, sr)] = b.handle_sender_report(0x33 << 32, 123 + 90, now=0.6)
    out_ts = parse_rtp(down.packets[-1]).timestamp
    assert _sr(sr).sender_info.rtp_timestamp == (out_ts + 90) & 0xFFFFFFFF


def test_sender_report_counts_are_per_subscriber() -> None:
    source, _ = make_source()
    early, _ = make_slot()
    late, _ = make_slot()
    late.ssrc = 8888
    early.attach(source)
    source.handle_rtp(rtp_packet(1, 0, KEY), now=0.0)
    source.handle_rtp(rtp_packet(2, 3000, DELTA), now=0.0)
    late.attach(source)
    source.handle_rtp(rtp_packet(3, 6000, DELTA), now=0.0)  # late waits for a keyframe
    source.handle_rtp(rtp_packet(4, 9000, KEY), now=0.0)
    counts = {
        _sr(sr).ssrc: (_sr(sr).sender_info.packet_count, _sr(sr).sender_info.octet_count)
        for _, sr in source.handle_sender_report(1 << 32, 9000, now=1.0)
    }
    assert counts == {
        7777: (4, 2 * len(KEY) + 2 * len(DELTA)),
        8888: (1, len(KEY)),
    }


# --- receiver reports to publishers (§6.4.2, Appendix A.3, A.8) ----------------------------------


def test_loss_fields_and_extended_highest_sequence_across_a_wrap() -> None:
    source, _ = make_source("audio")
    lost = {3, 4, 12}
    for i in range(20):
        if i not in lost:
            source.handle_rtp(rtp_packet((65530 + i) & 0xFFFF, i * 960, b"x", pt=111), now=i * 0.02)
    block = _block(source, now=1.0)
    # A.3: 20 expected, 17 received: fraction = (3 << 8) // 20 = 38
    assert (block.fraction_lost, block.packets_lost) == (38, 3)
    assert block.highest_sequence == (1 << 16) | 13  # one cycle, then 13
    for i in range(20, 40):  # no loss in this interval
        source.handle_rtp(rtp_packet((65530 + i) & 0xFFFF, i * 960, b"x", pt=111), now=i * 0.02)
    block = _block(source, now=2.0)
    assert (block.fraction_lost, block.packets_lost) == (0, 3)
    assert block.highest_sequence == (1 << 16) | 33
    # a late packet: the cumulative count goes down, the fraction never below 0
    source.handle_rtp(rtp_packet(65533, 3 * 960, b"x", pt=111), now=2.1)
    block = _block(source, now=3.0)
    assert (block.fraction_lost, block.packets_lost) == (0, 2)


def test_report_block_wire_format_clamps_cumulative_loss_to_24_signed_bits() -> None:
    def fields(lost: int) -> tuple[int, int]:
        data = bytes(rtcp.ReportBlock(1, 200, lost, 0x1_0005, 77, 0xAABBCCDD, 65536))
        _, word, ext, jitter, lsr, dlsr = struct.unpack("!IIIIII", data)
        assert (ext, jitter, lsr, dlsr) == (0x1_0005, 77, 0xAABBCCDD, 65536)
        return word >> 24, word & 0xFFFFFF

    assert fields(5) == (200, 5)
    assert fields(-3) == (200, 0xFFFFFD)
    assert fields(1 << 30) == (200, 0x7FFFFF)
    assert fields(-(1 << 30)) == (200, 0x800000)
    # and aiortc, as a publisher, reads them back
    rr = rtcp.pack_rr(9, [rtcp.ReportBlock(1, 25, -3, 70000, 12, 34, 56)])
    [packet] = rtcp.parse_rtcp(rr)
    assert isinstance(packet, rtcp.RtcpRrPacket)
    [report] = packet.reports
    assert (report.fraction_lost, report.packets_lost, report.highest_sequence) == (25, -3, 70000)
    assert (report.jitter, report.lsr, report.dlsr) == (12, 34, 56)


def test_jitter_matches_rfc3550_appendix_a8_in_timestamp_units() -> None:
    for kind, rate, step in (("audio", 48000, 960), ("video", 90000, 3000)):
        rng = random.Random(kind)
        source, _ = make_source(kind)
        pt = 111 if kind == "audio" else 97
        jitter = 0  # A.8, integer form: jitter scaled by 16
        transit_prior = None
        for i in range(300):
            arrival = i * step / rate + rng.uniform(0, 0.015)
            ts = 1000 + i * step
            source.handle_rtp(rtp_packet(i, ts, KEY, pt=pt), now=arrival)
            transit = arrival * rate - ts
            if transit_prior is not None:
                d = abs(transit - transit_prior)
                jitter += d - ((jitter + 8) / 16)
            transit_prior = transit
        expected = jitter / 16
        assert expected > 50  # the reference saw real jitter (several ms)
        assert abs(_block(source, now=10.0).jitter - expected) <= 2, kind


def test_lsr_and_dlsr_from_the_last_sender_report() -> None:
    source, _ = make_source("audio")
    assert (_block_after(source, 0.0).lsr, _block(source, 0.5).dlsr) == (0, 0)  # no SR yet
    ntp = 0x0123_4567_89AB_CDEF
    source.handle_sender_report(ntp, 0, now=2.0)
    block = _block(source, now=2.25)
    assert block.lsr == 0x4567_89AB  # middle 32 bits
    assert block.dlsr == 16384  # 0.25 s in 1/65536 s
    source.handle_sender_report(ntp + (3 << 32), 0, now=3.0)
    assert _block(source, now=4.5).lsr == 0x4567_89AB + (3 << 16)
    assert _block(source, now=4.5).dlsr == 98304


def _block_after(source: SourceStream, now: float) -> rtcp.ReportBlock:
    source.handle_rtp(rtp_packet(1, 0, b"x", pt=111), now=now)
    return _block(source, now)


def test_a_publisher_that_renumbers_keeps_its_last_sender_report() -> None:
    """A sequence restart on the same SSRC (Appendix A.1) resets the sequence statistics, not
    the SR the source sent: the next RR still gives LSR and DLSR, so the publisher can measure
    its round trip."""
    source, _ = make_source("audio")
    for i in range(5):
        source.handle_rtp(rtp_packet(100 + i, i * 960, b"x", pt=111), now=i * 0.02)
    ntp = 0x0000_1234_5678_0000
    source.handle_sender_report(ntp, 4 * 960, now=0.1)
    # the sender restarts its numbering: two packets in sequence confirm the jump
    source.handle_rtp(rtp_packet(40000, 5 * 960, b"x", pt=111), now=0.12)
    source.handle_rtp(rtp_packet(40001, 6 * 960, b"x", pt=111), now=0.14)
    block = _block(source, now=0.6)
    assert block.highest_sequence == 40001 and block.packets_lost == 0  # restarted
    assert block.lsr == 0x1234_5678
    assert block.dlsr == 32768
    # a restart under another SSRC is another source: no SR of it yet
    source.restart(5555)
    source.handle_rtp(rtp_packet(7, 0, b"x", pt=111, ssrc=5555), now=0.7)
    block = _block(source, now=0.8)
    assert (block.ssrc, block.lsr, block.dlsr) == (5555, 0, 0)
