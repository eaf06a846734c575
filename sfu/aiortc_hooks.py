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
  packets because aiortc receivers route by SSRC and payload type.
- `aioice.ice.get_host_addresses`: replaced by `restrict_ice_to_loopback` for tests and
  loopback-only deployments (aioice otherwise never offers 127.0.0.1).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aioice
import aioice.ice
import aiortc
from aiortc import RTCDtlsTransport, RTCRtpReceiver, RTCRtpSender
from aiortc.rtcdtlstransport import State
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters, RTCRtpSendParameters
from pylibsrtp import Session
from pylibsrtp._binding import ffi, lib

from sfu.errors import ConfigError

logger = logging.getLogger(__name__)

SUPPORTED_AIORTC = "1.16."
# pylibsrtp Session buffers are 1500 bytes; leave room for the longest SRTCP trailer.
MAX_PROTECT_INPUT = 1500 - 148
SUPPORTED_AIOICE = ("0.12.", "0.13.")

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


def hook_transport(transport: RTCDtlsTransport, on_rtp: RtpHandler, on_rtcp: RtcpHandler) -> bool:
    """Route the transport's decrypted RTP and RTCP to the SFU. Returns False if already hooked."""
    if getattr(transport, "_sfu_hooked", False):
        return False

    # An exception here would end aiortc's receive loop for the whole transport: never raise.
    async def handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
        try:
            await on_rtp(data)
        except Exception:
            logger.exception("dropped an RTP packet the SFU failed to handle")

    async def handle_rtcp_data(data: bytes) -> None:
        try:
            await on_rtcp(data)
        except Exception:
            logger.exception("dropped an RTCP packet the SFU failed to handle")

    transport._handle_rtp_data = handle_rtp_data  # type: ignore[method-assign]
    transport._handle_rtcp_data = handle_rtcp_data  # type: ignore[method-assign]
    transport._sfu_hooked = True  # type: ignore[attr-defined]
    return True


def srtp_protector(session: Session) -> Callable[[bytes], bytes]:
    """`session.protect`/`protect_rtcp` (chosen per packet) without per-call allocations."""
    length = ffi.new("int *")
    cdata, buffer, srtp = session._cdata, session._buffer, session._srtp[0]
    protect_rtp, protect_rtcp = lib.srtp_protect, lib.srtp_protect_rtcp

    def protect(data: bytes) -> bytes:
        n = len(data)
        if n > MAX_PROTECT_INPUT:
            raise ValueError("packet is too long")
        rtcp = 192 <= data[1] <= 208  # RFC 5761 §4 demultiplexing, as aiortc's is_rtcp
        length[0] = n
        buffer[0:n] = data
        if (protect_rtcp if rtcp else protect_rtp)(srtp, cdata, length):
            # failed: let pylibsrtp raise its proper error
            return session.protect_rtcp(data) if rtcp else session.protect(data)
        return buffer[0 : length[0]]

    return protect


def fast_sender(transport: RTCDtlsTransport) -> Callable[[bytes], None]:
    """A synchronous `_send_rtp`: SRTP/SRTCP-protect and `sendto` on the nominated ICE pair.

    Raises ConnectionError like `_send_rtp` when DTLS is not connected or ICE has no pair, and
    pylibsrtp.Error if protection fails.
    """
    ice_connection = transport.transport._connection
    cache: list[Any] = [None, None]  # the transport's tx Session, its protector

    def send(data: bytes) -> None:
        if transport._state is not State.CONNECTED:  # the `state` property costs ~1 us
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        session = transport._tx_srtp
        if session is not cache[0]:
            cache[:] = [session, srtp_protector(session)]
        protected = cache[1](data)
        pair = ice_connection._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            raise ConnectionError("Cannot send data, not connected")
        pair.protocol.transport.sendto(protected, pair.remote_addr)

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


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC that the SFU's SDP advertises for this sender."""
    return int(sender._ssrc)


_original_get_host_addresses: Any = aioice.ice.get_host_addresses


def restrict_ice_to_loopback() -> None:
    """Gather only 127.0.0.1 host candidates (process-wide: affects every aiortc peer)."""

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    aioice.ice.get_host_addresses = loopback


def restore_ice_addresses() -> None:
    aioice.ice.get_host_addresses = _original_get_host_addresses
