"""What a participant holding valid keys and a valid token can make the SFU do, and what not.

Each test asserts counts or state, not time: the CPU each case cost before and after its fix is
in the change's report, not here.
"""

from __future__ import annotations

import json
import re
import struct
from types import SimpleNamespace
from typing import Any

import aiohttp
import pylibsrtp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtpCodecParameters,
    RTCRtpDecodingParameters,
    RTCRtpReceiveParameters,
)
from aiortc.rtp import pack_remb_fci

from sfu import aiortc_hooks, rtcp
from sfu import room as room_module
from sfu.aiortc_hooks import (
    MAX_RTCP_ONLY_STREAMS,
    MAX_RTP_STREAMS,
    MAX_UNUSED_RTP_STREAMS,
    hook_transport,
)
from sfu.config import SFUConfig
from sfu.forwarding import CACHE_SIZE, SR_INTERVAL, SourceStream
from sfu.metrics import Metrics
from sfu.room import MAX_REFUSED_ANSWERS, NACK_SEQS_BURST, Participant, Room
from sfu.rtp import URI_MID
from tests.sfu.conftest import send_nothing
from tests.sfu.harness import Harness, wait_until
from tests.sfu.test_fast_path import _Connection, _session, _transport, _unused
from tests.sfu.test_forwarding import DELTA, KEY, Sink, make_slot, make_source, rtp_packet
from tests.sfu.test_signalling import _joined, running

# --- libsrtp streams (finding: a stream per fresh SSRC, for good) ---------------------------------


def _rtp(seq: int, ssrc: int) -> bytes:
    return struct.pack("!BBHII", 0x80, 96, seq, seq * 3000, ssrc) + bytes(40)


def _rr(sender_ssrc: int) -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, sender_ssrc)


def _has_stream(session: pylibsrtp.Session, ssrc: int) -> bool:
    """Whether libsrtp holds a stream for `ssrc` in `session` (found by removing it)."""
    try:
        session.remove_stream(ssrc)
    except pylibsrtp.Error:
        return False
    return True


def _hooked_with(uses_ssrc: Any) -> tuple[_Connection, Any, list[bytes], list[bytes]]:
    connection = _Connection()
    transport = _transport(connection)
    got: list[bytes] = []
    rtcp_got: list[bytes] = []
    hook_transport(
        transport,
        _unused,
        _unused,
        lambda data, arrival: got.append(data),
        rtcp_got.append,
        uses_ssrc=uses_ssrc,
    )
    return connection, transport, got, rtcp_got


def test_rtp_under_ssrcs_the_sfu_does_not_take_leaves_no_srtp_stream_behind() -> None:
    connection, transport, got, _ = _hooked_with({1234}.__contains__)
    tx = _session(True)
    receive = connection._protocols[0].datagram_received
    receive(tx.protect(_rtp(1, 1234)), ("x", 1))
    fresh = range(0x20000000, 0x20000000 + 2000)
    for ssrc in fresh:
        receive(tx.protect(_rtp(1, ssrc)), ("x", 1))
    # every authentic packet still reached the SFU, which decides what it forwards
    assert len(got) == 1 + len(fresh)
    # the stream the SFU takes is kept: its replay protection holds
    replayed = tx.protect(_rtp(2, 1234))
    receive(replayed, ("x", 1))
    receive(replayed, ("x", 1))
    assert len(got) == 2 + len(fresh)
    rx = transport._rx_srtp
    kept = [ssrc for ssrc in fresh if _has_stream(rx, ssrc)]
    assert len(kept) <= MAX_UNUSED_RTP_STREAMS and set(kept) <= set(fresh[-MAX_UNUSED_RTP_STREAMS:])
    assert _has_stream(rx, 1234)


