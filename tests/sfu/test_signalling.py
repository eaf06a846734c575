"""Access control, limits and malformed signalling: refused with an error reply, never a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sfu.client import SFUClient
from sfu.config import SFUConfig
from sfu.errors import ConfigError, SignallingError
from sfu.ratelimit import TokenBucket
from sfu.tokens import issue_room_token
from tests.sfu.harness import SECRET, Harness, wait_until


@pytest.fixture
async def harness():
    h = Harness(max_rooms=2, max_participants_per_room=2, max_message_bytes=2048)
    await h.start()
    yield h
    await h.stop()


async def _join_raw(url: str, message: object) -> tuple[list[dict], bool]:
    """Send one join message; return the replies and whether the SFU closed the socket."""
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        await ws.send_str(message if isinstance(message, str) else json.dumps(message))
        replies = []
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            replies.append(json.loads(msg.data))
            if replies[-1]["type"] in ("error", "joined"):
                break
        try:
            await ws.receive(timeout=1)
        except TimeoutError:
            pass  # not closed: the SFU waits for a better join
        return replies, ws.closed


CANDIDATE = "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"


@contextlib.asynccontextmanager
async def running(**config: Any) -> AsyncIterator[Harness]:
    """An SFU with this configuration, stopped at the end."""
    h = Harness(**config)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


async def _joined(ws: Any, identity: str, publish: list[str] | None = None) -> None:
    """Join "room" as `identity` on an open signalling socket and read the "joined" reply."""
    token = issue_room_token(SECRET, "room", identity, int(time.time()) + 60)
    await ws.send_str(json.dumps({**_join("room", identity, token), "publish": publish or []}))
    assert (await ws.receive_json(timeout=5))["type"] == "joined"


def _join(room: str, identity: str, token: str) -> dict:
    return {"type": "join", "room": room, "identity": identity, "token": token, "publish": []}


@pytest.mark.parametrize(
    ("token_args", "reason"),
    [
        ((b"another-secret-0123456789", "room", "alice", 60), "bad signature"),
        ((SECRET, "room", "alice", -1), "expired"),
        ((SECRET, "other-room", "alice", 60), "wrong room"),
        ((SECRET, "room", "mallory", 60), "wrong identity"),
    ],
)
async def test_bad_tokens_are_refused(harness: Harness, token_args: tuple, reason: str) -> None:
    secret, room, identity, ttl = token_args
    token = issue_room_token(secret, room, identity, int(time.time()) + ttl)
    replies, closed = await _join_raw(harness.url, _join("room", "alice", token))
    assert replies == [
        {"type": "error", "code": "token", "message": replies[0]["message"], "reason": reason}
    ]
    assert closed
    assert harness.server.rooms == {}
    assert harness.server.metrics.tokens_refused == 1


async def test_malformed_token_is_refused(harness: Harness) -> None:
    replies, closed = await _join_raw(harness.url, _join("room", "alice", "v1.garbage"))
    assert replies[0]["code"] == "token" and replies[0]["reason"] == "malformed"
    assert closed


async def test_client_sees_refusal_as_signalling_error(harness: Harness) -> None:
    client = SFUClient(harness.url, "room", "alice", "v1.x.y")
    with pytest.raises(SignallingError) as info:
        await client.join()
    assert info.value.code == "token"
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("not json", "bad-json"),
        ("[1, 2]", "bad-message"),
        ('{"type": 7}', "bad-message"),
        ('{"type": "answer", "sdp": "x"}', "not-joined"),
        ('{"type": "join", "room": "", "identity": "a", "token": "t"}', "bad-message"),
        (
            '{"type": "join", "room": "r", "identity": "a", "token": "t", "publish": "all"}',
            "bad-message",
        ),
        ("[" * 1000 + "]" * 1000, "bad-json"),  # nested deeper than json's recursion limit
        ('{"type": "join", "room": "\\ud800", "identity": "a", "token": "t"}', "bad-message"),
        (json.dumps({"type": "join", "pad": "x" * 3000}), "limit"),  # over max_message_bytes
    ],
)
async def test_malformed_messages_before_join_get_error_replies(
    harness: Harness, message: str, code: str
) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(harness.url) as ws:
        await ws.send_str(message)
        reply = await ws.receive_json(timeout=5)
        assert reply["type"] == "error" and reply["code"] == code
        # the socket stays usable: a valid join still works
        token = issue_room_token(SECRET, "room", "alice", int(time.time()) + 60)
        await ws.send_str(json.dumps(_join("room", "alice", token)))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"


async def test_malformed_messages_after_join_get_error_replies(harness: Harness) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(harness.url) as ws:
        token = issue_room_token(SECRET, "room", "alice", int(time.time()) + 60)
        await ws.send_str(json.dumps({**_join("room", "alice", token), "publish": ["audio"]}))
        assert (await ws.receive_json(timeout=5))["type"] == "joined"
        offer = await ws.receive_json(timeout=5)
        assert offer["type"] == "offer"
        for message, code in [
            ("{", "bad-json"),
            ('{"type": "dance"}', "unknown-type"),
            ('{"type": "offer", "sdp": "v=0"}', "unsupported"),
            (json.dumps(_join("room", "alice", token)), "already-joined"),
            ('{"type": "answer", "sdp": "v=0\\r\\nnonsense"}', "bad-sdp"),
            ('{"type": "answer", "sdp": 5}', "bad-message"),
            ('{"type": "ice", "candidate": {"candidate": "candidate:bogus"}}', "bad-message"),
            (json.dumps({"type": "ice", "candidate": {"candidate": CANDIDATE}}), "bad-message"),
            (
                json.dumps(
                    {"type": "ice", "candidate": {"candidate": CANDIDATE, "sdpMLineIndex": "0"}}
                ),
                "bad-message",
            ),
            (json.dumps({"type": "ice", "pad": "x" * 3000}), "limit"),
        ]:
            await ws.send_str(message)
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "error" and reply["code"] == code, (message, reply)
        await ws.send_bytes(b"\x00")
        assert (await ws.receive_json(timeout=5))["code"] == "bad-message"
        # a well-formed trickled candidate is taken silently: the next reply is for the next
        await ws.send_str(
            json.dumps({"type": "ice", "candidate": {"candidate": CANDIDATE, "sdpMid": "0"}})
        )
        await ws.send_str('{"type": "dance"}')
        assert (await ws.receive_json(timeout=5))["code"] == "unknown-type"
    assert harness.server.rooms == {} or all(
        not r.participants for r in harness.server.rooms.values()
    )


async def test_a_client_that_leaves_an_offer_unanswered_is_removed() -> None:
    async with running(answer_timeout=0.5) as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            # the SFU arms the answer timer before it sends the offer: time from before the join,
            # so that a slow delivery of the offer does not shorten the measured wait
            started = time.monotonic()
            await _joined(ws, "mute")
            assert (await ws.receive_json(timeout=5))["type"] == "offer"
            assert h.server.metrics.participants() == 1
            reply = await ws.receive_json(timeout=5)  # never answered
            assert reply["type"] == "error" and reply["code"] == "session-ended"
            assert "no answer to the offer within 0.5 s" in reply["message"]
            # the in-process SFU's loop.time() is time.monotonic(): never before the timeout
            assert 0.5 <= time.monotonic() - started < 3
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        assert await wait_until(lambda: h.server.metrics.participants() == 0, timeout=5)


async def test_an_answered_offer_stops_the_answer_timer() -> None:
    async with running(answer_timeout=0.5) as h:
        peer = await h.join("talker")
        await asyncio.sleep(1.5)  # three timeouts: the answered offer must not end the session
        assert h.server.metrics.participants() == 1
        assert peer.client.offers_answered >= 1


async def test_limits_on_rooms_and_participants(harness: Harness) -> None:
    def token(room: str, identity: str) -> str:
        return issue_room_token(SECRET, room, identity, int(time.time()) + 60)

    async with aiohttp.ClientSession() as session:
        sockets = []
        for room, identity in [("r1", "a"), ("r1", "b"), ("r2", "c")]:
            ws = await session.ws_connect(harness.url)
            await ws.send_str(json.dumps(_join(room, identity, token(room, identity))))
            assert (await ws.receive_json(timeout=5))["type"] == "joined"
            sockets.append(ws)
        replies, closed = await _join_raw(harness.url, _join("r1", "d", token("r1", "d")))
        assert replies[0]["code"] == "limit" and "full" in replies[0]["message"] and closed
        replies, closed = await _join_raw(harness.url, _join("r3", "e", token("r3", "e")))
        assert replies[0]["code"] == "limit" and "room limit" in replies[0]["message"]
        replies, _ = await _join_raw(harness.url, _join("r2", "c", token("r2", "c")))
        assert replies[0]["code"] == "duplicate"
        assert harness.server.metrics.participants() == 3
        for ws in sockets:
            await ws.close()


async def test_metrics_endpoint(harness: Harness) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(harness.url.replace("/v1/signal", "/metrics")) as resp:
            assert resp.status == 200
            # the Prometheus text exposition format announces its version
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    assert "sfu_rooms 0" in text
    assert "# TYPE sfu_forwarding_latency_seconds histogram" in text
    assert 'sfu_forwarding_latency_seconds_bucket{le="+Inf"} 0' in text
    for name in ("packets_forwarded", "bytes_forwarded", "nacks_received", "plis_sent"):
        assert f"sfu_{name}_total 0" in text


def test_the_message_limit_grows_with_the_room_size_unless_set() -> None:
    from sfu.config import ANSWER_BYTES_PER_M_LINE, SFUConfig
    from sfu.errors import ConfigError

    def limit(participants: int, **kw: int) -> int:
        config = SFUConfig(token_secret=SECRET, max_participants_per_room=participants, **kw)
        return config.max_message_bytes

    assert limit(2) == limit(8) == 64 * 1024  # never below 64 KiB
    # a full room: two publishing m-lines, two per other participant
    for participants in (16, 64):
        assert limit(participants) >= 2 * participants * ANSWER_BYTES_PER_M_LINE
    assert limit(64) > limit(16)
    assert limit(64, max_message_bytes=4096) == 4096  # set explicitly: kept
    with pytest.raises(ConfigError, match="at least 1024"):
        limit(2, max_message_bytes=100)


async def test_unread_events_are_bounded_and_the_oldest_go() -> None:
    from sfu.client import MAX_EVENTS

    client = SFUClient("http://127.0.0.1:9/v1/signal", "room", "idle", "token")
    try:
        for i in range(MAX_EVENTS + 5):
            client._push({"type": "speaker", "identity": f"p{i}"})
        assert client.events.qsize() == MAX_EVENTS
        assert client.events.get_nowait()["identity"] == "p5"
    finally:
        await client.close()


async def test_a_join_slower_than_the_join_deadline_is_not_cut_short(monkeypatch) -> None:
    from sfu.room import Participant

    start = Participant.start

    async def slow_start(self: Participant) -> None:
        await asyncio.sleep(0.6)  # a busy SFU: joining outlasts the join deadline
        await start(self)

    monkeypatch.setattr(Participant, "start", slow_start)
    async with running(join_timeout=0.3) as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "late")
            assert (await ws.receive_json(timeout=5))["type"] == "offer"
            assert h.server.metrics.participants() == 1
        assert await wait_until(lambda: h.server.rooms == {}, timeout=5)


def _small_receive_buffer(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_a_client_that_stops_reading_stalls_nobody_and_is_dropped() -> None:
    # The replies to its messages stand in for the room's events a slow client leaves unread:
    # without a rate limit to drop them, its messages back the SFU's writes up soon.
    unlimited = {"signal_rate": 1e9, "signal_burst": 10**9}
    async with running(
        max_rooms=2, max_participants_per_room=2, max_message_bytes=2048, **unlimited
    ) as harness:
        await _stalled_reader(harness)


async def _stalled_reader(harness: Harness) -> None:
    connector = aiohttp.TCPConnector(socket_factory=_small_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as slow_session:
        slow = await slow_session.ws_connect(harness.url)
        await _joined(slow, "slow")
        # from now on the slow client reads nothing, while every message it sends gets a reply;
        # small socket buffers on both ends make the SFU's writes to it back up soon
        slow._conn.transport.pause_reading()  # type: ignore[union-attr]
        [outbox] = harness.server._sockets
        sock = outbox._transport.get_extra_info("socket")  # type: ignore[union-attr]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for _ in range(200):
            for _ in range(100):
                await slow.send_str('{"type": "dance"}')
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            if outbox._queue:
                break  # the SFU's writes to it are stuck
        assert outbox._queue and not outbox._idle.is_set()
        async with aiohttp.ClientSession() as session, session.ws_connect(harness.url) as ws:
            # the room's broadcasts to the slow client do not hold up anyone else's join
            token = issue_room_token(SECRET, "room", "victim", int(time.time()) + 60)
            await ws.send_str(json.dumps(_join("room", "victim", token)))
            assert (await ws.receive_json(timeout=2))["type"] == "joined"
            # once too much waits for it, the slow client is disconnected and leaves the room
            for _ in range(100):
                try:
                    for _ in range(100):
                        await slow.send_str('{"type": "dance"}')
                except ConnectionError:
                    break
                await asyncio.sleep(0.01)
                if "slow" not in harness.server.rooms["room"].participants:
                    break
            assert await wait_until(
                lambda: list(harness.server.rooms["room"].participants) == ["victim"], timeout=5
            )
            seen = [await ws.receive_json(timeout=5) for _ in range(2)]  # and its first offer
            assert {"type": "participant-left", "identity": "slow"} in seen
        await slow.close()


async def _offer_and_answer(ws: Any) -> tuple[Any, str]:
    """Join's first offer answered by a real aiortc connection: (that connection, answer SDP)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    offer = await ws.receive_json(timeout=5)
    assert offer["type"] == "offer"
    pc = RTCPeerConnection()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return pc, pc.localDescription.sdp


