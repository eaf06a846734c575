"""The SFU's short-cuts around aiortc's per-packet machinery (sfu.aiortc_hooks), on fake objects."""

from __future__ import annotations

import logging
import socket
import struct
import time
from types import SimpleNamespace
from typing import Any

import pylibsrtp
import pytest
from aiortc.rtcdtlstransport import State

from sfu import aiortc_hooks
from sfu.aiortc_hooks import arrival_ns, fast_sender, hook_transport

KEY = bytes(range(30))


def _session(outbound: bool) -> pylibsrtp.Session:
    policy = pylibsrtp.Policy(
        key=KEY,
        ssrc_type=pylibsrtp.Policy.SSRC_ANY_OUTBOUND
        if outbound
        else pylibsrtp.Policy.SSRC_ANY_INBOUND,
        srtp_profile=pylibsrtp.Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    )
    return pylibsrtp.Session(policy=policy)


def _rtp(seq: int, pt: int = 96) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq, seq * 3000, 1234) + bytes(range(100))


def _rtcp_rr() -> bytes:
    return struct.pack("!BBHI", 0x80, 201, 1, 1234)


class _Connection:
    """An aioice Connection as far as the hooks use it, with one UDP protocol."""

    def __init__(self) -> None:
        self.stock: list[bytes] = []
        self.stock_datagrams: list[bytes] = []
        self._nominated: dict[int, Any] = {}
        protocol = SimpleNamespace(local_candidate=SimpleNamespace(component=1), transport=None)
        protocol.datagram_received = self._stun_datagram_received
        self._protocols = [protocol]

    def _stun_datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.stock_datagrams.append(data)
        self.data_received(data, 1)

    def data_received(self, data: bytes, component: int) -> None:
        self.stock.append(data)


def _transport(connection: _Connection) -> SimpleNamespace:
    return SimpleNamespace(
        _state=State.CONNECTED,
        _rx_srtp=_session(False),
        _tx_srtp=_session(True),
        transport=SimpleNamespace(_connection=connection),
    )


async def _unused(data: bytes) -> None:
    raise AssertionError("the stock path was used")


def _hooked() -> tuple[_Connection, SimpleNamespace, list[bytes], list[bytes]]:
    """A connected fake transport hooked with synchronous handlers: (connection, transport,
    RTP received, RTCP received)."""
    connection = _Connection()
    transport = _transport(connection)
    got: list[bytes] = []
    rtcp_got: list[bytes] = []
    assert hook_transport(
        transport, _unused, _unused, lambda data, arrival: got.append(data),  # type: ignore[arg-type]
        rtcp_got.append,
    )
    return connection, transport, got, rtcp_got


def test_rtp_comes_with_its_arrival_in_the_kernel() -> None:
    # Read from a real socket after waiting in it: the latency counts from the arrival.
    connection = _Connection()
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        receiver.bind(("127.0.0.1", 0))
        connection._protocols[0].transport = SimpleNamespace(get_extra_info=lambda name: receiver)
        got: list[tuple[bytes, int | None]] = []
        hook_transport(_transport(connection), _unused, _unused,
                       lambda data, arrival: got.append((data, arrival)), _unused)  # type: ignore[arg-type]
        # The kernel turns stamping on asynchronously (a deferred static key): until it is on,
        # the stamp read is the time of reading. Wait for a probe to come back stamped.
        for _ in range(250):
            sender.sendto(b"probe", receiver.getsockname())
            time.sleep(0.02)
            receiver.recv(64)
            stamp = arrival_ns(receiver.fileno())
            if stamp is not None and time.time_ns() - stamp >= 15_000_000:
                break
        else:
            pytest.fail("the kernel never stamped a datagram's arrival")
        tx = _session(True)
        sent = time.time_ns()
        sender.sendto(tx.protect(_rtp(1)), receiver.getsockname())
        time.sleep(0.05)
        read = time.time_ns()
        connection._protocols[0].datagram_received(receiver.recv(2048), ("127.0.0.1", 9))
        [(data, arrival)] = got
        assert data == _rtp(1) and arrival is not None
        # Stamped when it arrived, not when it was read 50 ms later. (One-sided with a wide
        # margin: a loaded machine may stamp late, never before the send.)
        assert arrival >= sent - 5_000_000 and read - arrival >= 25_000_000
        # where the kernel has no stamp (no socket): none
        assert arrival_ns(-1) is None
    finally:
        receiver.close()
        sender.close()


