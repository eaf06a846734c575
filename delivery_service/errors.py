"""The exception hierarchy of the delivery service.

Every error a client can provoke is a `DeliveryServiceError`: the server turns it into its HTTP
status and a CBOR body ``{"error": code, "reason": text}`` (plus any `extra` fields, such as the
current epoch of a 409). Reasons say what to do; they never carry a secret or a traceback.
"""

from __future__ import annotations

from typing import Any


class DeliveryServiceError(Exception):
    """Base class: `status` is the HTTP status, `code` a stable machine-readable name."""

    status = 400
    code = "bad_request"

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "reason": self.reason, **self.extra}


class BadRequest(DeliveryServiceError):
    """A body that is not the CBOR map the endpoint expects, or an MLS message that is malformed."""


class Unauthorized(DeliveryServiceError):
    """No session, an expired or revoked one, or a failed proof of possession."""

    status = 401
    code = "unauthorized"


class Forbidden(DeliveryServiceError):
    """An authenticated identity acting outside its rights (not a member, another's key...)."""

    status = 403
    code = "forbidden"


class RemovedFromGroup(Forbidden):
    """An identity that a member removed from the group tries to come back on its own (external
    commit, external Add proposal, or the GroupInfo to build one): only a member can add it."""

    code = "removed_from_group"

    def __init__(self) -> None:
        super().__init__("removed from this group; a member must add you again")


class NotFound(DeliveryServiceError):
    status = 404
    code = "not_found"


class Conflict(DeliveryServiceError):
    """The request contradicts stored state (identity already registered with another key...)."""

    status = 409
    code = "conflict"


class NotAdded(Conflict):
    """A Welcome for KeyPackages no commit of the group added (yet): post the commit first. For
    its committer, whose commit is in already, it will not work later either."""

    code = "not_added"


class StaleEpoch(Conflict):
    """A commit (or proposal) for an epoch that is no longer current: process the winner, retry."""

    code = "stale_epoch"

    def __init__(self, epoch: int, current_epoch: int) -> None:
        super().__init__(
            f"message is for epoch {epoch} but the group is at epoch {current_epoch}: fetch and "
            "process the messages you missed, then retry",
            current_epoch=current_epoch,
        )
        self.current_epoch = current_epoch


class Duplicate(Conflict):
    """An exact repeat of a handshake message already in the group's log, posted by another
    identity than its original poster (a retry by the poster gets the original answer)."""

    code = "duplicate"

    def __init__(self, seq: int) -> None:
        super().__init__(
            f"this message is in the group's log already, at seq {seq}: it is not stored twice",
            seq=seq,
        )
        self.seq = seq


class Gone(DeliveryServiceError):
    """No KeyPackage left to claim for an identity."""

    status = 410
    code = "no_key_package"


class PayloadTooLarge(DeliveryServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(DeliveryServiceError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(DeliveryServiceError):
    """Too many requests from one address, or too many challenges outstanding: `retry_after`
    (seconds) says when to try again."""

    status = 429
    code = "too_many_requests"

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason, retry_after=retry_after)
        self.retry_after = retry_after


class StorageConflict(Exception):
    """Internal: an optimistic write lost a race (the group moved on); the caller re-reads."""


class DuplicateMessage(Exception):
    """Internal: the storage holds this handshake message already, at `seq` (nothing was
    stored)."""

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.seq = seq


class KeyPackageLimit(Exception):
    """Internal: storing the packages would put more than the limit unclaimed; `stored` is how
    many are stored (nothing was added)."""

    def __init__(self, stored: int) -> None:
        super().__init__(stored)
        self.stored = stored


class RequestFailed(DeliveryServiceError):
    """Client side: the service refused a request; `status`, `code` and `reason` are its answer."""

    def __init__(self, status: int, code: str, reason: str, **extra: Any) -> None:
        super().__init__(reason, **extra)
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.reason}"


class StaleEpochRejected(RequestFailed):
    """Client side: a 409 for a stale epoch; process messages up to `current_epoch`, then retry."""

    @property
    def current_epoch(self) -> int:
        return int(self.extra["current_epoch"])
