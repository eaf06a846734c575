"""The exceptions of the conclave application; the CLI prints their message, never a traceback."""

from __future__ import annotations


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