async def test_answers_aiortc_would_choke_on_later_are_refused_at_once() -> None:
    async with running() as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "pub", ["video"])
            pc, sdp = await _offer_and_answer(ws)
            lines = sdp.splitlines()
            no_fingerprint = "\r\n".join(x for x in lines if not x.startswith("a=fingerprint"))
            m_line = next(i for i, x in enumerate(lines) if x.startswith("m="))
            huge_ssrc = "\r\n".join(
                [*lines[: m_line + 1], "a=ssrc:6586707130 cname:x", *lines[m_line + 1 :]]
            )
            for bad, why in [(no_fingerprint, "fingerprint"), (huge_ssrc, "32-bit")]:
                await ws.send_str(json.dumps({"type": "answer", "sdp": bad + "\r\n"}))
                reply = await ws.receive_json(timeout=5)
                assert reply["code"] == "bad-sdp" and why in reply["message"]
            # nothing was taken from them: the genuine answer still connects
            await ws.send_str(json.dumps({"type": "answer", "sdp": sdp}))
            [participant] = h.server.rooms["room"].participants.values()
            assert await wait_until(lambda: participant.connected, timeout=10)
            await pc.close()


async def test_a_client_that_answers_but_never_connects_is_removed() -> None:
    async with running(connect_timeout=0.5) as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "gone", ["audio"])
            pc, sdp = await _offer_and_answer(ws)
            await pc.close()  # its ICE agent answers no connectivity check
            await ws.send_str(json.dumps({"type": "answer", "sdp": sdp}))
            started = time.monotonic()
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "error" and reply["code"] == "session-ended"
            assert "no media connection within 0.5 s" in reply["message"]
            assert 0.4 < time.monotonic() - started < 3
        assert await wait_until(lambda: h.server.metrics.participants() == 0, timeout=5)


