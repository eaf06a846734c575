"""Stand-ins for the key-schedule and transform tests: an `mls.Group` with only the exporter,
epoch, leaf index and member list (one random exporter secret per epoch, shared by that epoch's
members), and a clock that moves only when a test says so."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field


@dataclass
class FakeWorld:
    """The group's history: members and exporter secret per epoch."""

    epoch: int = 0
    members: set[int] = field(default_factory=lambda: {0})
    secrets: dict[int, bytes] = field(default_factory=lambda: {0: os.urandom(32)})
    exports: list[tuple[bytes, bytes, int]] = field(default_factory=list)

    def commit(self, add: tuple[int, ...] = (), remove: tuple[int, ...] = ()) -> None:
        self.members = (self.members | set(add)) - set(remove)
        self.epoch += 1
        self.secrets[self.epoch] = os.urandom(32)


class FakeGroup:
    """One member's view; `sync()` plays processing the pending commits, if still a member."""

    def __init__(self, world: FakeWorld, leaf_index: int) -> None:
        self.world = world
        self.leaf_index = leaf_index
        self.epoch = world.epoch
        self.members = sorted(world.members)

    def sync(self) -> None:
        if self.leaf_index in self.world.members:
            self.epoch = self.world.epoch
            self.members = sorted(self.world.members)

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        self.world.exports.append((label, context, length))
        secret = self.world.secrets[self.epoch]
        return hashlib.shake_256(secret + len(label).to_bytes(2, "big") + label + context).digest(
            length
        )


class Clock:
    """A `time.monotonic` stand-in: returns `now`, which tests set."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
