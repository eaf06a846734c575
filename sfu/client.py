"""A signalling client for the SFU, for aiortc endpoints (tests, the conclave app, benchmarks).

It owns one RTCPeerConnection, adds the tracks to publish before the first offer (so they match
the SFU's publishing m-lines, see `sfu.room`), answers every offer and reports each received
track with the identity of its publisher. It never touches media: E2EE transforms are installed
by the caller through `on_track` and on the senders it publishes with.

It negotiates only `CODECS` (the SFU picks from what the client answers, so the SFU cannot pick
another): those whose frames the E2EE transforms protect as a whole behind a small clear prefix.
Not H.264: there each NAL unit is a ciphertext of its own, which an SFU could drop, reorder or
splice between frames unnoticed. An offer of a kind with none of them is refused: no media
rather than weakly protected media.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.sdp import SessionDescription

from sfu.aiortc_hooks import demultiplex_stun, renew_receiver
from sfu.errors import Redirect, SignallingError

logger = logging.getLogger(__name__)

TrackCallback = Callable[[MediaStreamTrack, RTCRtpTransceiver, dict[str, str]], None]
MAX_EVENTS = 1000  # pushed signalling messages kept for `next_event` / `events`
# The SFU is not trusted: what it sends is bounded before anything acts on it.
JOIN_TIMEOUT = 15.0  # seconds for the SFU to answer a join
MAX_M_LINES = 256  # per offer: two per participant of a room of 128 (aiortc: ~170 kB each)
# distinct remote ICE candidates, over all offers: aioice pays a list search and a re-sort of
# its check list for each one, so thousands would block the event loop for minutes (an SFU
# host has a few addresses: the SFU caps a client's at 32 for the same reason)
MAX_REMOTE_CANDIDATES = 64
MAX_ERROR_TEXT = 300  # characters of an SFU's error message passed on
# The codecs negotiated, by kind (MIME types as aiortc spells them; rtx is retransmission).
CODECS: Mapping[str, Sequence[str]] = {
    "audio": ("audio/opus",),
    "video": ("video/VP8", "video/rtx"),
}


class SFUClient:
    def __init__(
        self,
        url: str,
        room: str,
        identity: str,
        token: str,
        tracks: list[MediaStreamTrack] | None = None,
        on_track: TrackCallback | None = None,
        *,
        codecs: Mapping[str, Sequence[str]] = CODECS,
    ) -> None:
        demultiplex_stun()
        self._codecs = {kind: _codec_preferences(kind, codecs) for kind in ("audio", "video")}
        self.url = url
        self.room = room
        self.identity = identity
        self._token = token
        self.tracks = tracks or []
        self.on_track = on_track
        self.pc = RTCPeerConnection(
            RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)
        )
        self.streams: dict[str, dict[str, str]] = {}  # mid -> {"identity", "kind"}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.offers_answered = 0
        self.answered = asyncio.Event()
        self._retired: set[RTCRtpTransceiver] = set()  # inactive m-lines, receivers stopped
        self._remote_candidates: set[tuple[str, str, int]] = set()  # by address
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)
        # Senders exist from here on, so callers can install E2EE encoders before joining.
        for track in self.tracks:
            self.pc.addTrack(track)
        for transceiver in self.pc.getTransceivers():
            transceiver.setCodecPreferences(self._codecs[transceiver.kind])

    def __repr__(self) -> str:
        return f"SFUClient({self.identity!r} in {self.room!r})"

    @property
    def senders(self) -> list[Any]:
        return [t.sender for t in self.pc.getTransceivers() if t.sender.track is not None]

    async def join(self) -> dict[str, Any]:
        """Join the room; returns the "joined" message or raises SignallingError.

        Follows one "redirect" to the SFU worker process that serves the room.
        """
        try:
            try:
                return await self._join_once()
            except Redirect as exc:
                self.url = _same_host(self.url, exc.url)  # the peer connection is still unused
                try:
                    return await self._join_once()
                except SignallingError as err:
                    if err.code != "timeout":
                        raise
                    # A worker that died since the redirect: its port still queues connections
                    raise SignallingError(
                        "timeout",
                        f"{err}: the room's worker process ({_url_text(self.url)}) may be "
                        "restarting; try again in a few seconds",
                    ) from None
        except BaseException:
            await self.close()
            raise

    async def _join_once(self) -> dict[str, Any]:
        try:
            async with asyncio.timeout(JOIN_TIMEOUT):
                return await self._join_exchange()
        except TimeoutError:
            await self._close_signalling()
            raise SignallingError(
                "timeout", f"the SFU did not answer the join within {JOIN_TIMEOUT:g} s"
            ) from None

    async def _join_exchange(self) -> dict[str, Any]:
        # aiohttp follows HTTP redirects of the handshake, to any host and from TLS to plain:
        # the join, and its room token, would go there. Only the SFU's "redirect" is followed.
        refuse = aiohttp.TraceConfig()
        refuse.on_request_redirect.append(_refuse_http_redirect)
        self._session = aiohttp.ClientSession(trace_configs=[refuse])
        try:
            self._ws = await self._session.ws_connect(self.url, heartbeat=30)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 429:
                raise
            raise SignallingError(
                "busy", "the SFU has too many connections waiting to join: try again shortly"
            ) from None
        await self.send(
            {
                "type": "join",
                "room": self.room,
                "identity": self.identity,
                "token": self._token,
                "publish": [t.kind for t in self.tracks],
            }
        )
        reply = await self._ws.receive()
        try:
            msg = json.loads(reply.data) if reply.type == aiohttp.WSMsgType.TEXT else {}
        except ValueError:
            msg = {}
        if not isinstance(msg, dict) or msg.get("type") != "joined":
            await self._close_signalling()
            if not isinstance(msg, dict) or "code" not in msg:
                raise SignallingError("closed", "the SFU closed the connection without joining")
            if msg["code"] == "redirect" and isinstance(msg.get("url"), str):
                raise Redirect(msg["url"])
            reason = msg.get("reason")
            raise SignallingError(
                printable_text(msg["code"]),
                printable_text(msg.get("message", "")),
                reason=printable_text(reason) if reason else None,
            )
        self._reader = asyncio.ensure_future(self._read())
        return msg

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_str(json.dumps(message))

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
                if message.get("type") == "offer":
                    await self._answer(message)
                else:
                    self._push(message)
            except Exception as exc:  # a bad offer must not silently stop the reader
                logger.exception("%r could not handle a signalling message", self)
                self._push({"type": "client-error", "message": str(exc)})
        self._push({"type": "closed"})

    def _push(self, event: dict[str, Any]) -> None:
        # Speaker and membership events keep coming for the whole call: a caller that does not
        # read them loses the oldest, instead of this client growing without bound.
        if self.events.qsize() >= MAX_EVENTS:
            self.events.get_nowait()
        self.events.put_nowait(event)

    async def _answer(self, message: dict[str, Any]) -> None:
        sdp = message.get("sdp")
        if not isinstance(sdp, str):
            raise ValueError("an offer without SDP")
        m_lines = sum(1 for line in sdp.splitlines() if line.startswith("m="))
        if m_lines > MAX_M_LINES:
            raise ValueError(f"an offer of {m_lines} m-lines (at most {MAX_M_LINES})")
        # Each offer names the publisher of every m-line that carries media: the map is
        # replaced, not merged, so it holds what the latest offer said and no more.
        description = SessionDescription.parse(sdp)
        candidates = self._remote_candidates | {
            (c.protocol.lower(), c.ip, c.port)
            for media in description.media
            for c in media.ice_candidates
        }
        if len(candidates) > MAX_REMOTE_CANDIDATES:
            raise ValueError(
                f"an offer of {len(candidates)} ICE candidates (at most {MAX_REMOTE_CANDIDATES})"
            )
        self._check_codecs(description)
        self.streams = _streams(message.get("streams", {}), m_lines)
        if self._retired:
            self._renew_reused(description)
        self._add_receivers(description)
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        self._remote_candidates = candidates
        answer = await self.pc.createAnswer()
        await self.pc.setLocalDescription(answer)
        await self.send({"type": "answer", "sdp": self.pc.localDescription.sdp})
        # The SFU makes the m-lines of a stream that ended inactive until it reuses them for
        # another stream (see `sfu.room`). Stop their receivers: aiortc would otherwise keep each
        # one's decoder and its RTCP task, which sends the SFU a receiver report every second.
        for transceiver in self.pc.getTransceivers():
            if transceiver.currentDirection == "inactive" and transceiver not in self._retired:
                self._retired.add(transceiver)
                await transceiver.receiver.stop()
        self.offers_answered += 1
        self.answered.set()

    def _check_codecs(self, description: SessionDescription) -> None:
        """Refuse an offer with an m-line in none of our codecs (before anything changes)."""
        for media in description.media:
            if media.kind not in self._codecs:
                continue
            ours = {c.mimeType.lower() for c in self._codecs[media.kind]} - {"video/rtx"}
            offered = {c.mimeType.lower() for c in media.rtp.codecs}
            if not ours & offered:
                raise ValueError(
                    f"the SFU offered {media.kind} (mid {printable_text(media.rtp.muxId)!r}) in "
                    f"{printable_text(', '.join(sorted(offered)) or 'no codec')} only; this "
                    f"client takes {', '.join(sorted(ours))}, which end-to-end encryption "
                    "protects whole"
                )

    def _add_receivers(self, description: SessionDescription) -> None:
        """A receiving transceiver, restricted to our codecs, for each m-line of the offer that
        no transceiver will take: aiortc would create it in `setRemoteDescription` and agree
        on every codec both support before anyone could restrict it. Matches m-lines to
        transceivers as `setRemoteDescription` does (the first of the kind with no mid or
        that mid), so that each one made here is taken there."""
        pool = [[t.kind, t.mid] for t in self.pc.getTransceivers()]
        for media in description.media:
            if media.kind not in self._codecs:
                continue
            mid = media.rtp.muxId
            match = next((e for e in pool if e[0] == media.kind and e[1] in (None, mid)), None)
            if match is not None:
                match[1] = mid
                continue
            transceiver = self.pc.addTransceiver(media.kind, direction="recvonly")
            transceiver.setCodecPreferences(self._codecs[media.kind])
            pool.append([media.kind, mid])

    def _renew_reused(self, description: SessionDescription) -> None:
        """Fresh receivers for retired m-lines that this offer makes send media again."""
        reused = {
            media.rtp.muxId
            for media in description.media
            if media.direction in ("sendonly", "sendrecv")
        }
        for transceiver in list(self._retired):
            if transceiver.mid in reused:
                self._retired.discard(transceiver)
                renew_receiver(transceiver)

    def _on_track(self, event: Any) -> None:
        # aiortc passes the track; find its transceiver to name the publisher.
        track = event if isinstance(event, MediaStreamTrack) else event.track
        transceiver = next(t for t in self.pc.getTransceivers() if t.receiver.track is track)
        info = self.streams.get(transceiver.mid or "", {})
        if self.on_track is not None:
            self.on_track(track, transceiver, info)

    async def next_event(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """Wait for the next pushed message of this type (others are discarded)."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if event.get("type") == type_:
                    return event

    async def renew_token(self, token: str) -> None:
        """Give the SFU a fresh room token before the one joined with expires (the SFU ends
        the session then). Its answer comes as an event: "token-accepted" with the new expiry,
        an "error" with code "token", or one with code "session-ended" if it came too late."""
        self._token = token
        await self.send({"type": "token", "token": token})

    async def leave(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self.send({"type": "leave"})
        await self.close()

    async def _close_signalling(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def close(self) -> None:
        await self._close_signalling()
        await self.pc.close()


def _codec_preferences(kind: str, codecs: Mapping[str, Sequence[str]]) -> list[Any]:
    """aiortc's capabilities of `kind` among the MIME types `codecs` names for it."""
    wanted = {name.lower() for name in codecs.get(kind, ())}
    found: list[RTCRtpCodecCapability] = [
        c for c in RTCRtpSender.getCapabilities(kind).codecs if c.mimeType.lower() in wanted
    ]
    if not any(c.mimeType.lower() != "video/rtx" for c in found):
        # aiortc reads no preference as "every codec": that must never happen by accident
        raise ValueError(f"no {kind} codec that aiortc supports among {sorted(wanted)}")
    return found


def printable_text(value: object, limit: int = MAX_ERROR_TEXT) -> str:
    """An SFU's text for people to read: printable, and at most `limit` characters."""
    return "".join(c if c.isprintable() else "?" for c in str(value)[:limit])


def _url_text(url: str) -> str:
    """`url` for a message (`_text`), a password in it shown as ***: errors get printed.

    Split by hand as urlsplit splits the authority (after "//", up to "/", "?" or "#"; the
    user information up to its last "@"), not by urlsplit: the URLs worth an error are also
    those it refuses (a bad IPv6 address), and one with no scheme still has a password.
    """
    before, slashes, rest = url.partition("//")
    if not slashes:
        before, rest = "", url
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        rest = f"{user}:***@{host}{rest[end:]}"
    return printable_text(before + slashes + rest)


def _streams(value: object, m_lines: int) -> dict[str, dict[str, str]]:
    """An offer's "streams", checked: mid -> {"identity": str, "kind": "audio" | "video"}."""
    if not isinstance(value, dict) or len(value) > m_lines:
        raise ValueError("an offer's streams must map its m-lines' mids to publishers")
    out = {}
    for mid, info in value.items():
        if not (
            isinstance(mid, str)
            and len(mid) <= 32
            and isinstance(info, dict)
            and isinstance(info.get("identity"), str)
            and 0 < len(info["identity"]) <= 512
            and info.get("kind") in ("audio", "video")
        ):
            raise ValueError(f"an offer's stream entry for mid {str(mid)[:32]!r} is malformed")
        out[mid] = {"identity": info["identity"], "kind": info["kind"]}
    return out


PROBE_TIMEOUT = 10.0  # seconds for `probe`
SIGNAL_PATH = "/v1/signal"  # where `sfu.server` serves the signalling WebSocket


async def probe(url: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Check, without joining, that `url` is an SFU's signalling WebSocket: open it, close it.

    For a caller about to do what is hard to undo before it needs the SFU (a member joining
    the group of the call). Raises SignallingError with code "unreachable" (no connection),
    "not-an-sfu" (a server that refused the WebSocket handshake: a wrong port or path), or
    "redirect" (an HTTP redirect, which no join follows either). Says nothing of the room
    token: only a join can tell whether the SFU takes it. An "unreachable" for a connection
    that could not be made has aiohttp's ClientConnectorError as its `__cause__`.
    """
    refuse = aiohttp.TraceConfig()
    refuse.on_request_redirect.append(_refuse_http_redirect)
    try:
        async with (
            asyncio.timeout(timeout),
            aiohttp.ClientSession(trace_configs=[refuse]) as session,
            session.ws_connect(url) as ws,
        ):
            await ws.close()
    except SignallingError:
        raise
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 429:
            return  # an SFU, busy right now: the join will retry or say so
        raise SignallingError(
            "not-an-sfu",
            f"{_url_text(url)} did not answer as an SFU's signalling WebSocket (HTTP {exc.status})"
            f"{_path_hint(url)}",
        ) from None
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        # (ValueError: a URL aiohttp cannot use, such as one with no host)
        if isinstance(exc, TimeoutError):
            why = "no answer"
        elif isinstance(exc, ValueError | aiohttp.NonHttpUrlClientError):
            # (InvalidURL is a ValueError) their text is the URL itself, password and all
            why = "not a ws(s):// or http(s):// URL with a host and port it can use"
        else:
            why = str(exc) or type(exc).__name__
        # aiohttp's connection failure stays the cause, for a caller to put in its own words
        # (its text names the host and port, no more of the URL: no password)
        raise SignallingError(
            "unreachable", f"cannot reach the SFU at {_url_text(url)}: {why}"
        ) from (exc if isinstance(exc, aiohttp.ClientConnectorError) else None)


def _path_hint(url: str) -> str:
    """For a URL whose path is not the SFU's signalling path (`SIGNAL_PATH`), what it is: with
    no path at all, the same URL with it to try; "" for one that has it (the path is right:
    the server is no SFU, and the path no clue)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    if parts.path == SIGNAL_PATH:
        return ""
    hint = f": an SFU's signalling URL ends in {SIGNAL_PATH}"
    if parts.path.strip("/") or parts.query or parts.fragment:
        return hint  # another path: a prefix of a proxy's, or a typo, not to guess
    fixed = urlunsplit(parts._replace(path=SIGNAL_PATH))
    return f"{hint}: did you mean '{_url_text(fixed)}'?"


async def _refuse_http_redirect(
    session: aiohttp.ClientSession,
    context: object,
    params: aiohttp.TraceRequestRedirectParams,
) -> None:
    location = params.response.headers.get("Location", "")
    raise SignallingError(
        "redirect",
        f"the SFU redirected the handshake to {printable_text(location)!r}: not followed",
    )


def _same_host(current: str, target: str) -> str:
    """The URL to follow a redirect to, on the host this client already talks to.

    A redirect names another worker process of the same SFU (`python -m sfu --workers N`: the
    same host, another port); the worker may name its host as the address it listens on
    (0.0.0.0), which the client cannot reach. So the client keeps its own host and takes only
    the scheme, port and path. A redirect to another named host, with credentials, or from TLS
    to plain, is refused: it would hand the room token to whoever the SFU names.
    """
    old, new = urlsplit(current), urlsplit(target)
    secure = {"https", "wss"}
    try:
        port = new.port
        ok = (
            new.scheme in ("http", "https", "ws", "wss")
            and new.hostname in (old.hostname, "0.0.0.0", "::")
            and new.username is None
            and new.password is None
            and not (old.scheme in secure and new.scheme not in secure)
        )
    except ValueError:  # a bad port
        ok = False
    if not ok or old.hostname is None:
        raise SignallingError(
            "redirect",
            f"the SFU redirected to {printable_text(target)!r}, not to one of its own workers",
        )
    host = f"[{old.hostname}]" if ":" in old.hostname else old.hostname
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((new.scheme, netloc, new.path, new.query, ""))