def test_rtp_is_unprotected_and_handed_over_inside_datagram_received() -> None:
    connection, transport, got, rtcp_got = _hooked()
    tx = _session(True)
    protocol = connection._protocols[0]
    protocol.datagram_received(tx.protect(_rtp(1)), ("127.0.0.1", 9))
    connection.data_received(tx.protect(_rtp(2)), 1)  # a protocol gathered after hooking
    protocol.datagram_received(tx.protect_rtcp(_rtcp_rr()), ("127.0.0.1", 9))
    assert got == [_rtp(1), _rtp(2)] and rtcp_got == [_rtcp_rr()]
    assert connection.stock == [] and connection.stock_datagrams == []


def test_everything_but_connected_srtp_and_srtcp_takes_the_stock_path() -> None:
    connection, transport, got, rtcp_got = _hooked()
    tx = _session(True)
    protocol = connection._protocols[0]
    stun = b"\x00\x01\x00\x00" + bytes(16)
    protocol.datagram_received(stun, ("127.0.0.1", 9))
    transport._state = State.CONNECTING
    early = tx.protect(_rtp(1))
    early_rtcp = tx.protect_rtcp(_rtcp_rr())
    protocol.datagram_received(early, ("127.0.0.1", 9))
    protocol.datagram_received(early_rtcp, ("127.0.0.1", 9))
    assert connection.stock == [stun, early, early_rtcp] and got == [] and rtcp_got == []


def test_without_synchronous_handlers_everything_takes_the_stock_path() -> None:
    connection = _Connection()
    transport = _transport(connection)
    hook_transport(transport, _unused, _unused)  # type: ignore[arg-type]
    packet = _session(True).protect(_rtp(1))
    connection._protocols[0].datagram_received(packet, ("127.0.0.1", 9))
    assert connection.stock == [packet]


def test_rtp_failing_authentication_is_dropped() -> None:
    connection, transport, got, rtcp_got = _hooked()
    forged = bytearray(_session(True).protect(_rtp(1)))
    forged[20] ^= 1
    connection._protocols[0].datagram_received(bytes(forged), ("127.0.0.1", 9))
    forged_rtcp = bytearray(_session(True).protect_rtcp(_rtcp_rr()))
    forged_rtcp[6] ^= 1
    connection._protocols[0].datagram_received(bytes(forged_rtcp), ("127.0.0.1", 9))
    assert got == [] and rtcp_got == [] and connection.stock == []


def test_a_handler_error_does_not_escape_into_the_event_loop(caplog, monkeypatch) -> None:
    # Set on the module's own logger: a parent's level may have been raised elsewhere.
    caplog.set_level(logging.ERROR, logger="sfu.aiortc_hooks")
    monkeypatch.setattr(aiortc_hooks, "_failures", {"last": -1e9, "quiet": 0})
    connection = _Connection()

    def boom(data: bytes, *arrival: int | None) -> None:
        raise RuntimeError("boom")

    hook_transport(_transport(connection), _unused, _unused, boom, boom)  # type: ignore[arg-type]
    tx = _session(True)
    for seq in range(1, 6):
        connection._protocols[0].datagram_received(tx.protect(_rtp(seq)), ("x", 1))
    # once per FAILURE_LOG_INTERVAL, however many packets fail: a peer cannot flood the log
    assert [r.getMessage() for r in caplog.records] == [
        "dropped a packet the SFU failed to handle (0 more since the last report)"
    ]
    assert "RuntimeError: boom" in caplog.text
    aiortc_hooks._failures["last"] -= aiortc_hooks.FAILURE_LOG_INTERVAL
    connection._protocols[0].datagram_received(tx.protect(_rtp(6)), ("x", 1))
    assert caplog.records[-1].getMessage().endswith("(4 more since the last report)")


