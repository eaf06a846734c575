"""The asyncio client library of the delivery service, used by the app.

    async with DeliveryClient(url, identity, suite, sig_priv, sig_pub) as ds:
        await ds.register()
        await ds.upload_key_packages([kp1, kp2], last_resort=kp0)
        stream = await ds.connect()
        await stream.subscribe(group_id, after=last_seq)
        async for event in stream: ...

Each `PushStream` holds one connection of the client's aiohttp session for as long as it is open:
a session shared by many clients (`http=`) needs a connector limit above the number of streams.

A `PushStream` reconnects by itself and resubscribes from the last sequence number it delivered,
so a consumer sees each group's messages once, in order, across reconnects. Refusals raise
`RequestFailed` (a 409 for a stale epoch raises `StaleEpochRejected` with `current_epoch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import cbor2

from .errors import RequestFailed, StaleEpochRejected
from .signatures import CHALLENGE_LABEL, challenge_content, sign_with_label

log = logging.getLogger(__name__)
CBOR = "application/cbor"
# aiohttp's default is 5 minutes in total: a service that accepts connections but never
# answers would hang a client that long. (Push streams are WebSockets: aiohttp lifts the read
# timeout once they are open.)
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
# A 429 asking to wait at most this long (seconds) is waited out and retried, a few times.
MAX_RETRY_WAIT = 5
RETRIES_429 = 3
# The largest answer read from the service: its pages hold at most 8 MiB of messages, or one
# message of up to its --max-body (at most MAX_BODY_LIMIT), and a client must not read an
# unbounded one into memory from a service it does not trust.
MAX_ANSWER = 32 << 20
MAX_BODY_LIMIT = 16 << 20
# Sequence numbers, epochs, ids and counts are stored as signed 64-bit integers (by the service,
# and in a participant's saved state): anything else the service sends is malformed.
MAX_INT = (1 << 63) - 1
# A field of a push frame or error that is text is cut to this many characters.
MAX_PUSH_TEXT = 500
# A push stream's wait before reconnecting: doubled at each reconnection that brought nothing,
# back to the first once one delivers an event.
RECONNECT_DELAY = 0.05
MAX_RECONNECT_DELAY = 2.0
# A connection that lasted this many seconds was a good one, even in a quiet group: the next
# reconnection waits the first delay again.
LASTING_CONNECTION = 30.0


def _without_password(url: str) -> str:
    """`url` with the password of its user information, if any, as *** (for repr and logs)."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{slash}{path}"


class Malformed(ValueError):
    """A field of the service's answer or push frame is missing or of the wrong type."""


def _count(body: dict[str, Any], key: str) -> int:
    """`body[key]`, a non-negative integer that fits the service's 64-bit fields."""
    value = body.get(key)
    # `type(...) is int`: no bool, no float, no int subclass.
    if type(value) is not int or not 0 <= value <= MAX_INT:
        raise Malformed(f"{key!r} is not a whole number from 0 to 2^63-1")
    return value


def _optional_count(body: dict[str, Any], key: str) -> int | None:
    return None if body.get(key) is None else _count(body, key)


def _bytes(body: dict[str, Any], key: str) -> bytes:
    value = body.get(key)
    if type(value) is not bytes:
        raise Malformed(f"{key!r} is not a byte string")
    return value


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if type(value) is not str:
        raise Malformed(f"{key!r} is not text")
    return value


def _bad_answer(exc: Malformed, status: int = 200) -> RequestFailed:
    return RequestFailed(status, "bad_answer", f"the delivery service's answer is malformed: {exc}")


async def wait_healthy(
    url: str,
    timeout: float = 20.0,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.05,
) -> bool:
    """True once the service at `url` answers 200 on /healthz; False after `timeout` seconds, or
    as soon as `alive()` is false (for a service in a child process that has exited)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                return False
            # Refused connections are expected until the service listens.
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(interval)
    return False


@dataclass(frozen=True)
class Message:
    """A message of a group's log: handshake (commit, proposal, welcome) or application."""

    group_id: bytes
    seq: int
    kind: str
    epoch: int
    sender: str
    sender_index: int | None
    time_ms: int
    message: bytes = field(repr=False)

    @classmethod
    def from_body(cls, b: dict[str, Any]) -> Message:
        """Unchecked: for the audit log, which the auditor checks field by field itself."""
        return cls(b["group_id"], b["seq"], b["kind"], b["epoch"], b["sender"],
                   b["sender_index"], b["time_ms"], b["message"])

    @classmethod
    def checked(cls, b: object) -> Message:
        """From the service's answer or push frame, every field's type checked (`Malformed`):
        a participant keeps `seq` and `epoch` in its saved state and compares them."""
        if not isinstance(b, dict):
            raise Malformed("a message is not a map")
        return cls(_bytes(b, "group_id"), _count(b, "seq"), _text(b, "kind"), _count(b, "epoch"),
                   _text(b, "sender"), _optional_count(b, "sender_index"), _count(b, "time_ms"),
                   _bytes(b, "message"))