async def test_shutdown_does_not_wait_for_a_client_that_reads_nothing(monkeypatch) -> None:
    from sfu import outbox as outbox_module

    monkeypatch.setattr(outbox_module, "CLOSE_TIMEOUT", 0.3)
    h = Harness()
    await h.start()
    sent = asyncio.Event()

    class _StuckWebSocket:
        closed = False

        async def send_str(self, text: str) -> None:
            sent.set()
            await asyncio.Event().wait()  # the peer never reads: the write never completes

        async def close(self, **kw: Any) -> None:
            raise AssertionError("a stuck socket cannot be closed politely")

    class _Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    transport = _Transport()
    stuck = outbox_module.Outbox(_StuckWebSocket(), transport, limit=1 << 20)  # type: ignore[arg-type]
    h.server._sockets.add(stuck)
    await stuck.send_json({"type": "speaker", "identity": "x"})
    await stuck.send_json({"type": "speaker", "identity": "y"})
    await sent.wait()
    started = time.monotonic()
    async with asyncio.timeout(5):
        await h.stop()  # aiohttp's shutdown closes every signalling socket
    assert time.monotonic() - started < 2 and transport.aborted


async def test_a_listener_alone_in_a_room_keeps_its_seat() -> None:
    # Before: an offer without m-lines (nobody publishes yet) started the connect timer, and a
    # listener that arrived first was ended for "no media connection".
    async with running(connect_timeout=0.5) as h:
        listener = SFUClient(h.url, "room", "listener", h.token("room", "listener"))
        try:
            await listener.join()
            await asyncio.wait_for(listener.answered.wait(), 5)
            assert "\nm=" not in listener.pc.remoteDescription.sdp
            await asyncio.sleep(1.5)
            assert h.server.metrics.participants() == 1
            # once someone publishes, the listener's m-lines connect as usual
            await h.join("talker")
            [participant] = [
                p for p in h.server.rooms["room"].participants.values() if p.identity == "listener"
            ]
            assert await wait_until(lambda: participant.connected, timeout=10)
        finally:
            await listener.close()


