"""SFrame keys from MLS (RFC 9605 §5.2).

Per MLS epoch: ``base_key = MLS-Exporter("SFrame 1.0 Base Key", "", AEAD.Nk)``. Each member
sends under KIDs ::

    KID = (context << (S + E)) + (sender_index << E) + (epoch % (1 << E))

where S is the smallest value with ``group_size <= 1 << S`` (group_size = the number of leaves up
to the highest occupied leaf index, so every leaf index fits), E is a setting, and `context` is
chosen by the sender (one per outgoing stream, so streams never share a CTR sequence). Each
KID's sframe_key and sframe_salt come from base_key and that KID (§4.4.2).

Transitions: the sender switches to the new epoch's keys at once; a receiver keeps earlier
epochs for `grace_period` seconds, picks the key by the KID's epoch bits, then deletes them. An
older epoch with the same low E bits as a new one is dropped when the new one arrives (§5.2),
and (E > 1) so is one with the low bits of the epoch after it, whose frames may come first
and must wait for their own keys: at most 2^E - 1 epochs are kept. Frames of up to
`MAX_EPOCHS_AHEAD` epochs ahead whose slot is free may wait for their keys (`awaits_kid`).

Every member can derive every member's keys from base_key, so a frame that decrypts proves it
came from a member of that epoch, not from the member its KID names (RFC 9605 §7.2).

This module needs only a group's exporter, epoch, leaf index and member list (`ExporterGroup`).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

from .cipher_suites import CipherSuite
from .context import RecvKeyContext, SendKeyContext, SFrameContext
from .errors import KeyScheduleError, KeyUsageError
from .header import decode_header
from .replay import DEFAULT_WINDOW

BASE_KEY_LABEL = b"SFrame 1.0 Base Key"
DEFAULT_EPOCH_BITS = 4
DEFAULT_GRACE_PERIOD = 2.0
# The highest KID context value a receiver derives keys for (a stream per value: audio, video,
# screen ...). Every member can derive keys for any context, so without a bound one member could
# make every receiver keep a key for each of millions of contexts.
DEFAULT_MAX_CONTEXT = 7
# Frames whose KID names an epoch up to this many ahead of the current one may wait for its keys
# (`awaits_kid`): their sender processed commits this member has not yet, as when several
# members join one after another. Never more than half the 2^E epoch slots, so that a slot
# ahead is not mistaken for one behind.
MAX_EPOCHS_AHEAD = 3

log = logging.getLogger(__name__)


class ExporterGroup(Protocol):
    """What the key schedule needs of an MLS group (`mls.Group` provides it)."""

    @property
    def epoch(self) -> int: ...

    @property
    def leaf_index(self) -> int: ...

    @property
    def members(self) -> Any: ...

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes: ...


def leaf_indices(members: Any) -> list[int]:
    """The leaf indices of `members`: a mapping keyed by leaf index, or an iterable of leaf
    indices or of objects with a `leaf_index` attribute."""
    if isinstance(members, Mapping):
        items: Iterable[Any] = members.keys()
    else:
        items = members
    indices = []
    for member in items:
        if isinstance(member, int):
            indices.append(member)
        elif isinstance(getattr(member, "leaf_index", None), int):
            indices.append(member.leaf_index)
        else:
            raise KeyScheduleError(
                f"cannot read a leaf index from group member {type(member).__name__}; "
                "expected an int or an object with a `leaf_index` attribute"
            )
    return indices


def index_bits(group_size: int) -> int:
    """S: the smallest value such that ``group_size <= 1 << S``."""
    return max(0, group_size - 1).bit_length()


@dataclass
class EpochKeys:
    """One epoch's SFrame state: its base_key (until the epoch is deleted) and senders.

    Its receive keys are the SFrame context's KIDs with this epoch's low E bits (a slot holds one
    epoch at a time)."""

    epoch: int
    index_bits: int
    senders: frozenset[int]
    base_key: bytes = field(repr=False)
    expires_at: float | None = None  # set when a newer epoch arrives
    # Installed from a saved state: the replay windows of the frames received under it before
    # were not saved, so a replay of those would open; no grace period when it is left.
    restored: bool = False


class _GracedSFrameContext(SFrameContext):
    """The manager's SFrame context (`MLSKeyManager.sframe`): each of its decrypt methods first
    deletes the epochs whose grace period has passed (`expire_due`), as the manager's own do,
    so that a caller using the context directly cannot open a frame under a key that the
    manager would have deleted already."""

    def __init__(
        self,
        cipher_suite: int,
        *,
        replay_window: int,
        resolver: Callable[[int], RecvKeyContext | None],
        expire_due: Callable[[], None],
    ) -> None:
        super().__init__(cipher_suite, replay_window=replay_window, resolver=resolver)
        self._expire_due = expire_due

    @overload
    def decrypt(
        self, metadata: bytes, ciphertext: bytes | bytearray | memoryview
    ) -> bytes | bytearray: ...

    @overload
    def decrypt(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int: ...

    def decrypt(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray | None = None,
        offset: int = 0,
    ) -> bytes | bytearray | int:
        # (`decrypt_into` comes through here too)
        self._expire_due()
        if out is None:
            return super().decrypt(metadata, ciphertext)
        return super().decrypt(metadata, ciphertext, out, offset)

    def decrypt_all(
        self, parts: Iterable[tuple[bytes, bytes | bytearray | memoryview]]
    ) -> list[bytes]:
        self._expire_due()
        return super().decrypt_all(parts)


class MLSKeyManager:
    """The SFrame key schedule of one member of an MLS group.

    Call `update(group)` after every change of epoch (creation, join, each merged commit). Then
    `encrypt` seals under the sender's KID of the newest epoch and `decrypt` opens frames of any
    retained epoch. Only stream contexts 0 to `max_context` are used, sending and receiving:
    a frame under any other context is an unknown KID, and no key is derived for it. `clock` is
    injectable for tests; expired epochs are deleted on the next `decrypt`, `update` or `expire`
    call. `add_listener` registers a callback run after each `update` that installs an epoch
    (receivers holding frames of the next epoch retry them then).

    `sframe` is the underlying `SFrameContext` (its `send_keys` and `recv_keys` can be
    inspected). Decrypting through it directly applies the same grace-period expiry as
    `decrypt`: an epoch past its grace period opens nothing, whichever way it is asked.
    """

    def __init__(
        self,
        cipher_suite: int = CipherSuite.AES_128_GCM_SHA256_128,
        *,
        epoch_bits: int = DEFAULT_EPOCH_BITS,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        replay_window: int = DEFAULT_WINDOW,
        max_context: int = DEFAULT_MAX_CONTEXT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= epoch_bits <= 32:
            raise ValueError("epoch_bits (E) must be between 1 and 32")
        if grace_period < 0:
            raise ValueError("grace_period must not be negative")
        if isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 0:
            raise ValueError(f"max_context must be an integer of at least 0, got {max_context!r}")
        self.sframe: SFrameContext = _GracedSFrameContext(
            cipher_suite,
            replay_window=replay_window,
            resolver=self._resolve,
            expire_due=self._expire_due,
        )
        self.params = self.sframe.params
        self.epoch_bits = epoch_bits
        self.grace_period = grace_period
        self.max_context = max_context
        self.clock = clock
        self.current: EpochKeys | None = None
        self.leaf_index: int | None = None
        # Retained epochs by their low E bits: the KID carries only those.
        self._epochs: dict[int, EpochKeys] = {}
        self._send: dict[int, SendKeyContext] = {}  # context value -> key of the current epoch
        self._next_expiry: float | None = None
        self._send_lock = threading.Lock()
        # Group id -> the highest epoch whose keys were ever installed. Installing one of those
        # again (after `retire`) would restart its send CTRs at 0: AEAD nonces used twice.
        self._highest_epoch: dict[bytes | None, int] = {}
        # Called after each installed epoch; held weakly, so that a receiver that ends without
        # removing its callback (many tracks come and go in a long call) leaves nothing here.
        self._listeners: list[weakref.ref[Callable[[], object]]] = []

    def __repr__(self) -> str:
        epoch = None if self.current is None else self.current.epoch
        return (
            f"MLSKeyManager({self.params.suite.name}, E={self.epoch_bits}, epoch={epoch}, "
            f"retained={sorted(e.epoch for e in self._epochs.values())})"
        )

    # --- KID layout ----------------------------------------------------------------------------

    def kid(self, sender_index: int, epoch: int, index_bits: int, context: int = 0) -> int:
        """KID = (context << (S + E)) + (sender_index << E) + (epoch % (1 << E))."""
        e = self.epoch_bits
        if not 0 <= sender_index < (1 << index_bits):
            raise KeyScheduleError(
                f"sender index {sender_index} does not fit in S={index_bits} bits"
            )
        kid = (context << (index_bits + e)) + (sender_index << e) + (epoch % (1 << e))
        if context < 0 or kid >= 1 << 64:
            raise KeyScheduleError(
                f"context {context} does not fit in the {64 - index_bits - e} KID bits left"
            )
        return kid

    def split_kid(self, kid: int, index_bits: int) -> tuple[int, int, int]:
        """``(context, sender_index, epoch_low_bits)`` of `kid` for a group with S=index_bits."""
        e = self.epoch_bits
        return (
            kid >> (index_bits + e),
            (kid >> e) & ((1 << index_bits) - 1),
            kid & ((1 << e) - 1),
        )

    # --- Epochs --------------------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        return None if self.current is None else self.current.epoch

    @property
    def retained_epochs(self) -> list[int]:
        self.expire()
        return sorted(keys.epoch for keys in self._epochs.values())

    def update(self, group: ExporterGroup, *, restored: bool = False) -> bool:
        """Install the group's current epoch if it is new; True if it was.

        An epoch of a group (by its ``group_id``, if it has one) is installed at most once:
        after `retire`, only a newer epoch of that group is accepted.

        `restored`: the epoch comes from a saved state, in which this member may already have
        received frames. Their replay windows were not saved, so a replay of any of them would
        open (RFC 9605 §9.3): the epoch is deleted at once, with no grace period, when the next
        one is installed or the member retires. Its send CTRs were not saved either, so it
        is never sent in (`encrypt` raises `KeyScheduleError`). Install a newer epoch (a
        commit) before sending or receiving media."""
        epoch = group.epoch
        if self.current is not None:
            if epoch == self.current.epoch:
                return False
            if epoch < self.current.epoch:
                raise KeyScheduleError(
                    f"group epoch went back from {self.current.epoch} to {epoch}"
                )
        group_id = getattr(group, "group_id", None)
        group_id = bytes(group_id) if group_id is not None else None
        highest = self._highest_epoch.get(group_id)
        if highest is not None and epoch <= highest:
            raise KeyScheduleError(
                f"epoch {epoch} of this group is not newer than epoch {highest}, whose keys "
                "this member had already: its send counters would start again from 0 and "
                "reuse nonces; install a newer epoch (a commit) instead"
            )
        members = leaf_indices(group.members)
        leaf = group.leaf_index
        group_size = max([*members, leaf]) + 1
        s = index_bits(group_size)
        if s + self.epoch_bits > 64:
            raise KeyScheduleError(f"a group of {group_size} leaves leaves no room for E bits")
        base_key = group.export_secret(BASE_KEY_LABEL, b"", self.params.Nk)
        now = self.clock()
        with self._send_lock:
            self._install(epoch, s, frozenset(members) - {leaf}, leaf, base_key, now, restored)
            self._highest_epoch[group_id] = epoch
        self.expire(now)
        self._notify()
        return True

    def add_listener(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` after each `update` that installs an epoch, in the thread that
        calls `update` (the event loop's, in an aiortc app), once the new keys are in place.

        Held weakly: a bound method is called as long as its object lives, a function as long
        as something else holds it. Exceptions it raises are logged and do not stop `update`."""
        self._listeners = [ref for ref in self._listeners if ref() is not None]  # prune the dead
        ref: weakref.ref[Callable[[], object]]
        if hasattr(callback, "__self__") and hasattr(callback, "__func__"):
            ref = weakref.WeakMethod(callback)  # type: ignore[arg-type]
        else:
            ref = weakref.ref(callback)
        self._listeners.append(ref)

    def remove_listener(self, callback: Callable[[], object]) -> None:
        """Stop calling `callback` (if it was added; nothing happens otherwise)."""
        self._listeners = [
            ref for ref in self._listeners if (held := ref()) is not None and held != callback
        ]

    def _notify(self) -> None:
        # On a copy: a listener may add or remove listeners.
        listeners = [held for ref in self._listeners if (held := ref()) is not None]
        self._listeners = [ref for ref in self._listeners if ref() is not None]
        for listener in listeners:
            try:
                listener()
            except Exception:  # one receiver's bug must not stop the epoch change elsewhere
                log.exception("an MLSKeyManager listener failed after an epoch change")

    def retire(self, now: float | None = None) -> None:
        """This member left the group (it was removed): its send keys go at once, so that it
        sends nothing more under the group's keys, and the last epoch's receive keys when the
        grace period ends (frames already on their way still open). A later `update` (the
        member added back) installs the new epoch as on a first join; the retired epoch, or an
        older one, is refused."""
        now = self.clock() if now is None else now
        with self._send_lock:
            self._drop_send_keys()
            if self.current is not None:
                self._leave_epoch(self.current, now)
                self.current = None
            self.leaf_index = None
        self.expire(now)

    def _install(
        self,
        epoch: int,
        s: int,
        senders: frozenset[int],
        leaf: int,
        base_key: bytes,
        now: float,
        restored: bool = False,
    ) -> None:
        # Sender: the old epoch's send keys go at once (and with them their secrets).
        self._drop_send_keys()
        # Receiver: earlier epochs stay for the grace period.
        if self.current is not None:
            self._leave_epoch(self.current, now)
        slot = epoch % (1 << self.epoch_bits)
        if slot in self._epochs:
            self._drop(slot, self._epochs.pop(slot))  # same low E bits: the RFC says remove it now
        keys = EpochKeys(epoch, s, senders, base_key, restored=restored)
        self._epochs[slot] = keys
        self.current = keys
        self.leaf_index = leaf
        following = (epoch + 1) % (1 << self.epoch_bits)
        if following != slot and following in self._epochs and self.epoch_bits > 1:
            # The next epoch's frames often come before its keys (its committer switches at
            # once) and wait for them (`awaits_kid`), which needs its slot free: an epoch kept
            # there, 2^E - 1 epochs old (many commits within the grace period, as when a room
            # fills at a meeting's start), would open them as its own and fail them.
            self._drop(following, self._epochs.pop(following))

    def _leave_epoch(self, keys: EpochKeys, now: float) -> None:
        """`keys` is no longer the current epoch: it stays for the grace period, unless it was
        restored from a saved state (see `update`)."""
        keys.expires_at = now if keys.restored else now + self.grace_period

    def _drop_send_keys(self) -> None:  # under _send_lock
        for key in self._send.values():
            self.sframe.remove_key(key.kid)
        self._send.clear()

    def expire(self, now: float | None = None) -> None:
        """Delete epochs whose grace period has passed."""
        if self._next_expiry is None and not self._retiring():
            return
        now = self.clock() if now is None else now
        next_expiry = None
        for slot, keys in list(self._epochs.items()):
            if keys.expires_at is None:
                continue
            if keys.expires_at <= now:
                self._drop(slot, self._epochs.pop(slot))
            elif next_expiry is None or keys.expires_at < next_expiry:
                next_expiry = keys.expires_at
        self._next_expiry = next_expiry

    def _expire_due(self) -> None:
        """`expire`, if an epoch's grace period may have passed (one comparison otherwise: it
        runs before every frame is decrypted)."""
        if self._next_expiry is not None and self.clock() >= self._next_expiry:
            self.expire()

    def _retiring(self) -> bool:
        return any(keys.expires_at is not None for keys in self._epochs.values())

    def _drop(self, slot: int, keys: EpochKeys) -> None:
        mask = (1 << self.epoch_bits) - 1
        sframe = self.sframe
        held = [*sframe.recv_keys, *sframe.unauthenticated_keys]
        for kid in [k for k in held if k & mask == slot]:
            sframe.remove_key(kid)
        keys.base_key = b""
        # The slot's next epoch has other keys under these KIDs: their removal ends here.
        removed = self.sframe.removed_kids
        removed.difference_update([kid for kid in removed if kid & mask == slot])

    def _resolve(self, kid: int) -> RecvKeyContext | None:
        """Derive the receive key of a KID of a retained epoch, for a member other than us."""
        keys = self._epochs.get(kid & ((1 << self.epoch_bits) - 1))
        if keys is None or not keys.base_key:
            return None
        context, sender, _ = self.split_kid(kid, keys.index_bits)
        if sender not in keys.senders or context > self.max_context:
            return None  # before deriving anything: the KID is the sender's choice
        return RecvKeyContext(self.params, kid, keys.base_key, self.sframe.replay_window)

    # --- Frames --------------------------------------------------------------------------------

    def send_kid(self, context: int = 0) -> int:
        """The KID this member sends under in the current epoch for stream `context`."""
        if self.current is None or self.leaf_index is None:
            raise KeyScheduleError("no MLS epoch installed yet: call update(group) first")
        return self.kid(self.leaf_index, self.current.epoch, self.current.index_bits, context)

    def encrypt(self, metadata: bytes, plaintext: bytes, context: int = 0) -> bytes | bytearray:
        """Seal a frame under this member's key for stream `context` in the current epoch."""
        key = self._send.get(context)
        if key is None:
            key = self._new_send_key(context)
        try:
            return key.encrypt(metadata, plaintext)
        except KeyUsageError:
            if not key.removed:
                raise
            # `update` or `retire` ran (in the event loop) while this thread sealed the frame:
            # sealed again under the current key, or refused if this member has none.
            return self._new_send_key(context).encrypt(metadata, plaintext)

    def encrypt_at(
        self,
        metadata: bytes,
        plaintext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
        context: int = 0,
    ) -> int:
        """`encrypt`, written into `out` from `offset` (see `SendKeyContext.encrypt_at`);
        returns the index in `out` after the SFrame ciphertext."""
        key = self._send.get(context)
        if key is None:
            key = self._new_send_key(context)
        try:
            return key.encrypt_at(metadata, plaintext, out, offset)
        except KeyUsageError:
            if not key.removed:
                raise
            return self._new_send_key(context).encrypt_at(metadata, plaintext, out, offset)

    def _new_send_key(self, context: int) -> SendKeyContext:
        # aiortc encodes in executor threads while `update` runs in the event loop: the KID, the
        # base_key and the `_send` entry must all come from the same epoch.
        if not 0 <= context <= self.max_context:
            # receivers with the same setting would refuse every frame under it
            raise KeyScheduleError(
                f"stream context {context} is not between 0 and max_context={self.max_context}"
            )
        with self._send_lock:
            key = self._send.get(context)
            if key is None:
                kid = self.send_kid(context)  # raises if no epoch is installed
                assert self.current is not None
                if self.current.restored:
                    # This member may have sent in the epoch before the state was saved; its
                    # CTRs were not saved, so counting from 0 again would reuse nonces (§9.1).
                    raise KeyScheduleError(
                        f"epoch {self.current.epoch} was restored from a saved state: sending "
                        "in it could repeat CTRs used before the restart; install a newer "
                        "epoch (a commit) before sending"
                    )
                key = self.sframe.add_send_key(kid, self.current.base_key)
                self._send[context] = key
            return key

    def decrypt(
        self, metadata: bytes, ciphertext: bytes | bytearray | memoryview
    ) -> bytes | bytearray:
        """Open a frame of any member of any retained epoch."""
        self._expire_due()
        # The base class's: the check above is `sframe`'s own, done once.
        return SFrameContext.decrypt(self.sframe, metadata, ciphertext)

    def decrypt_into(
        self,
        metadata: bytes,
        ciphertext: bytes | bytearray | memoryview,
        out: bytearray,
        offset: int = 0,
    ) -> int:
        """`decrypt`, writing the plaintext into `out` from `offset` (see
        `SFrameContext.decrypt_into`); returns the index in `out` after the plaintext."""
        self._expire_due()
        return SFrameContext.decrypt(self.sframe, metadata, ciphertext, out, offset)

    def decrypt_all(
        self, parts: Iterable[tuple[bytes, bytes | bytearray | memoryview]]
    ) -> list[bytes]:
        """Open the SFrame ciphertexts of one media frame, all or nothing (see
        `SFrameContext.decrypt_all`)."""
        self._expire_due()
        return SFrameContext.decrypt_all(self.sframe, parts)

    def awaits_kid(self, kid: int) -> bool:
        """True if `kid` names one of the next `MAX_EPOCHS_AHEAD` epochs after the current one
        (at most half the 2^E slots) whose slot holds no retained epoch: its keys should come
        with the next commits, so a frame under it is worth holding back briefly."""
        if self.current is None:
            return False
        slots = 1 << self.epoch_bits
        slot = kid & (slots - 1)
        ahead = (slot - self.current.epoch) % slots
        return 0 < ahead <= min(MAX_EPOCHS_AHEAD, slots // 2) and slot not in self._epochs

    def sender_of(self, ciphertext: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """``(epoch, sender leaf index)`` named by a frame's KID, if its epoch is retained. Once
        `decrypt` succeeds the epoch is authenticated; the sender only as some member of it."""
        kid, _, _ = decode_header(ciphertext)
        self._expire_due()
        keys = self._epochs.get(kid & ((1 << self.epoch_bits) - 1))
        if keys is None:
            return None
        return keys.epoch, self.split_kid(kid, keys.index_bits)[1]