@dataclass(frozen=True)
class WelcomeMessage:
    id: int
    group_id: bytes
    seq: int
    welcome: bytes = field(repr=False)

    @classmethod
    def checked(cls, b: object) -> WelcomeMessage:
        if not isinstance(b, dict):
            raise Malformed("a Welcome is not a map")
        return cls(_count(b, "id"), _bytes(b, "group_id"), _count(b, "seq"), _bytes(b, "welcome"))


@dataclass(frozen=True)
class Removed:
    """This client's identity is no longer a member of the group: no more pushes for it."""

    group_id: bytes
    seq: int


@dataclass(frozen=True)
class PushError:
    code: str
    reason: str
    group_id: bytes | None


@dataclass(frozen=True)
class Accepted:
    seq: int
    epoch: int


@dataclass(frozen=True)
class RoomToken:
    room: str
    token: str = field(repr=False)
    expires_at: int  # Unix time, by the service's clock
    epoch: int
    ttl: int | None = None  # its lifetime in seconds, whatever the two clocks say


PushEvent = Message | WelcomeMessage | Removed | PushError


@contextlib.contextmanager
def _checking() -> Iterator[None]:
    """Turns a malformed field of an answer into the client's `RequestFailed` (bad_answer)."""
    try:
        yield
    except Malformed as exc:
        raise _bad_answer(exc) from None


