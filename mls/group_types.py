"""What the Group API returns: `CommitResult`, `ProcessedMessage`, `Member`, `PendingProposal`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .commit import Commit
from .framing import Sender, SenderType
from .proposals import Proposal


class CommitResult:
    """A created Commit (MLSMessage), the Welcome for its new members, and the new epoch's signed
    GroupInfo (MLSMessage). The GroupInfo carries the whole tree, so it is only built (O(N)) when
    `group_info` is first read."""

    __slots__ = ("commit", "welcome", "_group_info")

    def __init__(
        self, commit: bytes, welcome: bytes | None, group_info: bytes | Callable[[], bytes]
    ) -> None:
        self.commit = commit
        self.welcome = welcome
        self._group_info = group_info

    @property
    def group_info(self) -> bytes:
        if callable(self._group_info):
            self._group_info = self._group_info()
        return self._group_info

    def __repr__(self) -> str:
        return (
            f"CommitResult(commit={len(self.commit)} bytes, welcome="
            f"{None if self.welcome is None else len(self.welcome)} bytes)"
        )


@dataclass(slots=True)
class ProcessedMessage:
    """What `Group.process` found. `kind` is "application", "proposal" or "commit"; `data` holds
    application data; `sender` the member's leaf index (None for external and new-member
    senders)."""

    kind: str
    data: bytes | None = field(repr=False)  # decrypted application data: not for logs
    sender: int | None
    sender_type: SenderType
    epoch: int
    authenticated_data: bytes = field(default=b"", repr=False)
    proposal: Proposal | None = None
    commit: Commit | None = None
    own: bool = False
    removed: bool = False


@dataclass(frozen=True, slots=True)
class Member:
    leaf_index: int
    identity: bytes
    signature_key: bytes


@dataclass(slots=True)
class PendingProposal:
    """A proposal received or sent in the current epoch, with its sender."""

    proposal: Proposal
    sender: Sender
