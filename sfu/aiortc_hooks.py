"""Every place where the SFU reaches into aiortc internals. Pinned to aiortc 1.16.x.

aiortc is built for endpoints that decode; the SFU must forward RTP it cannot read, so it
short-circuits aiortc's media pipeline. The internals relied upon (aiortc 1.16.0 line numbers):

- `RTCDtlsTransport._handle_rtp_data(data, arrival_time_ms)` and `_handle_rtcp_data(data)`
  (`rtcdtlstransport.py:603-621`): called by `_recv_next` with SRTP/SRTCP already removed. The
  SFU replaces both on each transport instance, so RTP never reaches `RtpPacket.parse`,
  `RTCRtpReceiver`, its jitter buffer or a decoder, and unknown header extensions survive.
- Fast send path (`fast_sender`): `RTCDtlsTransport._state` (a `rtcdtlstransport.State`),
  `._tx_srtp` (a pylibsrtp
  `Session`, set once DTLS completes, `rtcdtlstransport.py:496`), `RTCDtlsTransport.transport`
  (`RTCIceTransport`) `._connection` (aioice `Connection`), its `._nominated[1]` (the selected
  `CandidatePair`, aioice 0.13 `ice.py:449`) and the pair's `.protocol.transport` (asyncio
  `DatagramTransport`) and `.remote_addr`. This is exactly what `_send_rtp` -> `_send` ->
  `Connection.send` -> `sendto` -> `send_data` do, minus four coroutine hops per packet.
  SRTP protection calls libsrtp through pylibsrtp's cffi binding (`pylibsrtp._binding.lib`)
  on the `Session`'s own `_cdata`/`_buffer`/`_srtp`, as `Session.protect` does (pylibsrtp
  0.10-1.0, `__init__.py:265`), without its per-packet allocations.
- `RTCRtpSender.send(parameters)` / `RTCRtpReceiver.receive(parameters)`: called by
  `RTCPeerConnection.__connect` once the transport is up, with the negotiated parameters. The SFU
  replaces them per instance with functions that only record the parameters, so no stock RTP/RTCP
  tasks run (they would send sender reports with zero timestamps) and no decoder thread starts.
- `RTCRtpSender._ssrc`: the SSRC advertised in the SFU's SDP (`a=ssrc`), written into forwarded
  packets because aiortc receivers route by SSRC and payload type; it and `_rtx_ssrc` are
  replaced (`renew_sender_ssrc`) when a reused m-line starts carrying another stream, and the
  old SSRC's stream is removed from the sender's `transport._tx_srtp` (made with
  `SSRC_ANY_OUTBOUND`, which also keeps a stream per SSRC protected under).
- Fast receive path (`_receive_directly`): aioice's `StunProtocol.datagram_received` and
  `Connection.data_received` are replaced per instance; SRTP and SRTCP are unprotected with
  `RTCDtlsTransport._rx_srtp` through the same cffi calls, and handed to the SFU synchronously.
  `_rx_srtp` is made with `Policy.SSRC_ANY_INBOUND` (`rtcdtlstransport.py:482`): libsrtp
  (2.7.0 in pylibsrtp 1.0's wheels) then adds a stream to the session, for good, for every SSRC
  it authenticates a packet under (RTP's SSRC, RTCP's sender SSRC), and looks streams up in a
  linear list. The fast path keeps the streams to what the SFU uses (`_SrtpStreams`) and drops
  the others with pylibsrtp's public `Session.remove_stream` (libsrtp's `srtp_remove_stream`).
- `asyncio.selector_events._SelectorDatagramTransport.max_size` (the `recvfrom` size, 256 KiB)
  is lowered per transport to 65535 (`shrink_receive_buffer`).
- `aioice.ice.StunProtocol.datagram_received` (aioice 0.13 `ice.py:284`), class-wide
  (`demultiplex_stun`): aioice tries `stun.parse_message` on every datagram, which checks no
  magic cookie, so an RTP packet whose sequence number equals its length minus 20 is parsed as
  STUN, and a malformed attribute raises `struct.error` (only `ValueError` is caught): the
  datagram is lost and asyncio logs a traceback, as it does for any malformed STUN datagram a
  stranger sends to the port. The replacement hands what RFC 7983 says is not STUN (first byte
  above 3) to `Connection.data_received` unparsed, and drops a STUN datagram aioice fails on.
- `aioice.ice.get_host_addresses`: replaced by `restrict_ice_to_loopback` for tests and
  loopback-only deployments (aioice otherwise never offers 127.0.0.1).
- Client side, `renew_receiver`: `RTCRtpTransceiver.__receiver` (`_RTCRtpTransceiver__receiver`)
  is replaced by a new `RTCRtpReceiver(kind, transport)` whose RTCP SSRC is set with
  `_set_rtcp_ssrc(sender._ssrc)`, as `RTCPeerConnection.__createTransceiver` does
  (`rtcpeerconnection.py:1206-1210`), so that `setRemoteDescription` creates a new track
  for an m-line the SFU reuses (it does so only while `receiver.track` is None,
  `rtcpeerconnection.py:944`).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aioice
import aioice.ice
import aiortc
from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters, RTCRtpSendParameters
from aiortc.utils import random32
from pylibsrtp import Error as SrtpError
from pylibsrtp import Session
from pylibsrtp._binding import ffi, lib

from sfu.errors import ConfigError

logger = logging.getLogger(__name__)
FAILURE_LOG_INTERVAL = 10.0  # seconds between logged tracebacks of packets the SFU failed on
_failures: dict[str, float] = {"last": -FAILURE_LOG_INTERVAL, "quiet": 0}


def _report_due(state: dict[str, float]) -> int | None:
    """The number of quiet events since the last report if one is due now (at most one per
    FAILURE_LOG_INTERVAL), else None, this event counted as quiet."""
    now = time.monotonic()
    if now - state["last"] < FAILURE_LOG_INTERVAL:
        state["quiet"] += 1
        return None
    quiet, state["quiet"], state["last"] = int(state["quiet"]), 0, now
    return quiet


def _log_failure(what: str) -> None:
    """Log the current exception, at most once per FAILURE_LOG_INTERVAL: a peer that keeps
    sending a packet the SFU trips on must not flood the log."""
    if (quiet := _report_due(_failures)) is None:
        return
    logger.exception(
        "dropped %s the SFU failed to handle (%d more since the last report)", what, quiet
    )


SUPPORTED_AIORTC = "1.16."
# pylibsrtp Session buffers are 1500 bytes; leave room for the longest SRTCP trailer.
MAX_PROTECT_INPUT = 1500 - 148
SUPPORTED_AIOICE = ("0.12.", "0.13.")
MAX_DATAGRAM = 65535  # the largest UDP payload over IPv4

SUPPORTED_PYLIBSRTP = ("0.10.", "0.11.", "0.12.", "1.0.")
_versions = {
    "aiortc": (aiortc.__version__, (SUPPORTED_AIORTC,)),
    "aioice": (aioice.__version__, SUPPORTED_AIOICE),
    "pylibsrtp": (importlib.metadata.version("pylibsrtp"), SUPPORTED_PYLIBSRTP),
}
for _name, (_found, _supported) in _versions.items():
    if not _found.startswith(_supported):
        raise ConfigError(
            f"sfu.aiortc_hooks was written for {_name} {' or '.join(_supported)}x, found "
            f"{_found}; install the pinned versions (see pyproject.toml) or re-check the hooks"
        )

RtpHandler = Callable[[bytes], Awaitable[None]]
RtcpHandler = Callable[[bytes], Awaitable[None]]

# SRTCP sender SSRCs whose libsrtp streams a receiving session keeps. A client sends RTCP under
# about one SSRC per m-line (aiortc: each transceiver's sender SSRC), and a full room of the
# default 16 has 32 m-lines; a new one beyond this has its stream removed after its packet.
MAX_RTCP_ONLY_STREAMS = 128
# SRTP streams kept before those of SSRCs the SFU no longer takes RTP under (a stream that
# restarted under another SSRC) are removed: a participant publishes at most 4 (media, RTX).
MAX_RTP_STREAMS = 16
# Streams of SSRCs the SFU did not take when their first packet came, kept a while (the oldest
# removed past this many): one the SFU comes to take (its stream's parameters arrive after
# DTLS, a restart's first packets may lack the mid) must keep its libsrtp stream, whose
# rollover counter a stream made afresh after a sequence-number wrap would lack, refusing
# every later packet.
MAX_UNUSED_RTP_STREAMS = 32


def hook_transport(
    transport: RTCDtlsTransport,
    on_rtp: RtpHandler,
    on_rtcp: RtcpHandler,
    on_rtp_now: Callable[[bytes, int | None], None] | None = None,
    on_rtcp_now: Callable[[bytes], None] | None = None,
    uses_ssrc: Callable[[int], bool] | None = None,
) -> bool:
    """Route the transport's decrypted RTP and RTCP to the SFU. Returns False if already hooked.

    With `on_rtp_now` and `on_rtcp_now` (synchronous), SRTP and SRTCP packets skip aiortc's
    receive loop altogether: they are unprotected and handed over inside the UDP protocol's
    `datagram_received` (see `_receive_directly`), saving the aioice queue and a task wake-up
    per packet; `on_rtp_now` also gets the datagram's arrival in the kernel (`arrival_ns`).
    `uses_ssrc(ssrc)`, asked after `on_rtp_now` handled a packet under a new SSRC, tells whether
    the SFU takes RTP under it (libsrtp keeps a stream for it only then, see `_SrtpStreams`);
    without it, no such stream is kept.
    """
    if getattr(transport, "_sfu_hooked", False):
        return False

    # An exception here would end aiortc's receive loop for the whole transport: never raise.
    async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        try:
            await on_rtp(data)
        except Exception:
            _log_failure("an RTP packet")

    async def handle_rtcp_data(data: bytes) -> None:
        try:
            await on_rtcp(data)
        except Exception:
            _log_failure("an RTCP packet")

    transport._handle_rtp_data = handle_rtp_data  # type: ignore[method-assign]
    transport._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]
    transport._sfu_hooked = True  # type: ignore[attr-defined]
    if on_rtp_now is not None and on_rtcp_now is not None:
        _receive_directly(transport, on_rtp_now, on_rtcp_now, uses_ssrc or _uses_none)
    return True


def _uses_none(ssrc: int) -> bool:
    return False


class _SrtpStreams:
    """The SSRCs a receiving SRTP session holds libsrtp streams for, kept to what the SFU uses.

    libsrtp adds a stream for every SSRC an authentic packet comes under and never drops it, in
    a list it walks for every packet: a peer (which holds the keys) sending under 40,000 fresh
    SSRCs made each of its later packets cost ~400 us to unprotect, and ~0.5 kB of memory per
    SSRC. So a new SSRC's stream stays if the SFU took the RTP packet (`uses_ssrc`: a
    published stream, or one it recognised by its mid), among the MAX_UNUSED_RTP_STREAMS
    latest if it did not (see there), or, for RTCP, while fewer than MAX_RTCP_ONLY_STREAMS are
    kept; otherwise it is removed once its packet was handled, and the session is as before.
    (libsrtp adds the stream inside `srtp_unprotect`, once the packet proved authentic: it can
    only be removed afterwards.)
    """

    __slots__ = ("session", "uses_ssrc", "rtp", "unused", "rtcp")

    def __init__(self, session: Session, uses_ssrc: Callable[[int], bool]) -> None:
        self.session = session
        self.uses_ssrc = uses_ssrc
        self.rtp: set[int] = set()  # SSRCs whose streams were kept for RTP
        self.unused: dict[int, None] = {}  # ... not taken at first, oldest first
        self.rtcp: set[int] = set()  # ... for RTCP only

    def known(self, ssrc: int) -> bool:
        return ssrc in self.rtp or ssrc in self.unused or ssrc in self.rtcp

    def rtp_handled(self, ssrc: int) -> None:
        """An authentic RTP packet under an SSRC not known before has been handled."""
        if not self.uses_ssrc(ssrc):
            self.unused[ssrc] = None
            if len(self.unused) > MAX_UNUSED_RTP_STREAMS:
                self._sort_unused()
            return
        self.rtp.add(ssrc)
        if len(self.rtp) > MAX_RTP_STREAMS:
            for gone in [s for s in self.rtp if not self.uses_ssrc(s)]:
                self.rtp.discard(gone)
                self._remove(gone)

    def _sort_unused(self) -> None:
        """Move the unused SSRCs the SFU has come to take to `rtp`; remove the oldest others,
        down to half the bound (so that a flood of new SSRCs sorts once in many packets)."""
        for ssrc in [s for s in self.unused if self.uses_ssrc(s)]:
            del self.unused[ssrc]
            self.rtp.add(ssrc)
        while len(self.unused) > MAX_UNUSED_RTP_STREAMS // 2:
            ssrc = next(iter(self.unused))
            del self.unused[ssrc]
            self._remove(ssrc)

    def rtcp_handled(self, ssrc: int) -> None:
        """An authentic RTCP packet under a sender SSRC not known before has been handled."""
        if len(self.rtcp) < MAX_RTCP_ONLY_STREAMS:
            self.rtcp.add(ssrc)
        else:
            self._remove(ssrc)

    def _remove(self, ssrc: int) -> None:
        try:
            self.session.remove_stream(ssrc)
        except SrtpError:  # no such stream: nothing to undo
            pass


# ioctl SIOCGSTAMPNS (linux/sockios.h): the kernel's receive time (CLOCK_REALTIME) of the last
# datagram read from a socket. The first call turns the stamping on and fails (no stamp yet);
# the kernel turns it on asynchronously, and a datagram that arrived before reads as stamped
# when read (a latency from its handling on, as without stamps).
SIOCGSTAMPNS = 0x8907
_TIMESPEC = struct.Struct("@qq")
_NO_STAMP = bytes(_TIMESPEC.size)


def arrival_ns(fd: int) -> int | None:
    """When the last datagram read from socket `fd` arrived, in `time.time_ns()` terms: what
    the forwarding latency counts from, so that time spent queued in the socket while the event
    loop was busy counts too. None where the kernel has no stamp."""
    try:
        seconds, nanoseconds = _TIMESPEC.unpack(fcntl.ioctl(fd, SIOCGSTAMPNS, _NO_STAMP))
    except (OSError, ValueError):  # no stamp yet, or no socket (-1)
        return None
    return seconds * 1_000_000_000 + nanoseconds


def _receive_directly(
    transport: RTCDtlsTransport,
    on_rtp: Callable[[bytes, int | None], None],
    on_rtcp: Callable[[bytes], None],
    uses_ssrc: Callable[[int], bool],
) -> None:
    """SRTP and SRTCP from the ICE connection straight to `on_rtp`/`on_rtcp`, synchronously.

    Stock path per packet: `StunProtocol.datagram_received` tries `stun.parse_message` (raises),
    `Connection.data_received` queues it, the transport's `__run` task wakes on the next loop
    iteration, `_recv_next` unprotects and awaits `_handle_rtp_data` or `_handle_rtcp_data`.
    Here the protocols' `datagram_received` (aioice `ice.py:284`) and
    `Connection.data_received` (`ice.py:1277`) are replaced per instance: RTP and RTCP (first
    byte 128-191, RFC 7983; RTCP by its second byte, RFC 5761 §4) on a connected transport are
    unprotected with `_rx_srtp` on the spot; everything else (STUN, DTLS, media before DTLS
    completes) takes the stock path unchanged. The session keeps libsrtp streams only for the
    SSRCs the SFU uses (`_SrtpStreams`).
    """
    connection = transport.transport._connection
    stock_data_received = connection.data_received
    length = ffi.new("int *")
    unprotect_rtp, unprotect_rtcp = lib.srtp_unprotect, lib.srtp_unprotect_rtcp
    streams: _SrtpStreams | None = None

    def take(data: bytes, fd: int = -1) -> bool:
        nonlocal streams
        if transport._state is not State.CONNECTED:
            return False
        session = transport._rx_srtp
        if session is None:
            return False
        n = len(data)
        if n > MAX_PROTECT_INPUT:
            return True  # longer than any SRTP packet the transport could have sent us: drop
        if streams is None or streams.session is not session:
            streams = _SrtpStreams(session, uses_ssrc)
        rtcp = 192 <= data[1] <= 208
        # in the clear in SRTP and SRTCP (RFC 3711 §3.1, §3.4): RTP's SSRC, RTCP's sender SSRC
        ssrc = int.from_bytes(data[4:8] if rtcp else data[8:12], "big")
        known = streams.known(ssrc)
        buffer = session._buffer
        length[0] = n
        buffer[0:n] = data
        if (unprotect_rtcp if rtcp else unprotect_rtp)(session._srtp[0], session._cdata, length):
            return True  # failed authentication or replay: dropped, as `_recv_next` does
        try:
            if rtcp:
                on_rtcp(buffer[0 : length[0]])
            else:
                on_rtp(buffer[0 : length[0]], arrival_ns(fd) if fd >= 0 else None)
        except Exception:
            _log_failure("a packet")
        if not known:
            if rtcp:
                streams.rtcp_handled(ssrc)
            else:
                streams.rtp_handled(ssrc)
        return True

    def data_received(data: bytes, component: int) -> None:
        if not (len(data) > 12 and 127 < data[0] < 192 and take(data)):
            stock_data_received(data, component)

    connection.data_received = data_received  # type: ignore[method-assign]
    for protocol in list(connection._protocols):
        shrink_receive_buffer(protocol.transport)
        stock_datagram_received = protocol.datagram_received
        sock = protocol.transport.get_extra_info("socket") if protocol.transport else None
        if sock is not None:
            arrival_ns(sock.fileno())  # turns the stamping on for the datagrams to come

        def datagram_received(
            data: bytes | str,
            addr: tuple[Any, ...],
            stock: Callable[[bytes | str, tuple[Any, ...]], None] = stock_datagram_received,
            component: int = protocol.local_candidate.component,
            fd: int = sock.fileno() if sock is not None else -1,
        ) -> None:
            # RTP/RTCP is never STUN (RFC 7983 §7): skip the STUN parse attempt. Called right
            # after the datagram was read: the socket's stamp is this datagram's.
            if len(data) > 12 and 127 < data[0] < 192:
                if not take(data, fd):  # type: ignore[arg-type]
                    stock_data_received(data, component)
            else:
                stock(data, addr)

        protocol.datagram_received = datagram_received  # type: ignore[method-assign]


def shrink_receive_buffer(transport: Any) -> None:
    """Receive each datagram into 64 KiB, not asyncio's default 256 KiB.

    `_SelectorDatagramTransport._read_ready` calls `sock.recvfrom(self.max_size)`, which
    allocates `max_size` bytes and shrinks them to the datagram. 256 KiB is above glibc's mmap
    threshold: every datagram then costs an mmap, page faults over the touched pages, and a
    munmap, about 30 us, more than the rest of forwarding one packet to nine subscribers.
    65535 bytes hold any UDP datagram over IPv4, so nothing is truncated. (Transports of other
    event loops, such as uvloop's, have no `max_size` and use their own buffers.)
    """
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = MAX_DATAGRAM


def srtp_protector(session: Session) -> Callable[..., bytes]:
    """`session.protect`/`protect_rtcp` (chosen per packet) without per-call allocations.

    `protect(packet)`, or `protect(head, rest)` for a packet in two parts.
    """
    length = ffi.new("int *")
    cdata, buffer, srtp = session._cdata, session._buffer, session._srtp[0]
    protect_rtp, protect_rtcp = lib.srtp_protect, lib.srtp_protect_rtcp

    def protect(data: bytes, rest: bytes = b"") -> bytes:
        n = len(data)
        m = n + len(rest)
        if m > MAX_PROTECT_INPUT:
            raise ValueError("packet is too long")
        rtcp = 192 <= data[1] <= 208  # RFC 5761 §4 demultiplexing, as aiortc's is_rtcp
        length[0] = m
        buffer[0:n] = data
        if rest:
            buffer[n:m] = rest
        if (protect_rtcp if rtcp else protect_rtp)(srtp, cdata, length):
            # failed: let pylibsrtp raise its proper error
            whole = data + rest
            return session.protect_rtcp(whole) if rtcp else session.protect(whole)
        return buffer[0 : length[0]]

    return protect


def fast_sender(transport: RTCDtlsTransport) -> Callable[..., None]:
    """A synchronous `_send_rtp`: SRTP/SRTCP-protect and `sendto` on the nominated ICE pair.

    `send(packet)`, or `send(head, rest)` for a packet in two parts, which are copied straight
    into the SRTP session's buffer (no concatenated copy per forwarded packet).

    Raises ConnectionError like `_send_rtp` when DTLS is not connected or ICE has no pair. A
    packet SRTP refuses to protect is dropped, as a lost one: libsrtp's sender keeps a replay
    window too (RFC 3711 §3.3.2), and a publisher can make the SFU forward a packet far behind
    the newest (one that arrives late after a burst), which the subscriber would drop anyway.
    Sends with the pair's non-blocking socket itself
    (`_SelectorDatagramTransport._sock`), not `DatagramTransport.sendto`: a datagram the kernel
    cannot take at once (EAGAIN) or refuses (ICMP error) is dropped, as a full network would,
    instead of being queued behind the event loop.
    """
    nominated = transport.transport._connection._nominated
    connected = State.CONNECTED
    # The transport's tx Session (kept referenced: its buffers die with it) and its protector;
    # the nominated pair, its socket and address. Checked per packet and rebound only when they
    # change, so the common path is a few identity tests.
    session: Session | None = None
    protect: Callable[..., bytes] = srtp_protector
    pair: Any = None
    sock: Any = None
    addr: Any = None

    def send(data: bytes, rest: bytes = b"") -> None:
        nonlocal session, protect, pair, sock, addr
        if transport._state is not connected:  # the `state` property costs ~1 us
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        if transport._tx_srtp is not session:
            session = transport._tx_srtp
            protect = srtp_protector(session)
        try:
            protected = protect(data, rest)
        except (SrtpError, ValueError):
            return
        current = nominated.get(1)
        if current is None:
            raise ConnectionError("Cannot send data, not connected")
        if current is not pair:
            udp = current.protocol.transport
            if udp is None or udp.is_closing():
                raise ConnectionError("Cannot send data, not connected")
            # another event loop's transport (uvloop) has no `_sock`: use its own sendto
            pair, sock, addr = current, getattr(udp, "_sock", None) or udp, current.remote_addr
        try:
            sock.sendto(protected, addr)
        except OSError as exc:
            if getattr(sock, "fileno", int)() == -1:  # closed under us: re-check next time
                pair = None
                raise ConnectionError("Cannot send data, not connected") from exc
            # EAGAIN or an ICMP error from an earlier datagram: this one is lost, as on a
            # congested network; RTP recovers by NACK/PLI

    return send


def capture_sender(sender: RTCRtpSender, on_params: Callable[[RTCRtpSendParameters], None]) -> None:
    """Stop the stock send path; `on_params` gets the negotiated parameters once connected."""

    async def send(parameters: RTCRtpSendParameters) -> None:
        on_params(parameters)

    sender.send = send  # type: ignore[method-assign]


def capture_receiver(
    receiver: RTCRtpReceiver, on_params: Callable[[RTCRtpReceiveParameters], None]
) -> None:
    """Stop the stock receive path (no decoder thread, no RTCP task); capture parameters."""

    async def receive(parameters: RTCRtpReceiveParameters) -> None:
        on_params(parameters)

    receiver.receive = receive  # type: ignore[method-assign]


def renew_receiver(transceiver: RTCRtpTransceiver) -> None:
    """Give a client's transceiver a new, unstarted receiver (for an m-line the SFU reuses).

    aiortc makes one track per receiver and cannot restart a stopped receiver, so an m-line that
    carries a new stream after being inactive needs a new receiver; `setRemoteDescription` then
    fires a "track" event for it and the connection starts it.
    """
    receiver = RTCRtpReceiver(transceiver.kind, transceiver.receiver.transport)
    receiver._set_rtcp_ssrc(transceiver.sender._ssrc)
    transceiver._RTCRtpTransceiver__receiver = receiver  # type: ignore[attr-defined]


def renew_sender_ssrc(sender: RTCRtpSender) -> None:
    """New random SSRCs (media and RTX) for a sender whose m-line will carry another stream.

    The next offer advertises them (`a=ssrc`, written from these attributes by
    `create_media_description_for_transceiver`, `rtcpeerconnection.py:240-250`).
    """
    old = (sender._ssrc, sender._rtx_ssrc)
    sender._ssrc = random32()
    sender._rtx_ssrc = random32()
    # libsrtp keeps a stream per SSRC protected under, for good: a member who leaves and joins
    # again and again would otherwise grow every other member's session by one or two each time
    session = getattr(sender.transport, "_tx_srtp", None)
    if session is not None:
        for ssrc in old:
            try:
                session.remove_stream(ssrc)
            except SrtpError:  # nothing was sent under it
                pass


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC that the SFU's SDP advertises for this sender."""
    return int(sender._ssrc)


_stock_stun_datagram_received = aioice.ice.StunProtocol.datagram_received
_stun_drops: dict[str, float] = {"last": -FAILURE_LOG_INTERVAL, "quiet": 0}


def _demultiplexed_datagram_received(
    self: aioice.ice.StunProtocol, data: bytes | str, addr: tuple[Any, ...]
) -> None:
    if isinstance(data, bytes) and data and data[0] > 3:  # not STUN (RFC 7983 §7)
        self.receiver.data_received(data, self.local_candidate.component)
        return
    try:
        _stock_stun_datagram_received(self, data, addr)
    except Exception as exc:  # aioice's STUN parser raises more than ValueError
        if (quiet := _report_due(_stun_drops)) is None:
            return
        logger.warning(
            "dropped a malformed STUN datagram from %s:%s (%s; %d more since the last report)",
            addr[0], addr[1], type(exc).__name__, quiet,
        )


def demultiplex_stun() -> None:
    """Demultiplex ICE datagrams as RFC 7983 does, in every aioice connection of the process
    (see the module's docstring). Idempotent; both the SFU and its clients call it."""
    aioice.ice.StunProtocol.datagram_received = _demultiplexed_datagram_received  # type: ignore[method-assign]


_original_get_host_addresses: Any = aioice.ice.get_host_addresses


def restrict_ice_to_loopback() -> None:
    """Gather only 127.0.0.1 host candidates (process-wide: affects every aiortc peer)."""

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


def restore_ice_addresses() -> None:
    aioice.ice.get_host_addresses = _original_get_host_addresses
