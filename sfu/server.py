"""The SFU's aiohttp application: WebSocket signalling, `/metrics`, `/healthz`.

Signalling is JSON over one WebSocket per participant at `GET /v1/signal`.

Client to SFU:
  {"type": "join", "room": str, "identity": str, "token": str, "publish": ["audio", "video"]}
  {"type": "answer", "sdp": str}
  {"type": "ice", "candidate": {"candidate": str, "sdpMid": str, "sdpMLineIndex": int}}
  {"type": "token", "token": str}        a fresh room token, before the join's expires
  {"type": "leave"}
SFU to client:
  {"type": "joined", "room": str, "identity": str, "participants": [str]}
  {"type": "offer", "sdp": str, "streams": {mid: {"identity": str, "kind": str}}}
  {"type": "participant-joined" | "participant-left", "identity": str}
  {"type": "speaker", "identity": str}
  {"type": "token-accepted", "expires_at": int}   the session may last until then (Unix time)
  {"type": "error", "code": str, "message": str}   (+ "reason" for code "token",
                                                      + "url" for code "redirect")

The SFU ends a session with code "session-ended" when the media connection fails, does not
come up within `connect_timeout` of the first answer, or the client leaves an offer unanswered
for `answer_timeout` (30 s each by default), when no new offer can be made to it, and when its
room token expires: a client renews it with a "token" message (a bad one gets code "token" and
changes nothing; one that comes after the token expired, or once the session is ending, gets
"session-ended", never "token-accepted"). The delivery service gives tokens to members of the
room's group only, so one removed from the group loses its seat when its last token expires.
A client that stops reading its socket, so that more than 16 of the largest messages wait for
it, is disconnected (`sfu.outbox`). A client that sends more than `signal_rate` messages a
second (beyond a burst of `signal_burst`) has the excess dropped, and is told with code
"rate-limited" at most once a second.

With several worker processes (`python -m sfu --workers N`), each room lives in one worker; a
join sent to another worker is answered with code "redirect" and the URL to join at instead,
or, while that worker is down (worker 0 restarts it), refused with code "unavailable".

The SFU makes every offer (see `sfu.room`); a client offer is refused with code "unsupported".
An offer's "streams" names the publisher of each m-line that carries media. When a publisher
leaves, its m-lines go inactive; a later offer may make such an m-line send again, for another
publisher: that is a new track (an aiortc client needs a new receiver for it, see
`sfu.client`).
After a refused join the socket is closed; other errors leave it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web

from sfu import aiortc_hooks
from sfu.config import SFUConfig
from sfu.errors import LimitExceeded, Redirect, SignallingError, TokenError, Unavailable
from sfu.metrics import Metrics, WorkerStatus, render_workers
from sfu.outbox import Outbox
from sfu.ratelimit import TokenBucket
from sfu.room import Participant, Room
from sfu.tokens import check_room_token

logger = logging.getLogger(__name__)
BAD_SIGNATURE_LOG_INTERVAL = 60.0  # seconds between warnings of tokens with bad signatures

MAX_NAME_LENGTH = 512  # the delivery service names a room by its MLS group id in hex (<= 255 B)
OUTBOX_MESSAGES = 16  # a client may fall this many largest messages behind before it is dropped
MAX_TOKEN_LENGTH = 4096
RATE_NOTICE_INTERVAL = 1.0  # seconds between "rate-limited" replies to one socket
TOKEN_CHECK_INTERVAL = 30.0  # seconds between looks at the wall clock for a token's expiry
TOKEN_EXPIRED = 'the room token expired: send a fresh one (type "token") before it does'
SECRET_WITHDRAWN = (
    "the secret that signed its room token is no longer accepted (rotated): join again with a "
    "fresh token"
)
KINDS = ("audio", "video")


class SFUServer:
    def __init__(self, config: SFUConfig) -> None:
        aiortc_hooks.demultiplex_stun()
        self.config = config
        self.metrics = Metrics()
        self._bad_signature_logged = -BAD_SIGNATURE_LOG_INTERVAL
        self.metrics.tokens_accepted = [0] * len(config.token_secrets)
        self._older_secrets_logged: set[int] = set()  # secrets past the first, seen in use
        # Each session's room tokens by the secret that signed them: when the latest of each
        # expires. A reload that drops a secret ends what only that secret's tokens prolonged
        # (one with a leaked secret can sign any expiry), as a restart would have.
        self._expiry_by_secret: weakref.WeakKeyDictionary[Participant, dict[bytes, float]] = (
            weakref.WeakKeyDictionary()
        )
        self.rooms: dict[str, Room] = {}
        self.metrics.rooms = lambda: len(self.rooms)
        self.metrics.participants = lambda: sum(len(r.participants) for r in self.rooms.values())
        self._join_lock = asyncio.Lock()
        self._sockets: set[Outbox] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unjoined: dict[str, int] = {}  # sockets not joined yet, by client address
        # Whether worker i is up to take the joins redirected to it (worker 0 supervises them).
        self.worker_available: Callable[[int], bool] = lambda worker: True
        # Worker 0 of --workers: workers 1..N-1 as it sees them, for /metrics and /healthz?worker=
        # (a worker's own port hangs while it is down: worker 0 keeps it bound).
        self.worker_status: Callable[[], list[WorkerStatus]] | None = None
        # Unix time, for room tokens' expiry (tests set it)
        self.wall_clock: Callable[[], float] = time.time
        # Set when a session's token expiry is cut (a reload): its `_end_at_token_expiry`, asleep
        # until the expiry it saw, looks again at once.
        self._expiry_cut: weakref.WeakKeyDictionary[Participant, asyncio.Event] = (
            weakref.WeakKeyDictionary()
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/signal", self.handle_signal)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_health)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        # aiohttp waits for open handlers on shutdown: end every signalling session first, all
        # at once and each within CLOSE_TIMEOUT (a client that stopped reading is aborted).
        await asyncio.gather(
            *(
                outbox.close(code=WSCloseCode.GOING_AWAY, message=b"SFU shutting down")
                for outbox in list(self._sockets)
            )
        )
        await self.close()

    async def close(self) -> None:
        for room in list(self.rooms.values()):
            await room.close()
        self.rooms.clear()

    def _port(self, index: int) -> int | None:
        """Worker `index`'s port, from its URL (None without --workers, or not a URL with one)."""
        try:
            return urlsplit(self.config.worker_urls[index]).port
        except (IndexError, ValueError):
            return None

    def _workers(self) -> list[WorkerStatus]:
        """This worker (up: it answers) and, on worker 0 of --workers, the others."""
        index = self.config.worker_index
        own = WorkerStatus(index, self._port(index), "up", None)
        return [own, *(self.worker_status() if self.worker_status is not None else [])]

    async def handle_metrics(self, request: web.Request) -> web.Response:
        text = self.metrics.render()
        if self.config.worker_urls:  # each worker counts only its own rooms: say which it is
            index, workers = self.config.worker_index, len(self.config.worker_urls)
            port = self._port(index)  # None: not a URL with a port; labelled anyway
            text += (
                "# HELP sfu_worker_info The worker process these metrics are from.\n"
                "# TYPE sfu_worker_info gauge\n"
                f'sfu_worker_info{{worker="{index}",workers="{workers}",port="{port}"}} 1\n'
            )
        if self.worker_status is not None:
            text += render_workers(self._workers())
        return web.Response(
            text=text,
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def handle_health(self, request: web.Request) -> web.Response:
        """`/healthz`: this worker answers. `/healthz?worker=all` (or `=I`), on worker 0: each
        worker's state, 503 unless every one asked about is up (without --workers: worker 0)."""
        which = request.query.get("worker")
        if which is None:
            return web.Response(text="ok\n")
        if self.config.worker_urls and self.worker_status is None:
            # Workers 1..N-1 know which workers are down, not which are starting or hung.
            return web.Response(
                status=404, text=f"ask worker 0 (port {self._port(0)}): it watches the workers\n"
            )
        workers = self._workers()
        if which != "all":
            workers = [w for w in workers if str(w.index) == which]
            if not workers:  # the query not echoed: it is the client's, of any size
                last = len(self._workers()) - 1
                return web.Response(status=404, text=f"no such worker: worker=all, or 0 to {last}\n")
        text = "".join(
            f"worker {w.index}{f' (port {w.port})' if w.port else ''}: {w.state}\n" for w in workers
        )
        return web.Response(status=200 if all(w.state == "up" for w in workers) else 503, text=text)

    # --- signalling -----------------------------------------------------------------------------

    def _admit_unjoined(self, address: str) -> None:
        """Count a new socket that has not joined yet, or refuse it (429): anyone may open one,
        and each holds a file descriptor until its join timeout."""
        if (
            sum(self._unjoined.values()) >= self.config.max_unjoined
            or self._unjoined.get(address, 0) >= self.config.max_unjoined_per_address
        ):
            raise web.HTTPTooManyRequests(
                text="too many signalling connections waiting to join: retry shortly\n",
                headers={"Retry-After": "5"},
            )
        self._unjoined[address] = self._unjoined.get(address, 0) + 1

    def _joined_or_gone(self, address: str) -> None:
        left = self._unjoined.pop(address, 1) - 1
        if left:
            self._unjoined[address] = left

    async def handle_signal(self, request: web.Request) -> web.WebSocketResponse:
        address = request.remote or ""
        self._admit_unjoined(address)
        unjoined = True
        try:
            # aiohttp closes the socket above max_msg_size; below 4x the limit we answer
            # politely.
            ws = web.WebSocketResponse(
                max_msg_size=4 * self.config.max_message_bytes, heartbeat=30
            )
            await ws.prepare(request)
        except BaseException:
            self._joined_or_gone(address)
            raise
        outbox = Outbox(ws, request.transport, OUTBOX_MESSAGES * self.config.max_message_bytes)
        self._sockets.add(outbox)
        send_json = outbox.send_json
        messages = self._within_rate(ws, send_json)
        participant: Participant | None = None
        expiry: asyncio.Future[None] | None = None
        try:
            # The deadline covers waiting for a join, not joining: a join cut short half way
            # would leave a participant behind that no handler removes.
            deadline = asyncio.get_running_loop().time() + self.config.join_timeout
            while participant is None:
                async with asyncio.timeout_at(deadline):
                    join = await self._await_join(messages, send_json)
                if join is None:
                    return ws  # the client went away
                participant, refused = await self._join_or_refuse(join, send_json, outbox)
                if refused:
                    return ws
            unjoined = False
            self._joined_or_gone(address)
            expiry = asyncio.ensure_future(self._end_at_token_expiry(participant))
            async for msg in messages:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        await self._error(send_json, SignallingError("bad-message", "send text"))
                    continue
                try:
                    message = self._decode(msg.data)
                    if message["type"] == "leave":
                        break
                    await self._dispatch(participant, message)
                except SignallingError as exc:
                    await self._error(send_json, exc)
                except ConnectionError:
                    raise
                except Exception:
                    logger.exception("signalling message from %r failed", participant.identity)
                    await self._error(
                        send_json, SignallingError("internal", "the SFU could not handle this")
                    )
        except TimeoutError:
            await self._error(send_json, SignallingError("timeout", "send join within the timeout"))
        except ConnectionError:
            pass
        except Exception:
            logger.exception("signalling handler failed")
        finally:
            if expiry is not None:
                expiry.cancel()
            if unjoined:
                self._joined_or_gone(address)
            if participant is not None:
                await self._leave(participant)
            await messages.aclose()
            await outbox.close()
            self._sockets.discard(outbox)
        return ws

    async def _within_rate(
        self, ws: web.WebSocketResponse, send_json: Any
    ) -> AsyncGenerator[WSMessage, None]:
        """The socket's messages within its rate (SFUConfig.signal_rate and signal_burst).

        Messages beyond it are dropped unparsed, as cheaply as they can be, with an error reply
        at most once per RATE_NOTICE_INTERVAL (a reply to each would let the flood make the SFU
        write as much as it reads). A "leave" among them is dropped too: closing the socket
        leaves all the same.
        """
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.config.signal_rate, self.config.signal_burst, loop.time())
        notice = -math.inf
        async for msg in ws:
            now = loop.time()
            if bucket.take(now):
                yield msg
                continue
            self.metrics.signalling_rate_limited += 1
            if now >= notice:
                notice = now + RATE_NOTICE_INTERVAL
                await self._error(
                    send_json,
                    SignallingError(
                        "rate-limited",
                        f"more than {self.config.signal_rate:g} messages a second: "
                        "messages are dropped",
                    ),
                )

    async def _await_join(
        self, messages: AsyncIterator[WSMessage], send_json: Any
    ) -> dict[str, Any] | None:
        """The session's join message; other messages before it get an error reply."""
        async for msg in messages:
            if msg.type != WSMsgType.TEXT:
                await self._error(send_json, SignallingError("bad-message", "send JSON text"))
                continue
            try:
                message = self._decode(msg.data)
                if message["type"] != "join":
                    raise SignallingError("not-joined", "send join first")
                return message
            except SignallingError as exc:
                await self._error(send_json, exc)
        return None

    async def _join_or_refuse(
        self, message: dict[str, Any], send_json: Any, outbox: Outbox
    ) -> tuple[Participant | None, bool]:
        """Join, or send the reason why not: (participant, refused). A refused join (token,
        limits, another worker's room) ends the session; after a malformed one the client may
        send a better join."""

        async def end_session(reason: str) -> None:
            await self._error(send_json, SignallingError("session-ended", reason))
            await outbox.close(message=reason.encode()[:120])

        def close_signalling(reason: str) -> None:
            task = asyncio.ensure_future(end_session(reason))
            self._tasks.add(task)  # referenced until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

        try:
            return await self._join(message, send_json, close_signalling), False
        except TokenError as exc:
            self.metrics.tokens_refused += 1
            if exc.reason == "bad signature":
                self._warn_bad_signature()
            await self._error(send_json, SignallingError("token", str(exc), exc.reason))
        except (LimitExceeded, Redirect, Unavailable) as exc:
            await self._error(send_json, exc)
        except SignallingError as exc:
            await self._error(send_json, exc)
            return None, False
        except Exception:  # a bug: the client is told, the traceback stays in the log
            logger.exception("a join to a room failed")
            await self._error(
                send_json, SignallingError("internal", "the SFU could not join you: try again")
            )
        return None, True

    def _decode(self, text: str) -> dict[str, Any]:
        if len(text.encode()) > self.config.max_message_bytes:
            # not a LimitExceeded: that refuses a join, while this message is merely dropped
            raise SignallingError(
                "limit", f"signalling message larger than {self.config.max_message_bytes} bytes"
            )
        try:
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
            raise SignallingError("bad-json", "the message is not valid JSON") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise SignallingError("bad-message", 'a message is a JSON object with a string "type"')
        return message

    async def _join(
        self, message: dict[str, Any], send_json: Any, close_signalling: Any
    ) -> Participant:
        room_name = _string(message, "room", MAX_NAME_LENGTH)
        identity = _string(message, "identity", MAX_NAME_LENGTH)
        token = _string(message, "token", MAX_TOKEN_LENGTH)
        publish = message.get("publish", [])
        if (
            not isinstance(publish, list)
            or any(k not in KINDS for k in publish)
            or len(set(publish)) != len(publish)
            or len(publish) > self.config.max_publish_streams
        ):
            raise SignallingError("bad-message", 'publish must be a subset of ["audio", "video"]')
        expires_at, signer = self._verify(token, room_name, identity, self.wall_clock())
        signed_with = self.config.token_secrets[signer]  # the set may be reloaded meanwhile
        worker = self.config.worker_for(room_name)
        if worker != self.config.worker_index:
            if not self.worker_available(worker):
                raise Unavailable(
                    "the SFU worker that serves this room is restarting; try again in a few seconds"
                )
            raise Redirect(self.config.worker_urls[worker])
        self._count_signer(signer)  # here, not in a worker that redirects: counted once
        room = self.rooms.get(room_name)
        old = room.participants.get(identity) if room is not None else None
        if old is not None and old.ending is not None:
            # Its session has ended and only its handler's cleanup is left (which waits for the
            # socket to close): a client told so may join again at once, not be a "duplicate".
            await self._leave(old)
        async with self._join_lock:
            room = self.rooms.get(room_name)
            if room is None:
                if len(self.rooms) >= self.config.max_rooms:
                    raise LimitExceeded("the SFU has reached its room limit; try again later")
                room = Room(room_name, self.config, self.metrics)
                self.rooms[room_name] = room
            if identity in room.participants:
                raise SignallingError("duplicate", "this identity is already in the room")
            if len(room.participants) >= self.config.max_participants_per_room:
                raise LimitExceeded("the room is full")
            if signed_with not in self.config.token_secrets:  # reloaded since `_verify`
                raise TokenError("bad signature", "room token refused: its secret was withdrawn")
            participant = Participant(
                room, identity, list(publish), send_json, self.config, self.metrics
            )
            participant.on_connection_lost = close_signalling
            participant.token_expires_at = expires_at
            self._expiry_by_secret[participant] = {signed_with: expires_at}
            others = list(room.participants)
            room.participants[identity] = participant
        try:
            await send_json(
                {"type": "joined", "room": room_name, "identity": identity, "participants": others}
            )
            await room.broadcast(
                {"type": "participant-joined", "identity": identity}, exclude=identity
            )
            await participant.start()
        except BaseException:  # even cancelled: a half-joined participant must not stay behind
            await self._leave(participant)
            raise
        return participant

    async def _dispatch(self, participant: Participant, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "answer":
            await participant.handle_answer(_string(message, "sdp", self.config.max_message_bytes))
        elif kind == "ice":
            await participant.handle_ice(message.get("candidate"))
        elif kind == "token":
            await self._renew_token(participant, _string(message, "token", MAX_TOKEN_LENGTH))
        elif kind == "offer":
            raise SignallingError("unsupported", "the SFU makes the offers; answer them instead")
        elif kind == "join":
            raise SignallingError("already-joined", "this socket has already joined a room")
        else:
            raise SignallingError("unknown-type", f"unknown message type {kind[:32]!r}")

    async def _renew_token(self, participant: Participant, token: str) -> None:
        """A fresher room token for the session: it may last until that one expires.

        Not once the session has expired or is ending (whether or not the expiry timer has
        seen it yet): the reply is then "session-ended", never "token-accepted".
        """
        if participant.ending is not None:
            raise SignallingError(
                "session-ended", f"the session has ended ({participant.ending}): join again"
            )
        now = self.wall_clock()
        if participant.token_expires_at <= now:
            participant.end_session(TOKEN_EXPIRED)  # its "session-ended" is the reply
            return
        try:
            expires_at, signer = self._verify(
                token, participant.room.name, participant.identity, now
            )
        except TokenError as exc:  # the session goes on until the token it has expires
            self.metrics.tokens_refused += 1
            if exc.reason == "bad signature":
                self._warn_bad_signature("a token renewal")
            raise SignallingError("token", str(exc), exc.reason) from None
        self._count_signer(signer)
        participant.token_expires_at = max(participant.token_expires_at, expires_at)
        by_secret = self._expiry_by_secret.setdefault(participant, {})
        signed_with = self.config.token_secrets[signer]
        by_secret[signed_with] = max(by_secret.get(signed_with, 0.0), expires_at)
        await participant.send_json(
            {"type": "token-accepted", "expires_at": int(participant.token_expires_at)}
        )

    async def _end_at_token_expiry(self, participant: Participant) -> None:
        """End the session when its room token expires (the delivery service issues them to
        members only: a member removed from the group cannot renew it and so loses its seat)."""
        cut = self._expiry_cut.setdefault(participant, asyncio.Event())
        # Each wake-up looks at `token_expires_at` again: one for an expiry a renewal has since
        # extended sleeps on (renewals only extend it, so they need not wake it).
        while (left := participant.token_expires_at - self.wall_clock()) > 0:
            cut.clear()
            # in steps: the wall clock may be set meanwhile, the loop's clock does not follow
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut.wait(), min(left, TOKEN_CHECK_INTERVAL))
        participant.end_session(TOKEN_EXPIRED)

    async def _leave(self, participant: Participant) -> None:
        room = participant.room
        try:
            await room.remove(participant)
        finally:
            if not room.participants and self.rooms.get(room.name) is room:
                del self.rooms[room.name]
                await room.close()

    def _verify(self, token: str, room: str, identity: str, now: float) -> tuple[int, int]:
        """`check_room_token` with every secret of the SFU: when the token expires, and the
        index of the secret that signed it (for `_count_signer`)."""
        return check_room_token(self.config.token_secrets, token, room, identity, now)

    def set_token_secrets(self, secrets: tuple[bytes, ...]) -> None:
        """Verify joins and token renewals with `secrets` from now on (a reload: SIGHUP).

        Sessions go on, but each only as long as its tokens signed by a secret still held say:
        one that only a dropped secret's tokens admitted ends now (code "session-ended"; a
        client then joins again with a fresh token). sfu_tokens_accepted_total starts again
        from 0 (its label is a line of the file: after a reload, another secret's, maybe).
        Raises ConfigError (and changes nothing) for a set SFUConfig refuses.
        """
        # token_secret=b"": `replace` would pass the old first secret along with the new set
        self.config = dataclasses.replace(self.config, token_secret=b"", token_secrets=secrets)
        self.metrics.tokens_accepted = [0] * len(self.config.token_secrets)
        self.metrics.token_secret_reloads += 1
        self._older_secrets_logged.clear()
        held = set(self.config.token_secrets)
        now = self.wall_clock()
        for room in list(self.rooms.values()):
            # the new config, so that no copy of a withdrawn secret outlives the reload
            room.config = self.config
            for participant in list(room.participants.values()):
                participant.config = self.config
                by_secret = self._expiry_by_secret.get(participant)
                if by_secret is None or set(by_secret) <= held:
                    continue
                by_secret = {s: e for s, e in by_secret.items() if s in held}
                self._expiry_by_secret[participant] = by_secret
                expires_at = max(by_secret.values(), default=0.0)
                if expires_at < participant.token_expires_at:
                    participant.token_expires_at = expires_at
                    if (cut := self._expiry_cut.get(participant)) is not None:
                        cut.set()  # ends it then, not at its next TOKEN_CHECK_INTERVAL look
                if expires_at <= now:
                    participant.end_session(SECRET_WITHDRAWN)

    def _count_signer(self, signer: int) -> None:
        """Count a token accepted here (a join this worker serves, a renewal) by the secret that
        signed it; say once (INFO) when one past the first still signs tokens: the delivery
        service (or an instance of it) has not been given the first yet."""
        self.metrics.tokens_accepted[signer] += 1
        if signer and signer not in self._older_secrets_logged:
            self._older_secrets_logged.add(signer)
            logger.info(
                "a room token was signed with secret %d of %d of the token secret file, not the "
                "first: a delivery service still signs with it (said once; "
                'sfu_tokens_accepted_total{secret="%d"} counts them)',
                signer + 1,
                len(self.config.token_secrets),
                signer + 1,
            )

    def _warn_bad_signature(self, what: str = "a join") -> None:
        """Log `what` (a join, a token renewal) refused for a bad token signature, at most once
        per BAD_SIGNATURE_LOG_INTERVAL in all: a client's forgery, or (if every join fails so) a
        secret the delivery service does not share, which the clients' errors alone would not
        show the operator."""
        now = time.monotonic()
        if now - self._bad_signature_logged < BAD_SIGNATURE_LOG_INTERVAL:
            return
        self._bad_signature_logged = now
        logger.warning(
            "%s was refused: its room token has a bad signature (if every join is, the "
            "delivery service signs with another secret: compare its CONCLAVE_ROOM_SECRET with "
            "--token-secret-file)",
            what,
        )

    async def _error(self, send_json: Any, exc: SignallingError) -> None:
        self.metrics.signalling_errors += 1
        reply: dict[str, Any] = {"type": "error", "code": exc.code, "message": str(exc)}
        if exc.reason is not None:
            reply["reason"] = exc.reason
        if isinstance(exc, Redirect):
            reply["url"] = exc.url
        try:
            await send_json(reply)
        except (ConnectionError, RuntimeError):
            pass


def _string(message: dict[str, Any], key: str, max_length: int) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise SignallingError(
            "bad-message", f"{key} must be a string of 1 to {max_length} characters"
        )
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate, from a "\ud800" escape in the JSON
        raise SignallingError("bad-message", f"{key} is not valid Unicode") from None
    return value
