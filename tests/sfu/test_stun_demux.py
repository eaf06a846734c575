"""RFC 7983 demultiplexing ahead of aioice's STUN parser (`sfu.aiortc_hooks.demultiplex_stun`).

aioice parses every datagram as STUN first; its parser checks no magic cookie, so an RTP packet
whose sequence number equals its length minus 20 reaches the attribute loop, and a known
attribute of the wrong length raises `struct.error`, which aioice does not catch.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

import aioice.ice
import aioice.stun
import pytest

from sfu import aiortc_hooks
from sfu.config import SFUConfig
from sfu.server import SFUServer
from tests.sfu.harness import Harness, wait_until

PRIORITY = 0x0024  # a known attribute: a 4-byte unsigned integer


class _Receiver:
    def __init__(self) -> None:
        self.data: list[tuple[bytes, int]] = []
        self.requests: list[aioice.stun.Message] = []

    def data_received(self, data: bytes, component: int) -> None:
        self.data.append((data, component))

    def request_received(self, message: aioice.stun.Message, addr: Any, protocol: Any) -> None:
        self.requests.append(message)


class _Candidate:
    component = 1


def _protocol() -> tuple[aioice.ice.StunProtocol, _Receiver]:
    receiver = _Receiver()
    protocol = aioice.ice.StunProtocol(receiver)  # type: ignore[arg-type]
    protocol.local_candidate = _Candidate()  # type: ignore[assignment]
    return protocol, receiver


def _rtp_that_looks_like_stun(length: int = 120) -> bytes:
    """V=2, PT 96, sequence number = length - 20 (STUN's length field), and at byte 20 (the
    first STUN attribute) a PRIORITY header with length 2."""
    header = bytes([0x80, 0x60]) + struct.pack("!H", length - 20) + bytes(range(16))
    attribute = struct.pack("!HH", PRIORITY, 2) + b"\x01\x02\x00\x00"
    return header + attribute + bytes(length - len(header) - len(attribute))


def _malformed_stun() -> bytes:
    """A binding request (first byte 0) with the magic cookie and a 2-byte PRIORITY."""
    attribute = struct.pack("!HH", PRIORITY, 2) + b"\x01\x02\x00\x00"
    return struct.pack("!HHI", 0x0001, len(attribute), 0x2112A442) + bytes(12) + attribute


@pytest.fixture
def stun_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiortc_hooks, "_stun_drops", {"last": -1e9, "quiet": 0})


def test_the_crafted_packets_break_aioices_own_parser() -> None:
    # the premise: without the hook these datagrams raise out of datagram_received
    for data in (_rtp_that_looks_like_stun(), _malformed_stun()):
        with pytest.raises(struct.error):
            aioice.stun.parse_message(data)


async def test_stock_handler_loses_rtp_that_looks_like_stun() -> None:
    protocol, receiver = _protocol()
    with pytest.raises(struct.error):
        aiortc_hooks._stock_stun_datagram_received(
            protocol, _rtp_that_looks_like_stun(), ("127.0.0.1", 9)
        )
    assert receiver.data == []


async def test_rtp_that_looks_like_stun_reaches_the_connection() -> None:
    protocol, receiver = _protocol()
    for length in (28, 120, 1200):
        packet = _rtp_that_looks_like_stun(length)
        aiortc_hooks._demultiplexed_datagram_received(protocol, packet, ("127.0.0.1", 9))
        assert receiver.data[-1] == (packet, 1)
    assert len(receiver.data) == 3


async def test_dtls_and_rtcp_skip_the_stun_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    protocol, receiver = _protocol()

    def no_parse(data: bytes) -> None:
        raise AssertionError("parsed as STUN")

    monkeypatch.setattr(aioice.stun, "parse_message", no_parse)
    dtls = bytes([22, 0xFE, 0xFD]) + bytes(30)  # RFC 7983: 20-63
    rtcp = bytes([0x80, 200]) + bytes(26)
    for data in (dtls, rtcp):
        aiortc_hooks._demultiplexed_datagram_received(protocol, data, ("127.0.0.1", 9))
    assert receiver.data == [(dtls, 1), (rtcp, 1)]


async def test_malformed_stun_is_dropped_with_one_warning(
    stun_drops: None, caplog: pytest.LogCaptureFixture
) -> None:
    protocol, receiver = _protocol()
    with caplog.at_level(logging.WARNING, logger="sfu.aiortc_hooks"):
        for _ in range(50):
            aiortc_hooks._demultiplexed_datagram_received(
                protocol, _malformed_stun(), ("192.0.2.7", 4242)
            )
    assert receiver.data == [] and receiver.requests == []
    warnings = [r for r in caplog.records if "malformed STUN" in r.getMessage()]
    assert len(warnings) == 1
    assert "192.0.2.7:4242" in warnings[0].getMessage()
    assert aiortc_hooks._stun_drops["quiet"] == 49
    assert not any(r.exc_info for r in caplog.records)


async def test_the_next_report_counts_the_quiet_drops(
    stun_drops: None, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, _ = _protocol()
    clock = [1000.0]
    monkeypatch.setattr(aiortc_hooks.time, "monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="sfu.aiortc_hooks"):
        for _ in range(5):
            aiortc_hooks._demultiplexed_datagram_received(protocol, _malformed_stun(), ("h", 1))
        clock[0] += aiortc_hooks.FAILURE_LOG_INTERVAL
        aiortc_hooks._demultiplexed_datagram_received(protocol, _malformed_stun(), ("h", 1))
    messages = [r.getMessage() for r in caplog.records if "malformed STUN" in r.getMessage()]
    assert len(messages) == 2
    assert "0 more" in messages[0] and "4 more" in messages[1]


async def test_valid_stun_still_takes_aioices_path() -> None:
    protocol, receiver = _protocol()
    request = aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING, message_class=aioice.stun.Class.REQUEST
    )
    request.attributes["PRIORITY"] = 1234
    aiortc_hooks._demultiplexed_datagram_received(protocol, bytes(request), ("127.0.0.1", 9))
    assert [m.transaction_id for m in receiver.requests] == [request.transaction_id]
    assert receiver.requests[0].attributes["PRIORITY"] == 1234
    # a first byte of 0-3 that is not STUN at all still reaches the connection, as before
    junk = bytes([1, 2, 3])
    aiortc_hooks._demultiplexed_datagram_received(protocol, junk, ("127.0.0.1", 9))
    assert receiver.data == [(junk, 1)]


def test_the_sfu_and_its_clients_install_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfu.client import SFUClient

    stock = aiortc_hooks._stock_stun_datagram_received
    for make in (
        lambda: SFUServer(SFUConfig(token_secret=b"k" * 32)),
        lambda: SFUClient("ws://127.0.0.1:1/", "room", "me", "token"),
    ):
        monkeypatch.setattr(aioice.ice.StunProtocol, "datagram_received", stock)
        make()
        assert (
            aioice.ice.StunProtocol.datagram_received
            is aiortc_hooks._demultiplexed_datagram_received
        )


async def test_a_stranger_flooding_ice_ports_with_bad_stun_harms_nothing(
    stun_drops: None, caplog: pytest.LogCaptureFixture
) -> None:
    harness = Harness()
    await harness.start()
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a, b = await harness.join("a"), await harness.join("b")
        assert await wait_until(lambda: len(b.log("a", "video").frames) >= 5, timeout=10)
        ports = set()
        for participant in harness.server.rooms["room"].participants.values():
            for transceiver in participant.pc.getTransceivers()[:1]:
                connection = transceiver.receiver.transport.transport._connection
                ports |= {p.transport.get_extra_info("sockname") for p in connection._protocols}
        for peer in (a, b):
            connection = peer.client.pc.getTransceivers()[0].receiver.transport.transport
            ports |= {
                p.transport.get_extra_info("sockname") for p in connection._connection._protocols
            }
        assert ports
        frames = len(b.log("a", "video").frames)
        with caplog.at_level(logging.WARNING, logger="sfu.aiortc_hooks"):
            for _ in range(20):
                for port in ports:
                    stranger.sendto(_malformed_stun(), port[:2])
                await asyncio.sleep(0.02)
            assert await wait_until(
                lambda: len(b.log("a", "video").frames) >= frames + 10, timeout=10
            )
        assert unhandled == []
        warnings = [r for r in caplog.records if "malformed STUN" in r.getMessage()]
        assert len(warnings) == 1  # one report, the rest counted quietly
        assert aiortc_hooks._stun_drops["quiet"] == 20 * len(ports) - 1
        assert all(f.intact for f in b.log("a", "video").frames)
    finally:
        stranger.close()
        loop.set_exception_handler(previous)
        await harness.stop()
