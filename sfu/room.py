"""Rooms and their participants: one RTCPeerConnection per participant, SFU-driven negotiation.

Negotiation is one-directional: the SFU always makes the offer and the client answers. A
participant's publishing m-lines (recvonly on the SFU side) come first in the first offer, so an
aiortc or browser client that added its tracks before `setRemoteDescription` has them matched to
those m-lines; every later m-line is a downstream slot (sendonly on the SFU side).

When a source ends, its slots' m-lines are made inactive (after an RTCP BYE), and once the
subscriber has answered that, the m-line is free: the next source of the same kind gets it
(sendonly again, under new SSRCs, so that a late BYE for the old stream cannot end the new one)
instead of a new m-line. Without this, every leave would add m-lines for good, and an SDP answer
grows by about 1.2 kB per m-line: a participant who stayed while 25 others came and went could
no longer answer within the 64 kB message limit. The offer's `streams` names each m-line's
publisher; an aiortc client must give a reused m-line a fresh receiver, as `sfu.client.SFUClient`
does (aiortc never starts a second track on a transceiver); browsers fire "track" again by
themselves when a transceiver turns back to receiving (WebRTC 1.0, the [[FiredDirection]] rules
of setRemoteDescription).

A publishing m-line's first SSRC comes from the answer (`a=ssrc`, which aiortc and browsers
write for every m-line they send on): an answer that sends on one without it is refused, as the
SFU would have no stream to forward. A publisher that restarts a stream under a new SSRC on the
same m-line keeps every subscriber's slot: the SFU finds the m-line by the mid header extension
(RFC 8843 §9.2) and the slot continues its numbering.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcrtpparameters import RTCRtpReceiveParameters, RTCRtpSendParameters
from aiortc.sdp import SessionDescription

from sfu import aiortc_hooks, rtcp
from sfu.config import SFUConfig
from sfu.errors import SignallingError
from sfu.forwarding import Slot, SourceStream, send_reports
from sfu.metrics import Metrics
from sfu.ratelimit import TokenBucket
from sfu.rtp import URI_MID, RtpParseError, parse_rtp
from sfu.speaker import ActiveSpeakerDetector

logger = logging.getLogger(__name__)

SendJson = Callable[[dict[str, Any]], Awaitable[None]]

# Only codecs whose keyframes the SFU can find in a frame's clear prefix.
PREFERRED_CODECS = {"audio": ("audio/opus",), "video": ("video/VP8", "video/rtx")}
TICK_INTERVAL = 0.05
# Remote ICE candidates one participant may give (in its answers and trickled, counted by
# address): aioice re-sorts its check list for every candidate it adds, so thousands of them
# would keep the event loop, and every room of the process, busy. A client has a few.
MAX_REMOTE_CANDIDATES = 32
# Answers to one offer that are refused before no more are read (until the next offer): each
# costs an SDP parse (a few ms for a maximal one), and a client needs one, or a few while
# being fixed; the answer timer then ends the session.
MAX_REFUSED_ANSWERS = 5
# Sequence numbers a participant's NACKs may have the SFU look at, a second and at once: each
# costs a fraction of a microsecond (more when resent), so this is ~1% of a core at most. One
# NACK looks at most at CACHE_SIZE; an honest subscriber after an outage of 300 ms on 15 video
# streams NACKs ~900 numbers, each up to 10 times (libwebrtc), within a second or two.
NACK_SEQS_RATE = 16384.0
NACK_SEQS_BURST = 16384
RR_INTERVAL = 1.0
TICK_EARLY = 0.005  # seconds a loop may run a timer early (sleep_until_tick)


async def sleep_until_tick() -> None:
    """Sleep to the next multiple of TICK_INTERVAL on the loop's clock.

    Every room's timer wakes at the same instants, so asyncio runs them all in one iteration:
    a process with many rooms pays one wake-up per tick, not one per room.

    Event loops may run a timer a little before its time (uvloop's timers have millisecond
    resolution and fire up to 1 ms early). "The next grid point after now" would then be the
    same point again, a timer of zero delay, over and over until the clock catches up: thousands
    of wake-ups a second. So a point less than TICK_EARLY ahead counts as reached.
    """
    loop = asyncio.get_running_loop()
    when = ((loop.time() + TICK_EARLY) // TICK_INTERVAL + 1) * TICK_INTERVAL
    future = loop.create_future()
    handle = loop.call_at(when, _wake, future)
    try:
        await future
    finally:
        handle.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _codec_preferences(kind: str) -> list[Any]:
    wanted = PREFERRED_CODECS[kind]
    return [c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType in wanted]


def _candidate_problem(candidate: Any) -> str | None:
    """Why aioice would fail on this remote candidate later (out of the SFU's sight), if so."""
    if not 0 < candidate.port < 65536:
        # asyncio's sendto raises OverflowError: a fatal error that closes the ICE socket
        return f"port {candidate.port} is not a UDP or TCP port"
    if not candidate.ip.endswith(".local"):  # an mDNS name, which aioice resolves
        try:
            ipaddress.ip_address(candidate.ip)
        except ValueError:
            return f"{candidate.ip!r} is neither an IP address nor an mDNS name"
    return None


def _count_m_lines(sdp: str) -> int:
    """How many media sections `SessionDescription.parse(sdp)` would find (it makes one per line
    starting with "m=", of `str.splitlines`), without parsing them."""
    return sum(1 for line in sdp.splitlines() if line.startswith("m="))


def _check_publishing(answer: SessionDescription, publishing: int) -> None:
    """The first `publishing` m-lines are the participant's publishing ones (module docstring):
    one it sends on must name its SSRCs, from which the SFU makes the stream it forwards.
    (aiortc and browsers name them; the mid extension only follows a stream that restarts.)"""
    for media in answer.media[:publishing]:
        if media.port != 0 and media.direction in ("sendrecv", "sendonly") and not media.ssrc:
            raise SignallingError(
                "bad-sdp",
                f"the answer's m-line {media.rtp.muxId!r} sends media but names no SSRC "
                "(a=ssrc): the SFU needs it to forward the stream",
            )


def _check_answer(answer: SessionDescription) -> None:
    """What aiortc's parser lets through but fails on later, out of the SFU's sight."""
    for media in answer.media:
        if media.port == 0:
            continue  # rejected m-line
        for candidate in media.ice_candidates:
            problem = _candidate_problem(candidate)
            if problem is not None:
                raise SignallingError("bad-sdp", f"an ICE candidate in the answer: {problem}")
        if media.dtls is None or not media.dtls.fingerprints:
            # aiortc would fail an assertion in its connect task and hang in "connecting"
            raise SignallingError("bad-sdp", "the answer has no DTLS fingerprint (a=fingerprint)")
        ssrcs = [x.ssrc for x in media.ssrc] + [
            item for group in media.ssrc_group for item in group.items
        ]
        if any(not isinstance(x, int) or not 0 <= x < 1 << 32 for x in ssrcs):
            raise SignallingError("bad-sdp", "an SSRC in the answer is not a 32-bit number")


class Participant:
    def __init__(
        self,
        room: Room,
        identity: str,
        publish: list[str],
        send_json: SendJson,
        config: SFUConfig,
        metrics: Metrics,
    ) -> None:
        self.room = room
        self.identity = identity
        self.publish = publish
        self.send_json = send_json
        self.config = config
        self.metrics = metrics
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.rtcp_ssrc = random.randrange(1, 1 << 32)
        self.sources: dict[str, SourceStream] = {}  # by publisher-side mid
        self.sources_by_ssrc: dict[int, SourceStream] = {}
        self.slots_by_ssrc: dict[int, Slot] = {}
        self._fir_seqs: dict[int, int] = {}  # slot SSRC -> last FIR sequence number from it
        self._nack_budget = TokenBucket(NACK_SEQS_RATE, NACK_SEQS_BURST, time.monotonic())
        self.slot_sources: dict[RTCRtpTransceiver, SourceStream | None] = {}
        # slot m-lines whose source ended, once the subscriber has answered them inactive
        self._free_m_lines: list[RTCRtpTransceiver] = []
        self._send_raw: Callable[..., None] | None = None
        self._negotiating = False
        self._renegotiate = False
        # m-lines of the offer outstanding (None while it is being made), answers refused to it
        self._offered_m_lines: int | None = None
        self._refused_answers = 0
        self._closed = False
        self.started = False  # publishing m-lines created: slots may be added from now on
        self._next_rr = time.monotonic() + RR_INTERVAL
        # Called with a reason when the media connection fails or the client closed it, or when
        # an offer goes unanswered: the server then ends the signalling session, which removes
        # the participant. Called once, through `end_session`.
        self.on_connection_lost: Callable[[str], None] = lambda reason: None
        # Why the session is ending, once it is: nothing may extend or renew it any more.
        self.ending: str | None = None
        # Unix time at which the latest room token given expires: the session ends then,
        # unless the client sends a fresher one (a member removed from the group gets none)
        self.token_expires_at = math.inf
        self._answer_overdue: asyncio.TimerHandle | None = None
        self._connect_overdue: asyncio.TimerHandle | None = None
        self.connected = False  # the media connection has been up
        # remote ICE candidates given so far (answers and trickles), by address
        self._remote_candidates: set[tuple[str, str, int]] = set()
        # trickled before the first answer, by address: given to aiortc once it is taken
        self._early_candidates: dict[tuple[str, str, int], Any] = {}
        self.pc.on("connectionstatechange", self._on_connection_state)

    def __repr__(self) -> str:
        return f"Participant({self.identity!r} in {self.room.name!r})"

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "connected":
            self.connected = True
            if self._connect_overdue is not None:
                self._connect_overdue.cancel()
        elif state in ("failed", "closed") and not self._closed:
            self.end_session("media connection lost")

    def _not_connected(self) -> None:
        if self._closed or self.connected:
            return
        logger.info("%r did not connect within %s s", self, self.config.connect_timeout)
        self.end_session(
            f"no media connection within {self.config.connect_timeout:g} s of the answer"
        )

    def end_session(self, reason: str) -> None:
        """Have the server end this participant's session, once: the first reason is the one the
        client is told (several causes may follow one another, e.g. a failed connection)."""
        if self.ending is not None:
            return
        self.ending = reason
        self.on_connection_lost(reason)

    # --- negotiation ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the publishing m-lines and a slot for every stream already in the room."""
        for kind in self.publish:
            transceiver = self.pc.addTransceiver(kind, direction="recvonly")
            transceiver.setCodecPreferences(_codec_preferences(kind))
            aiortc_hooks.capture_sender(transceiver.sender, lambda params: None)
            aiortc_hooks.capture_receiver(
                transceiver.receiver,
                lambda params, t=transceiver: self._on_publish_params(t, params),
            )
        # The publishing m-lines must come first in the first offer (see the module docstring).
        self.started = True
        for other in self.room.participants.values():
            if other is not self:
                for source in other.sources.values():
                    if not source.ended:
                        self.add_slot(source)
        await self.negotiate()

    async def negotiate(self) -> None:
        """Send a new offer, or remember to once the current offer is answered.

        Never raises (but when cancelled): other participants' joins and leaves must not fail
        because of this one. If no offer can be sent, the session ends (`end_session`): a
        participant left waiting for an offer would never get another stream, while a client
        told its session ended can join again.
        """
        if self._closed or self.pc.signalingState == "closed":
            return  # aiortc closes the connection itself once every DTLS transport is closed
        if self.ending is not None:
            return  # no offer after "session-ended"
        if self._negotiating:
            self._renegotiate = True
            return
        self._negotiating = True
        self._renegotiate = False
        self._offered_m_lines = None
        self._refused_answers = 0
        # What the offer's sendonly m-lines carry, taken with the directions the offer encodes:
        # a source may end while the offer is being made, and "streams" must match the SDP.
        feeding = [(t, source) for t, source in self.slot_sources.items() if source is not None]
        try:
            offer = await self.pc.createOffer()
            await self.pc.setLocalDescription(offer)
            self._offered_m_lines = _count_m_lines(self.pc.localDescription.sdp)
            streams = {  # mid -> publisher
                t.mid: {"identity": source.publisher, "kind": source.kind}
                for t, source in feeding
                if t.mid is not None
            }
            # A client that never answers would hold its seat and never get new streams.
            self._cancel_answer_timer()
            self._answer_overdue = asyncio.get_running_loop().call_later(
                self.config.answer_timeout, self._no_answer
            )
            await self.send_json(
                {"type": "offer", "sdp": self.pc.localDescription.sdp, "streams": streams}
            )
        except asyncio.CancelledError:
            self._abandon_offer()
            raise
        except Exception as exc:
            self._abandon_offer()
            if (
                self._closed
                or self.pc.signalingState == "closed"
                or isinstance(exc, ConnectionError)
            ):
                # the connection or the socket is going away: expected, and ended all the same
                logger.debug("no offer to %r: %s", self, exc)
            else:
                logger.exception("could not make an offer to %r: its session ends", self)
            self.end_session("the SFU could not renegotiate the media connection: join again")

    def _abandon_offer(self) -> None:
        """Forget an offer that was not sent, so that a later `negotiate` runs."""
        self._negotiating = False
        self._renegotiate = False
        self._offered_m_lines = None
        self._cancel_answer_timer()

    async def handle_answer(self, sdp: str) -> None:
        if not self._negotiating or self._offered_m_lines is None:
            raise SignallingError("unexpected-answer", "no offer is outstanding")
        if self._refused_answers >= MAX_REFUSED_ANSWERS:
            raise SignallingError(
                "bad-sdp",
                f"{MAX_REFUSED_ANSWERS} answers to this offer were refused: no more are read",
            )
        try:
            parsed, candidates = self._vet_answer(sdp)
            try:
                await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            except Exception as exc:  # aiortc raises ValueError, OperationError, ...
                raise SignallingError("bad-sdp", f"the answer was refused: {exc}") from exc
        except SignallingError:
            self._refused_answers += 1
            raise
        early, self._early_candidates = self._early_candidates, {}
        self._remote_candidates = candidates  # the early ones are in it (`_vet_answer`)
        self._negotiating = False
        self._cancel_answer_timer()
        if self._closed or self.pc.signalingState == "closed":
            return
        for candidate in early.values():  # trickled before the first answer (`handle_ice`)
            await self.pc.addIceCandidate(candidate)
        if (
            self._connect_overdue is None
            and self.pc.connectionState != "connected"
            and any(media.port != 0 for media in parsed.media)
        ):
            # aiortc connects in a task of its own, which may fail without changing the
            # connection's state: a client that never connects must not keep its seat either.
            # (Not while there is nothing to connect: a listener alone in a room has no m-line.)
            self._connect_overdue = asyncio.get_running_loop().call_later(
                self.config.connect_timeout, self._not_connected
            )
        for transceiver, fed_by in self.slot_sources.items():
            if (
                fed_by is None
                and transceiver.currentDirection == "inactive"
                and transceiver not in self._free_m_lines
            ):
                self._free_m_lines.append(transceiver)
        for transceiver in self.pc.getTransceivers():
            transport = transceiver.receiver.transport
            if aiortc_hooks.hook_transport(
                transport,
                self._on_rtp,
                self._on_rtcp,
                self.on_rtp_now,
                self.on_rtcp_now,
                uses_ssrc=self.sources_by_ssrc.__contains__,
            ):
                self._send_raw = aiortc_hooks.fast_sender(transport)
        if self._renegotiate:
            await self.negotiate()

    def _vet_answer(self, sdp: str) -> tuple[SessionDescription, set[tuple[str, str, int]]]:
        """Refuse an answer aiortc would take but the SFU cannot use, cheapest checks first;
        else return it parsed, and the remote ICE candidates (by address) there will be once
        it is taken."""
        if _count_m_lines(sdp) != self._offered_m_lines:
            raise SignallingError("bad-sdp", "the answer must have one m-line per offered m-line")
        try:
            parsed = SessionDescription.parse(sdp)
        except Exception as exc:
            raise SignallingError("bad-sdp", "the answer is not parsable SDP") from exc
        _check_answer(parsed)
        _check_publishing(parsed, len(self.publish))
        # The answer's candidates count against the same cap as trickled ones: aiortc adds
        # every answer's candidates to aioice, renegotiations included.
        candidates = self._remote_candidates | {
            (c.protocol.lower(), c.ip, c.port)
            for media in parsed.media
            if media.port != 0
            for c in media.ice_candidates
        }
        if len(candidates) > MAX_REMOTE_CANDIDATES:
            raise SignallingError(
                "bad-sdp", f"more than {MAX_REMOTE_CANDIDATES} ICE candidates in all"
            )
        return parsed, candidates

    def _cancel_answer_timer(self) -> None:
        if self._answer_overdue is not None:
            self._answer_overdue.cancel()
            self._answer_overdue = None

    def _no_answer(self) -> None:
        self._answer_overdue = None
        if self._closed or not self._negotiating:
            return
        logger.info("%r did not answer an offer within %s s", self, self.config.answer_timeout)
        self.end_session(f"no answer to the offer within {self.config.answer_timeout:g} s")

    async def handle_ice(self, candidate: Any) -> None:
        # aiortc puts all candidates in the SDP; trickled ones are accepted if they parse.
        from aiortc.sdp import candidate_from_sdp

        if not isinstance(candidate, dict) or not isinstance(candidate.get("candidate"), str):
            raise SignallingError("bad-message", "ice needs a candidate object")
        text = candidate["candidate"]
        if not text:
            return  # end-of-candidates
        try:
            parsed = candidate_from_sdp(text.removeprefix("candidate:"))
        except (ValueError, IndexError, AssertionError) as exc:
            raise SignallingError("bad-message", "unparsable ICE candidate") from exc
        problem = _candidate_problem(parsed)
        if problem is not None:
            raise SignallingError("bad-message", f"bad ICE candidate: {problem}")
        mid, index = candidate.get("sdpMid"), candidate.get("sdpMLineIndex")
        if not isinstance(mid, str | None) or not (
            index is None or (isinstance(index, int) and not isinstance(index, bool))
        ):
            raise SignallingError("bad-message", "sdpMid is a string, sdpMLineIndex an integer")
        if mid is None and index is None:
            raise SignallingError("bad-message", "an ICE candidate needs sdpMid or sdpMLineIndex")
        if self.connected:
            return  # the path is chosen and aiortc has no ICE restart: nothing to add it to
        address = (parsed.protocol.lower(), parsed.ip, parsed.port)
        if address not in self._remote_candidates:
            if len(self._remote_candidates) >= MAX_REMOTE_CANDIDATES:
                raise SignallingError(
                    "bad-message", f"more than {MAX_REMOTE_CANDIDATES} ICE candidates"
                )
            self._remote_candidates.add(address)
        parsed.sdpMid, parsed.sdpMLineIndex = mid, index
        if self.pc.remoteDescription is None:
            # Before the first answer aiortc takes a candidate but logs a WARNING for each one
            # (a flood at the signalling rate): kept until the answer, one per address (the cap).
            self._early_candidates[address] = parsed
            return
        await self.pc.addIceCandidate(parsed)

    # --- publishing -----------------------------------------------------------------------------

    def _on_publish_params(
        self, transceiver: RTCRtpTransceiver, params: RTCRtpReceiveParameters
    ) -> None:
        mid = params.muxId
        if mid in self.sources or not params.encodings or not params.codecs:
            return
        codec = params.codecs[0]
        encoding = params.encodings[0]
        rtx_pt = next(
            (
                c.payloadType
                for c in params.codecs
                if c.mimeType.lower().endswith("/rtx")
                and c.parameters.get("apt") == codec.payloadType
            ),
            None,
        )
        source = SourceStream(
            publisher=self.identity,
            kind=transceiver.kind,
            mid=mid,
            ssrc=encoding.ssrc,
            payload_type=codec.payloadType,
            clock_rate=codec.clockRate,
            ext_uris={e.id: e.uri for e in params.headerExtensions},
            send_rtcp=self._send_rtcp,
            rtcp_ssrc=self.rtcp_ssrc,
            metrics=self.metrics,
            rtx_ssrc=encoding.rtx.ssrc if encoding.rtx else None,
            rtx_payload_type=rtx_pt,
            pli_interval=self.config.pli_interval,
            on_audio_level=lambda level: self.room.speaker.add_level(self.identity, level),
            nack=any(fb.type == "nack" and not fb.parameter for fb in codec.rtcpFeedback),
        )
        self.sources[mid] = source
        self.sources_by_ssrc[source.ssrc] = source
        if source.rtx_ssrc is not None:
            self.sources_by_ssrc[source.rtx_ssrc] = source
        self.room.on_source_added(source)

    def _send_rtcp(self, packet: bytes) -> None:
        if self._send_raw is None:
            raise ConnectionError("transport not connected yet")
        self._send_raw(packet)

    # --- subscribing ----------------------------------------------------------------------------

    def add_slot(self, source: SourceStream) -> None:
        """Add a downstream m-line for `source`; it starts forwarding once answered."""
        if self._closed or self.pc.signalingState == "closed":
            # aiortc closes the connection when the client's DTLS closes, before the signalling
            # handler removes the participant: addTransceiver would raise in the publisher's
            # connect task (`on_source_added`), ending its connection and others' slots.
            return
        if source in self.slot_sources.values():
            return
        transceiver = self._free_m_line(source.kind)
        if transceiver is not None:
            # New SSRCs: a BYE for the old stream that reaches the client late (RTCP and
            # signalling travel apart) must not end the new one.
            aiortc_hooks.renew_sender_ssrc(transceiver.sender)
            transceiver.direction = "sendonly"
            self.slot_sources[transceiver] = source
            return
        transceiver = self.pc.addTransceiver(source.kind, direction="sendonly")
        transceiver.setCodecPreferences(_codec_preferences(source.kind))
        self.slot_sources[transceiver] = source
        aiortc_hooks.capture_receiver(transceiver.receiver, lambda params: None)
        aiortc_hooks.capture_sender(
            transceiver.sender, lambda params, t=transceiver: self._on_slot_params(t, params)
        )

    def _free_m_line(self, kind: str) -> RTCRtpTransceiver | None:
        """Take a slot m-line of this kind whose source ended and whose inactivity the subscriber
        has answered since (see `handle_answer`).

        Only then may the m-line carry another stream: the client has ended the old track and
        sees the next one as new. (Not merely "currentDirection is inactive": an m-line given to
        a source that ended again before the offer was answered still shows the inactive state
        of the answer before, and reusing it then would switch its stream under the client.)
        """
        for transceiver in self._free_m_lines:
            if transceiver.kind == kind:
                self._free_m_lines.remove(transceiver)
                return transceiver
        return None

    def _on_slot_params(self, transceiver: RTCRtpTransceiver, params: RTCRtpSendParameters) -> None:
        ssrc = aiortc_hooks.sender_ssrc(transceiver.sender)
        if ssrc in self.slots_by_ssrc or self._send_raw is None:
            return
        source = self.slot_sources.get(transceiver)
        if source is None or source.ended or not params.codecs:
            return
        slot = Slot(
            subscriber=self.identity,
            kind=transceiver.kind,
            ssrc=ssrc,
            mid=params.muxId,
            payload_type=params.codecs[0].payloadType,
            ext_ids={e.uri: e.id for e in params.headerExtensions},
            send=self._send_raw,
            metrics=self.metrics,
            send_parts=self._send_raw,
            nack=any(
                fb.type == "nack" and not fb.parameter for fb in params.codecs[0].rtcpFeedback
            ),
        )
        self.slots_by_ssrc[ssrc] = slot
        slot.attach(source)

    async def source_ended(self, source: SourceStream) -> None:
        """A stream this participant receives has ended: BYE, then make its m-line inactive."""
        changed = False
        for transceiver, fed_by in list(self.slot_sources.items()):
            if fed_by is not source:
                continue
            self.slot_sources[transceiver] = None
            ssrc = aiortc_hooks.sender_ssrc(transceiver.sender)
            slot = self.slots_by_ssrc.pop(ssrc, None)
            self._fir_seqs.pop(ssrc, None)
            if slot is not None:
                slot.attach(None)
                try:
                    self._send_rtcp(rtcp.pack_bye([ssrc]))
                except ConnectionError:
                    pass
            transceiver.direction = "inactive"
            changed = True
        if changed:
            await self.negotiate()

    # --- RTP/RTCP from the transport ------------------------------------------------------------

    async def _on_rtp(self, data: bytes) -> None:
        self.on_rtp_now(data)

    def on_rtp_now(self, data: bytes, arrival_ns: int | None = None) -> None:
        """One decrypted RTP packet from this participant: forward it, without awaiting.
        `arrival_ns`: when it reached the host (`time.time_ns()`), if known."""
        if len(data) < 12:
            return
        ssrc = int.from_bytes(data[8:12], "big")
        source = self.sources_by_ssrc.get(ssrc)
        if source is None:
            source = self._source_by_mid(ssrc, data)
        if source is not None:
            source.handle_rtp(data, arrival_ns=arrival_ns)

    def _source_by_mid(self, ssrc: int, data: bytes) -> SourceStream | None:
        """An unknown SSRC on a publishing m-line (RFC 8843 §9.2: found by its mid extension).

        The publisher restarted that stream (or its RTX stream) under a new SSRC: follow it,
        keeping every subscriber's slot and its numbering.
        """
        try:
            header = parse_rtp(data)
        except RtpParseError:
            return None
        for source in self.sources.values():
            if ssrc in source.left_ssrcs:
                return None  # a late packet of the stream before a restart: not another one
            mid = source.mid.encode()
            if not any(
                source.ext_uris.get(ext_id) == URI_MID and value == mid
                for ext_id, value in header.extensions
            ):
                continue
            if header.payload_type == source.payload_type:
                self.sources_by_ssrc.pop(source.ssrc, None)
                logger.info("%r restarted its %s stream as SSRC %d", self, source.kind, ssrc)
                source.restart(ssrc)
            elif source.rtx_payload_type is not None and (
                header.payload_type == source.rtx_payload_type
            ):
                if source.rtx_ssrc is not None:
                    self.sources_by_ssrc.pop(source.rtx_ssrc, None)
                source.rtx_ssrc = ssrc
            else:
                return None
            self.sources_by_ssrc[ssrc] = source
            return source
        return None

    async def _on_rtcp(self, data: bytes) -> None:
        self.on_rtcp_now(data)

    def on_rtcp_now(self, data: bytes) -> None:
        """One decrypted RTCP compound packet from this participant, handled without awaiting."""
        try:
            packets = rtcp.parse_rtcp(data)
        except ValueError:
            return
        now = time.monotonic()
        for packet in packets:
            if isinstance(packet, rtcp.RtcpSrPacket):
                source = self.sources_by_ssrc.get(packet.ssrc)
                # An RTX stream's own SR (libwebrtc sends them) would be taken for the media
                # stream's: its counts and, for the RR's LSR, its NTP time are another stream's.
                if source is not None and packet.ssrc == source.ssrc:
                    info = packet.sender_info
                    send_reports(
                        source.handle_sender_report(info.ntp_timestamp, info.rtp_timestamp, now)
                    )
            elif isinstance(packet, rtcp.NackPacket):
                slot = self.slots_by_ssrc.get(packet.media_ssrc)
                budget = int(self._nack_budget.available(now))
                if slot is not None and budget > 0:
                    self._nack_budget.spend(slot.handle_nack(packet, now, budget))
            elif isinstance(packet, rtcp.RtcpPsfbPacket):
                self._on_psfb(packet, now)
            # Receiver reports from subscribers end here: the SFU reports upstream itself.

    def _on_psfb(self, packet: rtcp.RtcpPsfbPacket, now: float) -> None:
        if packet.fmt == rtcp.PSFB_APP:
            # REMB names the streams it estimates in its FCI; each source relays what its
            # slowest subscribers can take (`SourceStream.relay_remb`)
            try:
                bitrate, ssrcs = rtcp.unpack_remb_fci(packet.fci)
            except (ValueError, struct.error):
                return
            # each SSRC once, each source once: a REMB may name one slot 255 times
            slots = [
                s
                for ssrc in dict.fromkeys(ssrcs)
                if (s := self.slots_by_ssrc.get(ssrc)) is not None
            ]
            if slots:
                self.metrics.rembs_received += 1  # one estimate, whatever streams it names
            for slot in slots:
                slot.remb = (bitrate, now)
            for source in dict.fromkeys(s.source for s in slots if s.source is not None):
                source.relay_remb(now)
            return
        targets: list[int] = []
        if packet.fmt == rtcp.PSFB_PLI:
            targets = [packet.media_ssrc]
        elif packet.fmt == rtcp.PSFB_FIR:
            # FIR names its targets in the FCI: SSRC(4) seq(1) reserved(3) (RFC 5104 §4.3.1.1);
            # a repeated sequence number is a retransmission of the same request (§4.3.1.2)
            fci = packet.fci
            for i in range(0, len(fci) - 7, 8):
                ssrc, seq = int.from_bytes(fci[i : i + 4], "big"), fci[i + 4]
                if self._fir_seqs.get(ssrc) != seq and ssrc in self.slots_by_ssrc:
                    self._fir_seqs[ssrc] = seq
                    targets.append(ssrc)
        for ssrc in targets:
            slot = self.slots_by_ssrc.get(ssrc)
            if slot is not None and slot.source is not None:
                self.metrics.plis_received += 1
                slot.source.request_keyframe_now(now)

    def tick(self, now: float) -> None:
        """Periodic work, called by the room's timer: upstream NACK retries and PLIs, RRs."""
        if self._closed or not self.started:
            return
        for source in list(self.sources.values()):
            source.tick(now)
        if now >= self._next_rr:
            self._next_rr = now + RR_INTERVAL * (0.5 + random.random())
            blocks = [b for s in self.sources.values() if (b := s.report_block(now)) is not None]
            if blocks and self._send_raw is not None:
                try:
                    self._send_raw(rtcp.pack_rr(self.rtcp_ssrc, blocks))
                except ConnectionError:
                    pass

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_answer_timer()
        if self._connect_overdue is not None:
            self._connect_overdue.cancel()
        for slot in self.slots_by_ssrc.values():
            slot.attach(None)
        self.slots_by_ssrc.clear()
        await self.pc.close()


class Room:
    def __init__(self, name: str, config: SFUConfig, metrics: Metrics) -> None:
        self.name = name
        self.config = config
        self.metrics = metrics
        self.participants: dict[str, Participant] = {}
        self.speaker = ActiveSpeakerDetector()
        self._task = asyncio.ensure_future(self._run())
        self._pending: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"Room({self.name!r}, {len(self.participants)} participants)"

    async def broadcast(self, message: dict[str, Any], exclude: str | None = None) -> None:
        for identity, participant in list(self.participants.items()):
            if identity != exclude:
                try:
                    await participant.send_json(message)
                except (ConnectionError, RuntimeError):
                    pass  # closing socket: its own handler cleans up

    def on_source_added(self, source: SourceStream) -> None:
        """Called from aiortc's connect task: schedule slots and renegotiation for the others."""
        for participant in list(self.participants.values()):
            # One that has not started yet picks the source up in its own start().
            if participant.identity != source.publisher and participant.started:
                participant.add_slot(source)
                self._spawn(participant.negotiate())

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                logger.exception("room %r: background task failed", self.name)

        task = asyncio.ensure_future(guarded())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def remove(self, participant: Participant) -> None:
        if self.participants.get(participant.identity) is not participant:
            return
        del self.participants[participant.identity]
        self.speaker.remove(participant.identity)
        for source in list(participant.sources.values()):
            source.end()
            for other in list(self.participants.values()):
                try:
                    await other.source_ended(source)
                except Exception:
                    logger.exception("room %r: could not end a stream for %r", self.name, other)
        await participant.close()
        await self.broadcast({"type": "participant-left", "identity": participant.identity})

    async def _run(self) -> None:
        """The room's one timer: every participant's `tick`, and the active speaker.

        One timer per room, not one per participant, and on a grid shared by every room of the
        process (`sleep_until_tick`): each timer wake-up of the event loop costs tens of
        microseconds, which at a few thousand packets per second is a visible share of the CPU.
        """
        next_speaker = time.monotonic() + self.config.speaker_interval
        try:
            while True:
                await sleep_until_tick()
                now = time.monotonic()
                for participant in list(self.participants.values()):
                    try:
                        participant.tick(now)
                    except Exception:
                        logger.exception("timer of %r failed", participant)
                if now >= next_speaker:
                    next_speaker = now + self.config.speaker_interval
                    try:
                        speaker = self.speaker.tick()
                    except Exception:
                        logger.exception("room %r: active-speaker detection failed", self.name)
                        continue
                    if speaker is not None:
                        self._spawn(self.broadcast({"type": "speaker", "identity": speaker}))
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        for participant in list(self.participants.values()):
            await participant.close()
        self.participants.clear()
