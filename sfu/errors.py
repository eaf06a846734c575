"""The exception hierarchy of the SFU.

Every error a client or operator can provoke is an `SFUError`; messages say what was wrong and
what to do about it, and never carry token secrets or media.
"""

from __future__ import annotations


class SFUError(Exception):
    """Base class of every error raised by `sfu`."""


class TokenError(SFUError):
    """A room token was refused.

    `reason` is one of: "malformed", "bad signature", "expired", "wrong room", "wrong identity".
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        self.reason = reason
        super().__init__(message or f"room token refused: {reason}")


class SignallingError(SFUError):
    """A signalling message that is malformed or not allowed in the current state.

    `code` is a short machine-readable string sent back to the client in the error reply;
    `reason` refines code "token" with the `TokenError.reason`.
    """

    def __init__(self, code: str, message: str, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason
        super().__init__(message)


class LimitExceeded(SignallingError):
    """A configured limit (rooms, participants per room, message size) would be exceeded."""

    def __init__(self, message: str) -> None:
        super().__init__("limit", message)


class Redirect(SignallingError):
    """The room is served by another SFU worker process; join again at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__("redirect", f"this room is served at {url}")


class ConfigError(SFUError):
    """The SFU was started with an unusable configuration (e.g. an empty token secret)."""


class Unavailable(SignallingError):
    """The SFU worker process that serves the room is down (restarting); join again later."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)