@pytest.fixture
def udp() -> Any:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(2)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.setblocking(False)
    yield out, sink
    out.close()
    sink.close()


def _nominate(connection: _Connection, out: socket.socket, sink: socket.socket) -> None:
    udp_transport = SimpleNamespace(_sock=out, is_closing=lambda: out.fileno() == -1)
    protocol = SimpleNamespace(transport=udp_transport)
    connection._nominated[1] = SimpleNamespace(protocol=protocol, remote_addr=sink.getsockname())


def test_fast_sender_protects_and_sends_on_the_nominated_pairs_socket(udp: Any) -> None:
    out, sink = udp
    connection = _Connection()
    send = fast_sender(_transport(connection))  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        send(_rtp(0))  # no nominated pair yet
    _nominate(connection, out, sink)
    send(_rtp(1))
    send(_rtcp_rr())
    send(_rtp(2)[:12], _rtp(2)[12:])  # in two parts: copied into the SRTP buffer one by one
    rx = _session(False)
    assert rx.unprotect(sink.recv(2000)) == _rtp(1)
    assert rx.unprotect_rtcp(sink.recv(2000)) == _rtcp_rr()
    assert rx.unprotect(sink.recv(2000)) == _rtp(2)


def test_fast_sender_drops_what_srtp_refuses_and_goes_on(udp: Any) -> None:
    out, sink = udp
    connection = _Connection()
    send = fast_sender(_transport(connection))  # type: ignore[arg-type]
    _nominate(connection, out, sink)
    send(_rtp(3)[:12], bytes(1500))  # too long for SRTP's buffer
    send(_rtp(2000))
    send(_rtp(1))  # behind the sender's 128-packet replay window (RFC 3711 §3.3.2)
    send(_rtp(2001))
    rx = _session(False)
    assert rx.unprotect(sink.recv(2000)) == _rtp(2000)
    assert rx.unprotect(sink.recv(2000)) == _rtp(2001)
    sink.setblocking(False)
    with pytest.raises(BlockingIOError):
        sink.recv(2000)


def test_fast_sender_raises_connection_error_once_the_socket_is_closed(udp: Any) -> None:
    out, sink = udp
    connection = _Connection()
    transport = _transport(connection)
    send = fast_sender(transport)  # type: ignore[arg-type]
    _nominate(connection, out, sink)
    send(_rtp(1))
    out.close()
    with pytest.raises(ConnectionError):
        send(_rtp(2))
    transport._state = State.CLOSED
    with pytest.raises(ConnectionError):
        send(_rtp(3))


async def test_datagrams_are_received_into_a_64k_buffer_not_256k_and_arrive_whole() -> None:
    import asyncio

    from sfu.aiortc_hooks import MAX_DATAGRAM, shrink_receive_buffer

    loop = asyncio.get_running_loop()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class _Protocol(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            got.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(_Protocol, local_addr=("127.0.0.1", 0))
    try:
        assert transport.max_size > MAX_DATAGRAM  # type: ignore[attr-defined]
        shrink_receive_buffer(transport)
        assert transport.max_size == MAX_DATAGRAM == 65535  # type: ignore[attr-defined]
        shrink_receive_buffer(None)  # a protocol not connected yet: nothing to do
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        big = bytes(range(256)) * 200  # 51200 bytes: far above any RTP packet, still whole
        sender.sendto(big, transport.get_extra_info("sockname"))
        sender.close()
        assert await asyncio.wait_for(got.get(), 2) == big
    finally:
        transport.close()
