"""The exceptions of the conclave application; the CLI prints their message, never a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from delivery_service.errors import RequestFailed


class ConclaveError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ServiceUnavailable(ConclaveError):
    """The delivery service or the SFU cannot be reached."""


class StateInUse(ConclaveError):
    """Another run holds the lock on an identity's saved state (`Participant._lock_state`)."""


class NotInGroup(ConclaveError):
    """An operation needs membership of the call's MLS group."""


class CommitFailed(ConclaveError):
    """A commit was refused by the delivery service more often than the retry budget allows."""


class AuditFailure(ConclaveError):
    """The audit log is inconsistent: `seq` names the message that broke the chain."""

    def __init__(self, seq: int | None, message: str) -> None:
        self.seq = seq
        where = f"message seq {seq}: " if seq is not None else ""
        super().__init__(where + message)


class WrongSFU(ConclaveError):
    """The SFU refused the delivery service's room token as signed with another secret: it is
    not the SFU that this delivery service issues tokens for (a wrong --sfu)."""


# A refusal that passes: too many requests, or the service (or a proxy before it) unavailable.
TRY_AGAIN_STATUSES = (429, 502, 503, 504)


def refusal_reason(exc: RequestFailed) -> str:
    """Why the delivery service refused a request, in words for the user: its reason, without
    the HTTP status and error code (`RequestFailed`'s text: for --debug), and for a refusal
    that passes (`TRY_AGAIN_STATUSES`) when to try again, which the user must not lose: in
    the seconds the service asked for (its reason says "retry after the given seconds", and
    gives them in a field of its answer), or later."""
    reason = exc.reason or f"HTTP {exc.status}"
    wait = exc.extra.get("retry_after")
    if type(wait) is int and wait > 0:
        if "the given seconds" in reason:
            return reason.replace("the given seconds", f"{wait} s")
        return f"{reason} (try again in {wait} s)"
    said = reason.lower()
    if exc.status in TRY_AGAIN_STATUSES and "retry" not in said and "try again" not in said:
        return f"{reason}: try again later"
    return reason


def connection_failure(exc: BaseException | None, service: str = "the service",
                       url: str | None = None) -> str | None:
    """Why a connection to a server could not be made, in words for the user, or None if
    `exc` is not such a failure (aiohttp's ClientConnectorError) or its words say no more than
    aiohttp's own. aiohttp's text ("Cannot connect to host H:P ssl:default [Connect call failed
    ('H', P)]") names its TLS settings even for an http:// URL, and not what to check:

    - connection refused: nothing accepts connections at that address: is `service` running,
      on that port?
    - TLS asked of a server that does not speak it (an https:// URL of a plain-HTTP service,
      "WRONG_VERSION_NUMBER"): give the URL as http:// (`url` so, if given: the whole URL
      tried, path and all, where the host and port alone are no URL to give, as for the SFU).
    - any other OS error (a name that does not resolve, no route): its own reason, without
      the ssl noise."""
    import os
    import ssl

    import aiohttp

    if not isinstance(exc, aiohttp.ClientConnectorError) or isinstance(
        exc, aiohttp.ClientConnectorCertificateError
    ):
        return None
    where = _host_port(exc.host, exc.port)
    os_error = exc.os_error
    if isinstance(os_error, ssl.SSLError):
        if os_error.reason == "WRONG_VERSION_NUMBER":
            plain = f"http://{where}"
            if url is not None and url[:8].lower() == "https://":
                from .urls import shown_url

                plain = shown_url("http://" + url[8:])
            return (
                f"the server at {where} does not speak TLS (https://) there: if it is a "
                f"plain-HTTP service (as `conclave serve` runs its services), give its URL as "
                f"{plain}"
            )
        return None  # another TLS failure: aiohttp's words name it
    reason = os_error.strerror or str(os_error) or type(os_error).__name__
    if os_error.errno is not None and reason.startswith("Connect call failed"):
        reason = os.strerror(os_error.errno)  # asyncio's words, for any errno: the OS's
    if isinstance(os_error, ConnectionRefusedError):
        return (
            f"nothing accepts connections at {where} ({reason}): is `conclave serve` (or "
            f"{service}) running, on that port?"
        )
    return f"cannot connect to {where}: {reason}"


def _host_port(host: str, port: int | None) -> str:
    """HOST:PORT as a URL's authority writes it: an IPv6 address in brackets, its zone as RFC
    6874 writes it (`[fe80::1%25eth0]`), the form `--ds` and `--sfu` take."""
    from .urls import shown_urls

    shown = f"[{host}]" if ":" in host else host
    authority = shown if port is None else f"{shown}:{port}"
    return shown_urls(f"tcp://{authority}").removeprefix("tcp://")