class DeliveryClient:
    def __init__(
        self,
        base_url: str,
        identity: str,
        cipher_suite: int,
        signature_private: bytes,
        signature_public: bytes,
        *,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.identity = identity
        self.cipher_suite = cipher_suite
        self._signature_private = signature_private
        self.signature_public = signature_public
        self._http = http
        self._owns_http = http is None
        self.session: str | None = None

    def __repr__(self) -> str:
        return f"DeliveryClient({_without_password(self.base_url)!r}, {self.identity!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)
        return self._http

    async def close(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    # -- plumbing

    async def _raw(
        self, method: str, path: str, body: dict[str, Any] | None, auth: bool
    ) -> tuple[int, Any]:
        headers = {}
        data = None
        if body is not None:
            headers["Content-Type"] = CBOR
            data = cbor2.dumps(body)
        if auth:
            if self.session is None:
                await self.login()
            headers["Authorization"] = f"Bearer {self.session}"
        async with self.http.request(
            method, self.base_url + path, data=data, headers=headers
        ) as resp:
            chunks, size = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise RequestFailed(
                        resp.status, "bad_answer",
                        f"the delivery service's answer exceeds {MAX_ANSWER} bytes",
                    )
                chunks.append(chunk)
            raw = b"".join(chunks)
            if resp.content_type == CBOR and raw:
                try:
                    return resp.status, cbor2.loads(raw)
                except Exception:  # cbor2 raises several types on malformed input
                    raise RequestFailed(
                        resp.status, "bad_answer", "the delivery service's answer is not CBOR"
                    ) from None
            return resp.status, None

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = True
    ) -> Any:
        status, answer = await self._raw(method, path, body, auth)
        for _ in range(RETRIES_429):
            wait = answer.get("retry_after") if isinstance(answer, dict) else None
            if status != 429 or not isinstance(wait, int) or not 0 < wait <= MAX_RETRY_WAIT:
                break
            await asyncio.sleep(wait)
            status, answer = await self._raw(method, path, body, auth)
        if status == 401 and auth:
            # The session expired or was revoked: prove possession again, once.
            await self.login()
            status, answer = await self._raw(method, path, body, auth)
        if status >= 400:
            answer = answer if isinstance(answer, dict) else {}
            code = str(answer.pop("error", "http_error"))[:MAX_PUSH_TEXT]
            reason = str(answer.pop("reason", f"HTTP {status}"))[:MAX_PUSH_TEXT]
            # Extra fields become keyword arguments: only text keys that clash with none.
            extra = {k: v for k, v in answer.items()
                     if type(k) is str and k not in ("status", "code", "reason")}
            if code == "stale_epoch":
                try:  # the caller waits for this epoch: it must be one
                    _count(answer, "current_epoch")
                except Malformed as exc:
                    raise _bad_answer(exc, status) from None
                raise StaleEpochRejected(status, code, reason, **extra)
            raise RequestFailed(status, code, reason, **extra)
        if not isinstance(answer, dict):
            # An HTML page, say: something else than a Conclave delivery service answers here.
            raise RequestFailed(
                status, "bad_answer",
                "not a Conclave delivery service, or a malformed answer (not a CBOR map)",
            )
        return answer

    async def _proof(self) -> dict[str, Any]:
        with _checking():
            challenge = _bytes(await self._request("POST", "/v1/challenges", auth=False),
                               "challenge")
        signature = sign_with_label(
            self.cipher_suite,
            self._signature_private,
            CHALLENGE_LABEL,
            challenge_content(challenge, self.identity),
        )
        return {"identity": self.identity, "challenge": challenge, "signature": signature}

    # -- identity

    async def register(self) -> None:
        """Register the identity and its signature key (idempotent), and open a session."""
        body = await self._proof()
        body |= {"cipher_suite": self.cipher_suite, "signature_key": self.signature_public}
        with _checking():
            self.session = _text(
                await self._request("POST", "/v1/identities", body, auth=False), "session"
            )

    async def login(self) -> None:
        body = await self._proof()
        with _checking():
            self.session = _text(
                await self._request("POST", "/v1/sessions", body, auth=False), "session"
            )

    async def logout(self) -> None:
        if self.session is not None:
            with contextlib.suppress(RequestFailed):
                await self._raw("DELETE", "/v1/sessions", None, True)
            self.session = None

    # -- key packages

    async def upload_key_packages(
        self, key_packages: list[bytes], last_resort: bytes | None = None
    ) -> int:
        """Upload MLSMessage-framed KeyPackages; returns how many unclaimed ones are stored."""
        body: dict[str, Any] = {"key_packages": list(key_packages)}
        if last_resort is not None:
            body["last_resort"] = last_resort
        with _checking():
            return _count(await self._request("POST", "/v1/key_packages", body), "count")

    async def key_package_count(self) -> int:
        with _checking():
            return _count(await self._request("GET", "/v1/key_packages/count"), "count")

    async def claim_key_package(self, identity: str) -> bytes:
        path = f"/v1/identities/{quote(identity, safe='')}/key_package"
        with _checking():
            return _bytes(await self._request("POST", path), "key_package")

    # -- groups

    async def create_group(self, group_id: bytes, group_info: bytes | None = None) -> int:
        body: dict[str, Any] = {"group_id": group_id}
        if group_info is not None:
            body["group_info"] = group_info
        with _checking():
            return _count(await self._request("POST", "/v1/groups", body), "epoch")

    async def group(self, group_id: bytes) -> dict[str, Any]:
        """{"group_id", "epoch", "seq", "members"} as the service sees the group."""
        return dict(await self._request("GET", f"/v1/groups/{group_id.hex()}"))

    async def send(
        self,
        group_id: bytes,
        message: bytes,
        *,
        adds: list[str] | tuple[str, ...] = (),
        removes: list[str] | tuple[str, ...] = (),
        group_info: bytes | None = None,
    ) -> Accepted:
        """Post a PublicMessage or PrivateMessage (an MLSMessage). For a commit, `adds` and
        `removes` name the identities it adds and removes, and `group_info` is the new epoch's
        GroupInfo for external joiners."""
        body: dict[str, Any] = {"message": message}
        if adds:
            body["adds"] = list(adds)
        if removes:
            body["removes"] = list(removes)
        if group_info is not None:
            body["group_info"] = group_info
        answer = await self._request("POST", f"/v1/groups/{group_id.hex()}/messages", body)
        with _checking():
            return Accepted(_count(answer, "seq"), _count(answer, "epoch"))

    async def send_welcome(self, group_id: bytes, welcome: bytes) -> int:
        answer = await self._request(
            "POST", f"/v1/groups/{group_id.hex()}/welcomes", {"welcome": welcome}
        )
        with _checking():
            return _count(answer, "seq")

    async def publish_group_info(self, group_id: bytes, group_info: bytes) -> int:
        answer = await self._request(
            "PUT", f"/v1/groups/{group_id.hex()}/group_info", {"group_info": group_info}
        )
        with _checking():
            return _count(answer, "seq")

    async def fetch_group_info(self, group_id: bytes) -> bytes:
        with _checking():
            return _bytes(
                await self._request("GET", f"/v1/groups/{group_id.hex()}/group_info"),
                "group_info",
            )

    async def messages(
        self, group_id: bytes, after: int = 0, limit: int = 500, since_epoch: int = 0
    ) -> list[Message]:
        """The group's log after sequence number `after`. A new member passes the epoch of its
        Welcome as `since_epoch`: commits of that epoch may precede the Welcome in the log."""
        answer = await self._request(
            "GET",
            f"/v1/groups/{group_id.hex()}/messages?after={after}&limit={limit}"
            f"&since_epoch={since_epoch}",
        )
        with _checking():
            messages = answer.get("messages")
            if not isinstance(messages, list):
                raise Malformed("'messages' is not a list")
            return [Message.checked(m) for m in messages]

    async def audit_log(self, group_id: bytes, after: int = 0) -> list[Message]:
        answer = await self._request("GET", f"/v1/groups/{group_id.hex()}/audit?after={after}")
        return [Message.from_body(m) for m in answer["entries"]]

    async def welcomes(self, after: int = 0) -> list[WelcomeMessage]:
        answer = await self._request("GET", f"/v1/welcomes?after={after}")
        with _checking():
            welcomes = answer.get("welcomes")
            if not isinstance(welcomes, list):
                raise Malformed("'welcomes' is not a list")
            return [WelcomeMessage.checked(w) for w in welcomes]

    async def room_token(self, group_id: bytes) -> RoomToken:
        a = await self._request("POST", f"/v1/groups/{group_id.hex()}/room_token")
        with _checking():
            # A service from before ttl was sent: none (any other non-count: none either).
            ttl = a.get("ttl")
            ttl = ttl if type(ttl) is int and 0 <= ttl <= MAX_INT else None
            return RoomToken(_text(a, "room"), _text(a, "token"), _count(a, "expires_at"),
                             _count(a, "epoch"), ttl)

    async def connect(self, *, reconnect: bool = True) -> PushStream:
        stream = PushStream(self, reconnect=reconnect)
        await stream.start()
        return stream


class PushStream:
    """The client's WebSocket: subscriptions with cursors, reconnecting from the last delivered
    sequence number. Iterate it (or call `next`) for `PushEvent`s."""

    def __init__(self, client: DeliveryClient, *, reconnect: bool = True) -> None:
        self.client = client
        self.reconnect = reconnect
        self.cursors: dict[bytes, int] = {}
        self.welcome_cursor: int | None = None
        self._events: asyncio.Queue[PushEvent | None] = asyncio.Queue()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep  # tests record waits

    async def start(self) -> None:
        await self._open()
        self._task = asyncio.create_task(self._run())

    async def _open(self) -> None:
        c = self.client
        if c.session is None:
            await c.login()
        url = c.base_url.replace("http", "ws", 1) + "/v1/ws"
        try:
            ws = await c.http.ws_connect(url, headers={"Authorization": f"Bearer {c.session}"})
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 401:
                raise
            await c.login()
            ws = await c.http.ws_connect(url, headers={"Authorization": f"Bearer {c.session}"})
        self._ws = ws
        for group_id, after in self.cursors.items():
            await self._send({"type": "subscribe", "group_id": group_id, "after": after})
        if self.welcome_cursor is not None:
            await self._send({"type": "welcomes", "after": self.welcome_cursor})
        self._connected.set()

    async def _send(self, body: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(cbor2.dumps(body))

    async def subscribe(self, group_id: bytes, after: int = 0) -> None:
        """Receive the group's messages with sequence numbers greater than `after`."""
        self.cursors[group_id] = after
        await self._connected.wait()
        await self._send({"type": "subscribe", "group_id": group_id, "after": after})

    async def subscribe_welcomes(self, after: int = 0) -> None:
        self.welcome_cursor = after
        await self._connected.wait()
        await self._send({"type": "welcomes", "after": after})

    async def unsubscribe(self, group_id: bytes) -> None:
        self.cursors.pop(group_id, None)
        await self._connected.wait()
        await self._send({"type": "unsubscribe", "group_id": group_id})

    async def _run(self) -> None:
        delay = RECONNECT_DELAY
        try:
            while not self._closed:
                assert self._ws is not None
                opened = time.monotonic()
                async for msg in self._ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and self._receive(msg.data):
                        delay = RECONNECT_DELAY
                if time.monotonic() - opened >= LASTING_CONNECTION:
                    delay = RECONNECT_DELAY
                self._connected.clear()
                if self._closed or not self.reconnect:
                    break
                while not self._closed:
                    # Only an event resets the delay, not "subscribed": a service that accepts
                    # each reconnection and then fails it (1011: a damaged table, a catch-up
                    # the database declines) would otherwise be asked every 50 ms by every
                    # client. Jittered: clients cut off together do not come back in step.
                    await self._sleep(delay * (0.5 + random.random() / 2))
                    delay = min(delay * 2, MAX_RECONNECT_DELAY)
                    try:
                        await self._open()
                        break
                    except Exception as exc:  # whatever the failure, keep trying
                        log.debug("reconnect failed: %s", exc)
        finally:
            # However the stream ends (even by a bug), its reader must learn it: without the
            # sentinel it would wait for ever. (And `connected` must not say it is open.)
            self._connected.clear()
            self._events.put_nowait(None)

    def _receive(self, data: bytes) -> bool:
        """One frame from the service, which is not trusted: a malformed one is reported as a
        `PushError` (code "bad_frame") and dropped, and the stream reads on. True if it was a
        new message, welcome or removal (the stream made progress)."""
        try:
            body = cbor2.loads(data)
        except Exception:  # cbor2 raises several types on malformed input
            self._bad_frame("a push frame that is not CBOR")
            return False
        if not isinstance(body, dict):
            self._bad_frame("a push frame that is not a map")
            return False
        try:
            return self._dispatch(body)
        except Malformed as exc:
            self._bad_frame(f"a malformed {str(body.get('type'))[:40]!r} push frame: {exc}")
            return False

    def _bad_frame(self, reason: str) -> None:
        log.debug("delivery service: %s (dropped)", reason)
        self._events.put_nowait(PushError("bad_frame", reason, None))

    def _dispatch(self, body: dict[str, Any]) -> bool:
        kind = body.get("type")
        if kind == "message":
            m = Message.checked(body)
            cursor = self.cursors.get(m.group_id)
            if cursor is None or m.seq <= cursor:
                return False  # a duplicate after a resubscribe, or an unsubscribed group
            self.cursors[m.group_id] = m.seq
            self._events.put_nowait(m)
            return True
        elif kind == "welcome":
            w = WelcomeMessage.checked(body)
            if self.welcome_cursor is not None and w.id <= self.welcome_cursor:
                return False
            self.welcome_cursor = w.id
            self._events.put_nowait(w)
            return True
        elif kind == "removed":
            removed = Removed(_bytes(body, "group_id"), _count(body, "seq"))
            self.cursors.pop(removed.group_id, None)
            self._events.put_nowait(removed)
            return True
        elif kind == "error":
            group_id = body.get("group_id")
            self._events.put_nowait(PushError(
                str(body.get("error", ""))[:MAX_PUSH_TEXT],
                str(body.get("reason", ""))[:MAX_PUSH_TEXT],
                group_id if type(group_id) is bytes else None,
            ))
        return False  # "subscribed", an error: no progress

    @property
    def connected(self) -> bool:
        """Whether the stream's WebSocket is open now (False while it reconnects)."""
        return self._connected.is_set()

    async def next(self, timeout: float | None = None) -> PushEvent:
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)
            raise ConnectionError("push stream closed")
        return event

    def __aiter__(self) -> PushStream:
        return self

    async def __anext__(self) -> PushEvent:
        try:
            return await self.next()
        except ConnectionError:
            raise StopAsyncIteration from None

    async def close(self) -> None:
        """Ends the stream; never raises (a stream that failed is closed all the same, so that
        whoever closes it goes on to close the rest)."""
        self._closed = True
        if self._ws is not None:
            try:
                await self._ws.close()
            except Exception as exc:
                log.debug("closing the push stream: %s", exc)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception as exc:
                log.warning("the push stream had failed: %s", exc)