async def test_ice_candidates_are_checked_and_capped() -> None:
    from sfu.room import MAX_REMOTE_CANDIDATES

    async with running() as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "pub", ["video"])
            pc, sdp = await _offer_and_answer(ws)

            async def trickle(candidate: str) -> dict[str, Any] | None:
                await ws.send_str(json.dumps(
                    {"type": "ice", "candidate": {"candidate": candidate, "sdpMid": "0"}}
                ))
                await ws.send_str('{"type": "dance"}')  # its reply follows the candidate's
                first = await ws.receive_json(timeout=5)
                if first["code"] == "unknown-type":
                    return None
                assert (await ws.receive_json(timeout=5))["code"] == "unknown-type"
                return first

            # a port asyncio cannot send to (it closed the ICE socket, with tracebacks), a host
            # that is no address: refused at once, in a trickle or in the answer
            for bad, why in [
                ("candidate:1 1 udp 2130706431 127.0.0.1 99999 typ host", "port 99999"),
                ("candidate:1 1 udp 2130706431 not-an-ip 5000 typ host", "not-an-ip"),
            ]:
                reply = await trickle(bad)
                assert reply is not None and reply["code"] == "bad-message", reply
                assert why in reply["message"]
                m = sdp.index("a=candidate")
                with_bad = sdp[:m] + "a=" + bad + "\r\n" + sdp[m:]
                await ws.send_str(json.dumps({"type": "answer", "sdp": with_bad}))
                reply = await ws.receive_json(timeout=5)
                assert reply["code"] == "bad-sdp" and why in reply["message"], reply
            # at most MAX_REMOTE_CANDIDATES addresses, trickled and in answers together: each
            # costs aioice more than the last
            [participant] = h.server.rooms["room"].participants.values()
            for port in range(MAX_REMOTE_CANDIDATES - 1):  # the answer brings one more
                assert await trickle(f"{CANDIDATE[:-14]} {6000 + port} typ host") is None
            assert await trickle(f"{CANDIDATE[:-14]} 6000 typ host") is None  # known: no new one
            m = sdp.index("a=candidate")
            extra = "".join(f"a={CANDIDATE[:-14]} {8000 + i} typ host\r\n" for i in range(2))
            await ws.send_str(json.dumps({"type": "answer", "sdp": sdp[:m] + extra + sdp[m:]}))
            reply = await ws.receive_json(timeout=5)
            assert reply["code"] == "bad-sdp" and "more than 32 ICE candidates" in reply["message"]
            # the genuine answer fills the last place, and still connects
            await ws.send_str(json.dumps({"type": "answer", "sdp": sdp}))
            assert await wait_until(
                lambda: len(participant._remote_candidates) == MAX_REMOTE_CANDIDATES, timeout=5
            )
            if not participant.connected:
                reply = await trickle(f"{CANDIDATE[:-14]} 7000 typ host")
                assert reply is not None and "more than 32 ICE candidates" in reply["message"]
            assert await wait_until(lambda: participant.connected, timeout=10)
            # trickled candidates are ignored once connected (no ICE restart in aiortc)
            assert await trickle(f"{CANDIDATE[:-14]} 7001 typ host") is None
            assert len(participant._remote_candidates) == MAX_REMOTE_CANDIDATES
            await pc.close()