def test_an_ssrc_the_sfu_comes_to_take_keeps_its_stream_across_a_sequence_number_wrap() -> None:
    # Its first packets came before the SFU took it (its parameters arrive after DTLS): a
    # stream removed then and made afresh later would lack the rollover count after the wrap.
    in_use: set[int] = set()
    connection, transport, got, _ = _hooked_with(in_use.__contains__)
    tx = _session(True)
    receive = connection._protocols[0].datagram_received
    receive(tx.protect(_rtp(65000, 777)), ("x", 1))  # not taken yet
    for ssrc in range(0x20000000, 0x20000000 + MAX_UNUSED_RTP_STREAMS // 4):
        receive(tx.protect(_rtp(1, ssrc)), ("x", 1))  # a few others meanwhile
    in_use.add(777)
    for seq in range(65001, 65536 + 700):
        packet = tx.protect(_rtp(seq & 0xFFFF, 777))
        if seq >= 65536 + 600:  # the ones between were lost: the next to come is past the wrap
            receive(packet, ("x", 1))
    # every packet of 777 that came authenticated
    assert sum(1 for data in got if int.from_bytes(data[8:12], "big") == 777) == 1 + 100


def test_rtp_streams_of_ssrcs_the_sfu_no_longer_takes_are_removed() -> None:
    # A publisher that restarts its stream under a new SSRC again and again (each adopted by
    # its mid): only the SSRC in use, and at most MAX_RTP_STREAMS in all, keep a stream.
    in_use: set[int] = set()
    connection, transport, got, _ = _hooked_with(in_use.__contains__)
    tx = _session(True)
    restarts = range(5000, 5000 + 3 * MAX_RTP_STREAMS)
    for ssrc in restarts:
        in_use.clear()
        in_use.add(ssrc)
        connection._protocols[0].datagram_received(tx.protect(_rtp(1, ssrc)), ("x", 1))
    assert len(got) == len(restarts)
    kept = [ssrc for ssrc in restarts if _has_stream(transport._rx_srtp, ssrc)]
    assert restarts[-1] in kept and len(kept) <= MAX_RTP_STREAMS


def test_rtcp_under_fresh_sender_ssrcs_keeps_a_bounded_number_of_srtp_streams() -> None:
    connection, transport, _, rtcp_got = _hooked_with(None)
    tx = _session(True)
    senders = range(9000, 9000 + MAX_RTCP_ONLY_STREAMS + 500)
    for ssrc in senders:
        connection._protocols[0].datagram_received(tx.protect_rtcp(_rr(ssrc)), ("x", 1))
    assert len(rtcp_got) == len(senders)  # all of them handled
    # a kept sender's replay protection holds
    replayed = tx.protect_rtcp(_rr(senders[0]))
    connection._protocols[0].datagram_received(replayed, ("x", 1))
    connection._protocols[0].datagram_received(replayed, ("x", 1))
    assert len(rtcp_got) == len(senders) + 1
    kept = [ssrc for ssrc in senders if _has_stream(transport._rx_srtp, ssrc)]
    assert kept == list(senders[:MAX_RTCP_ONLY_STREAMS])


def test_a_renewed_slot_ssrc_leaves_no_srtp_stream_behind() -> None:
    # a member who leaves and rejoins again and again renews every other member's slot SSRCs
    session = _session(True)
    sender = SimpleNamespace(
        _ssrc=4321, _rtx_ssrc=4322, transport=SimpleNamespace(_tx_srtp=session)
    )
    session.protect(_rtp(1, 4321))
    session.protect(_rtp(1, 4322))  # a retransmission under the RTX SSRC
    aiortc_hooks.renew_sender_ssrc(sender)  # type: ignore[arg-type]
    assert sender._ssrc != 4321
    assert not _has_stream(session, 4321)
    assert not _has_stream(session, 4322)
    aiortc_hooks.renew_sender_ssrc(sender)  # type: ignore[arg-type]  # nothing sent: no error


async def test_the_sfu_keeps_srtp_streams_only_for_the_ssrcs_it_forwards() -> None:
    """End to end: a publisher's packets under fresh SSRCs leave a bounded few streams in the
    SFU's SRTP session, while a restart announced by the mid extension is still followed."""
    harness = Harness()
    await harness.start()
    try:
        pub = await harness.join("pub")
        participant = harness.server.rooms["room"].participants["pub"]
        assert await wait_until(lambda: len(participant.sources) == 2, timeout=10)
        audio = next(s for s in participant.sources.values() if s.kind == "audio")
        assert await wait_until(lambda: audio.received > 0, timeout=10)
        dtls = pub.client.pc.getTransceivers()[0].sender.transport
        fresh = list(range(0x30000000, 0x30000000 + 300))
        for ssrc in fresh:
            await dtls._send_rtp(rtp_packet(1, 0, b"opus", ssrc=ssrc, pt=audio.payload_type))
        mid_id = next(i for i, uri in audio.ext_uris.items() if uri == URI_MID)
        restarted = 0x40000000
        packet = rtp_packet(
            7, 0, b"opus", ssrc=restarted, pt=audio.payload_type, ext=[(mid_id, audio.mid.encode())]
        )
        await dtls._send_rtp(packet)
        assert await wait_until(lambda: audio.ssrc == restarted, timeout=5)
        rx = participant.pc.getTransceivers()[0].receiver.transport._rx_srtp
        assert _has_stream(rx, restarted)
        assert sum(_has_stream(rx, ssrc) for ssrc in fresh) <= MAX_UNUSED_RTP_STREAMS
    finally:
        await harness.stop()


# --- sender reports (finding: every SR of a compound to every slot) -------------------------------


def _started_slots(source: SourceStream, count: int) -> list[tuple[Any, Sink]]:
    slots = []
    for i in range(count):
        slot, down = make_slot(subscriber=f"s{i}")
        slot.ssrc = 7000 + i
        slot.attach(source)
        slots.append((slot, down))
    source.handle_rtp(rtp_packet(1, 0, KEY), now=0.0)
    for _, down in slots:
        down.packets.clear()
    return slots


def _srs(packets: list[bytes]) -> list[rtcp.RtcpSrPacket]:
    """The SRs among what a slot sent (RTP too)."""
    return [
        p
        for data in packets
        if data[1] == rtcp.RTCP_SR
        for p in rtcp.parse_rtcp(data)
        if isinstance(p, rtcp.RtcpSrPacket)
    ]


async def test_a_compound_of_many_sender_reports_reaches_each_subscriber_once() -> None:
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    pub = Participant(room, "pub", ["video"], send_nothing, config, room.metrics)
    try:
        source, _ = make_source()
        pub.sources_by_ssrc[source.ssrc] = source
        slots = _started_slots(source, 3)
        sr = struct.pack("!BBHIQIII", 0x80, 200, 6, source.ssrc, 1 << 32, 0, 0, 0)
        pub.on_rtcp_now(sr * 47)
        assert [len(_srs(down.packets)) for _, down in slots] == [1, 1, 1]
    finally:
        await pub.close()
        await room.close()


async def test_a_sender_report_of_the_rtx_stream_is_not_taken_for_the_media_streams() -> None:
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    pub = Participant(room, "pub", ["video"], send_nothing, config, room.metrics)
    try:
        source, _ = make_source()  # RTX SSRC 1112
        assert source.rtx_ssrc is not None
        pub.sources_by_ssrc[source.ssrc] = pub.sources_by_ssrc[source.rtx_ssrc] = source
        slots = _started_slots(source, 2)
        rtx_sr = struct.pack("!BBHIQIII", 0x80, 200, 6, source.rtx_ssrc, 5 << 32, 0, 0, 0)
        pub.on_rtcp_now(rtx_sr)
        assert [len(_srs(down.packets)) for _, down in slots] == [0, 0]
        assert source.last_sr != (5 << 16) & 0xFFFFFFFF  # the RR's LSR is not the RTX SR's
        media_sr = struct.pack("!BBHIQIII", 0x80, 200, 6, source.ssrc, 6 << 32, 0, 0, 0)
        pub.on_rtcp_now(media_sr)
        assert [len(_srs(down.packets)) for _, down in slots] == [1, 1]
        assert source.last_sr == (6 << 16) & 0xFFFFFFFF
    finally:
        await pub.close()
        await room.close()


def test_sender_reports_are_forwarded_at_most_once_per_interval_the_newest_last() -> None:
    source, _ = make_source()
    slots = _started_slots(source, 2)
    assert len(source.handle_sender_report(1 << 32, 100, now=1.0)) == 2
    for k in range(2, 50):  # a flood within the interval: held, the newest wins
        assert source.handle_sender_report(k << 32, 100 * k, now=1.0 + k / 1000) == []
    source.tick(now=1.0 + SR_INTERVAL / 2)
    assert [len(_srs(down.packets)) for _, down in slots] == [0, 0]
    source.tick(now=1.0 + SR_INTERVAL)
    for _, down in slots:
        [held] = _srs(down.packets)
        assert held.sender_info.ntp_timestamp == 49 << 32
    source.tick(now=5.0)  # nothing held any more
    assert [len(_srs(down.packets)) for _, down in slots] == [1, 1]
    # the RR's LSR follows every SR, forwarded or not
    source.handle_sender_report(77 << 32, 0, now=5.1)
    assert source.last_sr == (77 << 16) & 0xFFFFFFFF
    # a stream restarted under a new SSRC gets its mapping at once; a held SR of the old is
    # dropped (its timestamps are the old stream's)
    source.restart(2222)
    source.handle_rtp(rtp_packet(9, 0, KEY, ssrc=2222), now=5.2)
    assert len(source.handle_sender_report(78 << 32, 0, now=5.2)) == 2
    source.tick(now=9.0)
    assert [len(_srs(down.packets)) for _, down in slots] == [1, 1]


# --- subscriber feedback (finding: unbounded NACK expansion, repeated REMB SSRCs) -----------------





def _nack(media_ssrc: int, fci: list[tuple[int, int]]) -> bytes:
    body = struct.pack("!II", 5, media_ssrc) + b"".join(struct.pack("!HH", *e) for e in fci)
    return rtcp._header(rtcp.RTCP_RTPFB, rtcp.RTPFB_NACK, len(body)) + body


def _fed_slot(participant: Participant, packets: int = CACHE_SIZE + 100) -> Any:
    source, _ = make_source()
    slot, down = make_slot(metrics=participant.metrics)
    slot.attach(source)
    for seq in range(packets):
        source.handle_rtp(rtp_packet(seq, seq * 3000, KEY if seq == 0 else DELTA), now=0.0)
    participant.slots_by_ssrc[slot.ssrc] = slot
    return slot, down


async def test_a_nack_naming_thousands_of_seqs_looks_at_most_at_the_cache_depth(
    sub: Participant,
) -> None:
    slot, down = _fed_slot(sub)
    newest = slot.last_out_seq & 0xFFFF
    # 335 entries of 17 numbers each (5,695, all of a 1,352-byte packet), spread behind the
    # newest number sent, all distinct
    fci = [((newest - 17 * i) & 0xFFFF, 0xFFFF) for i in range(335)]
    assert len(rtcp.NackPacket.parse(_nack(slot.ssrc, fci)[4:]).lost) == 335 * 17
    sent = len(down.packets)
    sub.on_rtcp_now(_nack(slot.ssrc, fci))
    assert 0 < sub.metrics.nacks_received <= CACHE_SIZE
    assert 0 < len(down.packets) - sent <= CACHE_SIZE  # repairs still go out (budgeted)
    # the same entry 335 times: looked at once
    before = sub.metrics.nacks_received
    sub.on_rtcp_now(_nack(slot.ssrc, [((newest - 40) & 0xFFFF, 0xFFFF)] * 335))
    assert sub.metrics.nacks_received - before == 17


async def test_a_participants_nacks_look_at_a_bounded_number_of_seqs_a_second(
    sub: Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(room_module.time, "monotonic", lambda: clock[0])
    sub._nack_budget = room_module.TokenBucket(
        room_module.NACK_SEQS_RATE, NACK_SEQS_BURST, clock[0]
    )
    slot, _ = _fed_slot(sub)
    newest = slot.last_out_seq & 0xFFFF
    flood = _nack(slot.ssrc, [((newest - 17 * i) & 0xFFFF, 0xFFFF) for i in range(30)])
    for _ in range(100):
        sub.on_rtcp_now(flood)
    assert NACK_SEQS_BURST - 17 * 30 < sub.metrics.nacks_received <= NACK_SEQS_BURST
    clock[0] += 0.5  # half a second refills half the rate
    before = sub.metrics.nacks_received
    for _ in range(100):
        sub.on_rtcp_now(flood)
    assert 0 < sub.metrics.nacks_received - before <= room_module.NACK_SEQS_RATE / 2


def test_nack_numbers_near_the_newest_are_found_across_the_wrap() -> None:
    nack = rtcp.NackPacket.parse(
        _nack(1, [(65530, 0b1000_0000_0000_0101), (3, 0b1), (40000, 0xFFFF), (10, 0)])[4:]
    )
    # 65530, 65531, 65533, 65530+16 = 10 (ahead of the newest: not sent yet), 3, 4
    seqs, looked = nack.seqs(newest=5, depth=CACHE_SIZE, limit=CACHE_SIZE)
    assert seqs == [65530, 65531, 65533, 3, 4] and looked == 5
    assert nack.seqs(newest=5, depth=CACHE_SIZE, limit=2) == ([65530, 65531], 2)


async def test_a_remb_naming_one_slot_255_times_is_relayed_once(
    sub: Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = make_source()
    slot, _ = make_slot()
    slot.attach(source)
    sub.slots_by_ssrc[slot.ssrc] = slot
    relayed: list[float] = []
    monkeypatch.setattr(source, "relay_remb", relayed.append)
    body = struct.pack("!II", 5, 0) + pack_remb_fci(1_000_000, [slot.ssrc] * 255)
    sub.on_rtcp_now(rtcp._header(rtcp.RTCP_PSFB, rtcp.PSFB_APP, len(body)) + body)
    assert len(relayed) == 1 and slot.remb is not None and slot.remb[0] == 1_000_000
    assert sub.metrics.rembs_received == 1


def test_other_rtp_feedback_is_not_expanded_as_nack() -> None:
    # transport-wide CC (RTPFB FMT 15): aiortc's parser would expand its bytes as NACK entries
    body = struct.pack("!II", 5, 1) + bytes(1300)
    assert (
        rtcp.parse_rtcp(struct.pack("!BBH", 0x80 | 15, rtcp.RTCP_RTPFB, len(body) // 4) + body)
        == []
    )


# --- upstream NACK only where negotiated ----------------------------------------------------------


def _publish_params(mime: str, pt: int, feedback: list[RTCRtcpFeedback]) -> RTCRtpReceiveParameters:
    codec = RTCRtpCodecParameters(
        mimeType=mime,
        clockRate=48000 if mime == "audio/opus" else 90000,
        channels=2 if mime == "audio/opus" else None,
        payloadType=pt,
        rtcpFeedback=feedback,
    )
    return RTCRtpReceiveParameters(
        codecs=[codec],
        muxId="0" if mime == "audio/opus" else "1",
        encodings=[RTCRtpDecodingParameters(ssrc=1000 + pt, payloadType=pt)],
    )


async def test_nacks_go_upstream_only_for_streams_that_negotiated_them() -> None:
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    pub = Participant(room, "pub", ["audio", "video"], send_nothing, config, room.metrics)
    upstream: list[bytes] = []
    pub._send_raw = upstream.append
    try:
        # as aiortc and browsers negotiate them: Opus without feedback, VP8 with NACK
        opus = _publish_params("audio/opus", 111, [])
        vp8 = _publish_params(
            "video/VP8",
            97,
            [RTCRtcpFeedback(type="nack"), RTCRtcpFeedback(type="nack", parameter="pli")],
        )
        pub._on_publish_params(SimpleNamespace(kind="audio"), opus)  # type: ignore[arg-type]
        pub._on_publish_params(SimpleNamespace(kind="video"), vp8)  # type: ignore[arg-type]
        audio, video = pub.sources["0"], pub.sources["1"]
        for source, payload in ((audio, b"opus"), (video, KEY)):
            for seq in (1, 2, 5):  # 3 and 4 lost
                data = rtp_packet(seq, seq * 960, payload, ssrc=source.ssrc, pt=source.payload_type)
                source.handle_rtp(data, now=0.0)
            source.tick(now=0.01)
        nacked = {
            p.media_ssrc: sorted(p.lost)
            for data in upstream
            for p in rtcp.parse_rtcp(data)
            if isinstance(p, rtcp.NackPacket)
        }
        assert nacked == {video.ssrc: [3, 4]}
        # the audio source still takes a late packet it did not NACK
        audio.handle_rtp(rtp_packet(3, 3 * 960, b"opus", ssrc=audio.ssrc, pt=111), now=0.02)
        assert audio.received == 4
    finally:
        await pub.close()
        await room.close()


# --- answers (findings: parsed before cheap checks; a publishing m-line without a=ssrc) -----------


async def _first_offer(participant: Participant) -> str:
    offers: list[dict] = []

    async def capture(message: dict) -> None:
        offers.append(message)

    participant.send_json = capture
    await participant.start()
    [offer] = offers
    return offer["sdp"]


async def _answer_to(offer: str, send_audio: bool) -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    if send_audio:
        pc.addTrack(AudioStreamTrack())
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc, pc.localDescription.sdp


async def test_answers_are_refused_by_cheap_checks_first_and_only_a_few_are_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = SFUConfig(token_secret=b"x" * 16)
    room = Room("r", config, Metrics())
    pub = Participant(room, "pub", ["audio"], send_nothing, config, room.metrics)
    parses: list[str] = []
    parse = room_module.SessionDescription.parse

    def counting_parse(sdp: str) -> Any:
        parses.append(sdp)
        return parse(sdp)

    pc = None
    try:
        offer = await _first_offer(pub)
        pc, answer = await _answer_to(offer, send_audio=True)
        monkeypatch.setattr(room_module.SessionDescription, "parse", counting_parse)
        # two m-lines for one offered: refused without parsing either description
        m = answer.index("m=")
        two = answer + answer[m:]
        for _ in range(2):
            with pytest.raises(room_module.SignallingError, match="one m-line per offered"):
                await pub.handle_answer(two)
        assert parses == []
        # parsable, the right m-lines, refused (no fingerprint): every refusal counts, and
        # after MAX_REFUSED_ANSWERS of them no answer to this offer is parsed
        no_fingerprint = re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", answer)
        for _ in range(50):
            with pytest.raises(room_module.SignallingError):
                await pub.handle_answer(no_fingerprint)
        assert len(parses) == MAX_REFUSED_ANSWERS - 2
        with pytest.raises(room_module.SignallingError, match="no more are read"):
            await pub.handle_answer(answer)
        assert pub._negotiating  # nothing was taken
    finally:
        if pc is not None:
            await pc.close()
        await pub.close()
        await room.close()


async def _answer_without_ssrc(
    ws: aiohttp.ClientWebSocketResponse, name: str, send_audio: bool
) -> tuple[RTCPeerConnection, str]:
    """Join as `name` publishing audio, and answer the SFU's offer with the `a=ssrc` lines
    taken out; returns the client's connection and its genuine answer."""
    await _joined(ws, name, ["audio"])
    offer = await ws.receive_json(timeout=5)
    pc, answer = await _answer_to(offer["sdp"], send_audio=send_audio)
    no_ssrc = re.sub(r"a=ssrc(-group)?:[^\r\n]*\r\n", "", answer)
    await ws.send_str(json.dumps({"type": "answer", "sdp": no_ssrc}))
    return pc, answer


async def test_an_answer_sending_on_a_publishing_m_line_without_an_ssrc_is_refused() -> None:
    async with running() as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            pc, answer = await _answer_without_ssrc(ws, "pub", send_audio=True)
            reply = await ws.receive_json(timeout=5)
            assert reply["code"] == "bad-sdp" and "names no SSRC" in reply["message"], reply
            # nothing was taken from it: the genuine answer connects and is forwarded from
            await ws.send_str(json.dumps({"type": "answer", "sdp": answer}))
            [participant] = h.server.rooms["room"].participants.values()
            assert await wait_until(lambda: participant.connected, timeout=10)
            assert await wait_until(lambda: len(participant.sources) == 1, timeout=5)
            await pc.close()


async def test_an_answer_not_sending_on_its_publishing_m_line_needs_no_ssrc() -> None:
    async with running() as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            pc, answer = await _answer_without_ssrc(ws, "quiet", send_audio=False)
            assert "a=inactive" in answer
            await ws.send_str('{"type": "dance"}')  # its reply comes after the answer's, if any
            reply = await ws.receive_json(timeout=5)
            assert reply["code"] == "unknown-type", reply
            await pc.close()