async def test_sockets_that_have_not_joined_are_capped_per_address() -> None:
    async with running(max_unjoined_per_address=3) as h:
        async with aiohttp.ClientSession() as session:
            waiting = [await session.ws_connect(h.url) for _ in range(3)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(h.url)
            assert refused.value.status == 429
            client = SFUClient(h.url, "room", "alice", h.token("room", "alice"))
            with pytest.raises(SignallingError) as busy:
                await client.join()
            assert busy.value.code == "busy"
            # a socket that joins, or goes, frees its place
            await _joined(waiting[0], "bob")
            await waiting[1].close()
            assert await wait_until(lambda: sum(h.server._unjoined.values()) == 1, timeout=5)
            client = SFUClient(h.url, "room", "carol", h.token("room", "carol"))
            await client.join()
            await client.close()
            for ws in waiting:
                await ws.close()
        assert await wait_until(lambda: h.server._unjoined == {}, timeout=5)


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert [bucket.take(0.5) for _ in range(2)] == [True, False]  # half a second: one token
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # saved: 3


async def test_a_flood_of_signalling_messages_is_dropped_beyond_the_rate() -> None:
    """A joined client sending 300 messages at once gets the burst answered, one
    "rate-limited" reply, keeps its seat, and is heard again once the bucket refills."""
    async with running(signal_rate=5.0, signal_burst=10) as h:
        async with aiohttp.ClientSession() as session, session.ws_connect(h.url) as ws:
            await _joined(ws, "alice")  # the join spends one of the 10
            for _ in range(300):
                await ws.send_str('{"type": "dance"}')
            codes: list[str] = []
            with contextlib.suppress(TimeoutError):
                while True:
                    reply = await ws.receive_json(timeout=1)
                    if reply["type"] != "offer":  # the join's own, without m-lines
                        codes.append(reply["code"])
            answered = codes.count("unknown-type")
            # 9 from the burst, plus what refilled while the flood was read (5 a second)
            assert 9 <= answered <= 20, codes
            assert 1 <= codes.count("rate-limited") <= 2, codes
            assert len(codes) == answered + codes.count("rate-limited")
            assert h.server.metrics.signalling_rate_limited == 300 - answered
            assert "alice" in h.server.rooms["room"].participants
            await asyncio.sleep(0.5)  # 2.5 tokens
            await ws.send_str('{"type": "dance"}')
            assert (await ws.receive_json(timeout=5))["code"] == "unknown-type"
    assert "sfu_signalling_rate_limited_total" in h.server.metrics.render()


async def test_the_signalling_rate_is_checked_at_start() -> None:
    for bad in ({"signal_rate": 0.0}, {"signal_rate": float("nan")}, {"signal_burst": 0}):
        with pytest.raises(ConfigError):
            SFUConfig(token_secret=SECRET, **bad)


async def test_a_session_ends_when_its_token_expires_unless_renewed() -> None:
    async with running() as h, aiohttp.ClientSession() as session:
        soon = int(time.time()) + 4  # the checks below must be done before it: a margin
        sockets = {}
        for identity in ("stays", "goes"):
            ws = sockets[identity] = await session.ws_connect(h.url)
            token = issue_room_token(SECRET, "room", identity, soon)
            await ws.send_str(json.dumps(_join("room", identity, token)))
            assert (await ws.receive_json(timeout=5))["type"] == "joined"
        stays, goes = sockets["stays"], sockets["goes"]
        # a token that is not one for this session is refused, and changes nothing
        for bad in (
            issue_room_token(SECRET, "room", "goes", int(time.time()) - 1),
            issue_room_token(SECRET, "other-room", "stays", soon + 60),
            issue_room_token(SECRET, "room", "goes", soon + 60),  # another identity's
        ):
            await stays.send_str(json.dumps({"type": "token", "token": bad}))
            reply = await _next_not_offer(stays)
            assert reply["type"] == "error" and reply["code"] == "token", reply
        fresh = issue_room_token(SECRET, "room", "stays", soon + 60)
        await stays.send_str(json.dumps({"type": "token", "token": fresh}))
        assert await _next_not_offer(stays) == {"type": "token-accepted", "expires_at": soon + 60}
        older = issue_room_token(SECRET, "room", "stays", soon + 30)  # cannot shorten it
        await stays.send_str(json.dumps({"type": "token", "token": older}))
        assert await _next_not_offer(stays) == {"type": "token-accepted", "expires_at": soon + 60}
        participants = h.server.rooms["room"].participants
        assert await wait_until(lambda: "goes" not in participants, timeout=10)
        ended = [m async for m in _until_closed(goes)]
        assert any(
            m.get("code") == "session-ended" and "token expired" in m["message"] for m in ended
        ), ended
        await asyncio.sleep(max(0.0, soon + 0.5 - time.time()))
        assert list(participants) == ["stays"] and not stays.closed
        await stays.close()


async def _next_not_offer(ws: Any) -> dict:
    while (message := await ws.receive_json(timeout=5))["type"] in ("offer", "participant-joined"):
        pass
    return message


async def _until_closed(ws: Any) -> AsyncIterator[dict]:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            break
        yield json.loads(msg.data)
