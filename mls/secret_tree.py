"""The secret tree and its per-sender hash ratchets (RFC 9420 §9, §9.1, §9.2).

A `SecretTree` starts from an epoch's `encryption_secret` and derives, lazily and only along the
path that is needed, the `tree_node_[N]_secret` of each leaf and from it the leaf's handshake and
application `HashRatchet`. Groups have thousands of leaves, so nothing is expanded up front.

Deletion (§9.2): a parent secret is dropped as soon as both of its children are derived, a leaf
secret as soon as its two ratchets are initialised, a ratchet secret as soon as the next one is
derived, and a key/nonce pair as soon as it has been handed out for sending or its message has been
successfully decrypted. Python cannot zero immutable `bytes`; "deleted" means this module keeps no
reference to the value.

Receiving is two-step so that a message that fails decryption or verification changes nothing:
`SecretTree.key_for` computes a `PendingKey` without touching the ratchet, and
`SecretTree.consume` applies it (advances the ratchet, keeps skipped keys within the window,
deletes the used key). Out-of-order generations are accepted within a configurable
`RatchetWindow` (§15.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING

from .errors import CryptoError, DecodeError, SecretReuseError, ValidationError
from .tls import Reader, Writer, decode_all, encode_with
from .tree_math import left, level, right, root

if TYPE_CHECKING:
    from .crypto import Crypto

# Generations are uint32 on the wire (SenderData.generation, DeriveTreeSecret's context).
MAX_GENERATION = (1 << 32) - 1


class RatchetType(Enum):
    """Which of a leaf's two hash ratchets (§9): handshake for proposals and commits."""

    HANDSHAKE = "handshake"
    APPLICATION = "application"


@dataclass(frozen=True)
class RatchetWindow:
    """How far a receiver lets a sender's ratchet be reordered (§15.3).

    `out_of_order_tolerance`: keys of generations skipped over are kept while they are at most this
    many generations behind the ratchet's next generation; older ones are deleted.
    `maximum_forward_distance`: a message may be at most this many generations ahead of the next
    expected one; further ahead is refused without deriving anything (a malicious generation
    0xffffffff must not cost billions of derivations).
    """

    out_of_order_tolerance: int = 64
    maximum_forward_distance: int = 1024

    def __post_init__(self) -> None:
        if self.out_of_order_tolerance < 0 or self.maximum_forward_distance < 0:
            raise ValidationError(
                "RatchetWindow limits must be non-negative, got "
                f"out_of_order_tolerance={self.out_of_order_tolerance}, "
                f"maximum_forward_distance={self.maximum_forward_distance}"
            )


DEFAULT_WINDOW = RatchetWindow()


@dataclass(frozen=True)
class RatchetKey:
    """`ratchet_key_[N]_[j]` and `ratchet_nonce_[N]_[j]` for generation j (§9.1)."""

    generation: int
    key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)


@dataclass(frozen=True)
class PendingKey:
    """A receiving key computed but not yet consumed; `SecretTree.consume` applies it.

    Holds the ratchet state that consuming will install, so nothing is derived twice.
    """

    leaf_index: int
    ratchet_type: RatchetType
    ratchet_key: RatchetKey
    _ratchet: HashRatchet = field(repr=False)
    _state_version: int = field(repr=False)
    # Only set when the generation is at or past the ratchet's next generation.
    _next_secret: bytes | None = field(repr=False, default=None)
    _skipped: tuple[RatchetKey, ...] = field(repr=False, default=())
    # The leaf's ratchets, derived by `key_for` but not yet part of the tree (the first message
    # received from the leaf): `consume` installs them.
    _detached_pair: tuple[HashRatchet, HashRatchet] | None = field(repr=False, default=None)
    # The tree `key_for` computed this for: a detached pair must not be installed elsewhere.
    _tree: SecretTree | None = field(repr=False, compare=False, default=None)

    @property
    def generation(self) -> int:
        return self.ratchet_key.generation

    @property
    def key(self) -> bytes:
        return self.ratchet_key.key

    @property
    def nonce(self) -> bytes:
        return self.ratchet_key.nonce


class HashRatchet:
    """One sender ratchet (§9.1): `ratchet_secret_[N]_[j]` -> key, nonce, next secret.

    State: the secret of `next_generation` (every later generation is derivable from it) and the
    keys of earlier, skipped generations that are still within the window.
    """

    __slots__ = ("_crypto", "_secret", "_next_generation", "_skipped", "_window", "_version")

    def __init__(
        self, crypto: Crypto, secret: bytes, window: RatchetWindow = DEFAULT_WINDOW
    ) -> None:
        self._crypto = crypto
        self._secret: bytes | None = secret
        self._next_generation = 0
        self._skipped: dict[int, RatchetKey] = {}
        self._window = window
        # Bumped on every change: a PendingKey computed before a change is re-checked.
        self._version = 0

    def __repr__(self) -> str:
        return (
            f"HashRatchet(next_generation={self._next_generation}, "
            f"retained_generations={self.retained_generations})"
        )

    @property
    def next_generation(self) -> int:
        """The lowest generation not yet derived (the next one a sender would use)."""
        return self._next_generation

    @property
    def retained_generations(self) -> list[int]:
        """Generations before `next_generation` whose keys are still kept (skipped, unused)."""
        return sorted(self._skipped)

    def _key_at(self, secret: bytes, generation: int) -> RatchetKey:
        c = self._crypto
        return RatchetKey(
            generation,
            key=c.derive_tree_secret(secret, b"key", generation, c.aead_key_length),
            nonce=c.derive_tree_secret(secret, b"nonce", generation, c.aead_nonce_length),
        )

    def _next_secret(self, secret: bytes, generation: int) -> bytes:
        return self._crypto.derive_tree_secret(
            secret, b"secret", generation, self._crypto.hash_length
        )

    def _require_secret(self) -> bytes:
        if self._secret is None:
            raise SecretReuseError("this ratchet is exhausted: all 2^32 generations were used")
        return self._secret

    def next(self) -> RatchetKey:
        """Sending: the key and nonce of the next generation, consumed at once (§9.2)."""
        secret = self._require_secret()
        generation = self._next_generation
        out = self._key_at(secret, generation)
        self._secret = (
            None if generation == MAX_GENERATION else self._next_secret(secret, generation)
        )
        self._next_generation = generation + 1
        self._version += 1
        self._prune()
        return out

    def _prune(self) -> None:
        oldest = self._next_generation - self._window.out_of_order_tolerance
        for g in [g for g in self._skipped if g < oldest]:
            del self._skipped[g]

    def prepare(self, generation: int) -> tuple[RatchetKey, bytes | None, tuple[RatchetKey, ...]]:
        """Receiving: compute generation's key without changing state.

        Returns (key, secret of generation + 1 or None if generation was already derived, keys of
        the skipped generations to keep). Raises SecretReuseError for a used or expired generation
        and ValidationError for one too far ahead.
        """
        if not 0 <= generation <= MAX_GENERATION:
            raise ValidationError(f"generation {generation} is not a uint32")
        if generation < self._next_generation:
            skipped = self._skipped.get(generation)
            if skipped is not None:
                return skipped, None, ()
            if generation < self._next_generation - self._window.out_of_order_tolerance:
                raise SecretReuseError(
                    f"generation {generation} is older than the out-of-order window "
                    f"({self._window.out_of_order_tolerance} generations before "
                    f"{self._next_generation}); its key has been deleted"
                )
            raise SecretReuseError(
                f"generation {generation} has already been used; its key has been deleted"
            )
        distance = generation - self._next_generation
        if distance > self._window.maximum_forward_distance:
            raise ValidationError(
                f"generation {generation} is {distance} generations ahead of the next expected "
                f"({self._next_generation}); the limit is {self._window.maximum_forward_distance}"
            )
        secret = self._require_secret()
        # Keys of skipped generations that would fall out of the window at once are not derived.
        keep_from = generation + 1 - self._window.out_of_order_tolerance
        skipped_keys: list[RatchetKey] = []
        for j in range(self._next_generation, generation):
            if j >= keep_from:
                skipped_keys.append(self._key_at(secret, j))
            secret = self._next_secret(secret, j)
        out = self._key_at(secret, generation)
        next_secret = (
            None if generation == MAX_GENERATION else self._next_secret(secret, generation)
        )
        return out, next_secret, tuple(skipped_keys)

    def commit(self, pending: PendingKey) -> None:
        """Apply a `PendingKey` from `prepare`: the generation becomes used (§9.2).

        If the ratchet moved since the key was computed (another message was consumed in
        between), the generation is checked again and SecretReuseError raised if it has since
        been used or fallen out of the window.
        """
        if pending._ratchet is not self:
            raise ValidationError("this pending key belongs to another ratchet")
        generation = pending.generation
        next_secret, skipped = pending._next_secret, pending._skipped
        if pending._state_version != self._version:
            _, next_secret, skipped = self.prepare(generation)
        if generation < self._next_generation:
            del self._skipped[generation]
            self._version += 1
            return
        for k in skipped:
            self._skipped[k.generation] = k
        self._secret = next_secret
        self._next_generation = generation + 1
        self._version += 1
        self._prune()


    # --- persistence (a group's saved state) ---------------------------------------------------

    def write(self, w: Writer) -> None:
        """The ratchet's state: its next secret, next generation and retained skipped keys."""
        w.optional(self._secret, Writer.opaque)
        w.uint32(self._next_generation)

        def write_key(w2: Writer, k: RatchetKey) -> None:
            w2.uint32(k.generation)
            w2.opaque(k.key)
            w2.opaque(k.nonce)

        w.vector(sorted(self._skipped.values(), key=lambda k: k.generation), write_key)

    @classmethod
    def read(cls, r: Reader, crypto: Crypto, window: RatchetWindow = DEFAULT_WINDOW) -> HashRatchet:
        """A ratchet saved by `write`."""
        secret = r.optional(lambda s: s.opaque("ratchet.secret"), "ratchet.secret")
        ratchet = cls(crypto, b"", window)
        ratchet._secret = secret
        ratchet._next_generation = r.uint32("ratchet.next_generation")
        keys = r.vector(
            lambda s: RatchetKey(
                s.uint32("key.generation"), s.opaque("key.key"), s.opaque("key.nonce")
            ),
            "ratchet.skipped",
        )
        ratchet._skipped = {k.generation: k for k in keys}
        return ratchet


class SecretTree:
    """The secret tree of one epoch (§9), deriving leaves' ratchets on demand.

    `n_leaves` is the ratchet tree's leaf count (a power of two in RFC 9420 trees; another count
    is rounded up to one, which leaves every real leaf's secret unchanged).
    """

    __slots__ = ("_crypto", "_n_leaves", "_width_leaves", "_nodes", "_ratchets", "_window")

    def __init__(
        self,
        crypto: Crypto,
        encryption_secret: bytes,
        n_leaves: int,
        window: RatchetWindow = DEFAULT_WINDOW,
    ) -> None:
        if n_leaves < 1:
            raise ValidationError(f"a secret tree needs at least one leaf, got {n_leaves}")
        if len(encryption_secret) != crypto.hash_length:
            raise CryptoError(
                f"encryption_secret must be {crypto.hash_length} bytes, got {len(encryption_secret)}"
            )
        self._crypto = crypto
        self._n_leaves = n_leaves
        self._width_leaves = 1 << (n_leaves - 1).bit_length()
        self._window = window
        # tree_node_[N]_secret for the nodes derived but not yet expanded further.
        self._nodes: dict[int, bytes] = {root(self._width_leaves): encryption_secret}
        self._ratchets: dict[int, tuple[HashRatchet, HashRatchet]] = {}

    @classmethod
    def deleted(
        cls, crypto: Crypto, n_leaves: int, window: RatchetWindow = DEFAULT_WINDOW
    ) -> SecretTree:
        """A tree of `n_leaves` leaves whose secrets are all deleted (see `delete_all`)."""
        tree = cls(crypto, bytes(crypto.hash_length), n_leaves, window)
        tree._nodes.clear()
        return tree

    def __repr__(self) -> str:
        return (
            f"SecretTree(n_leaves={self._n_leaves}, retained_nodes={self.retained_nodes}, "
            f"initialised_leaves={sorted(self._ratchets)})"
        )

    @property
    def n_leaves(self) -> int:
        return self._n_leaves

    @property
    def window(self) -> RatchetWindow:
        return self._window

    @property
    def retained_nodes(self) -> list[int]:
        """Node indices whose tree secrets are still held (for tests and audits)."""
        return sorted(self._nodes)

    def ratchet(self, leaf_index: int, ratchet_type: RatchetType) -> HashRatchet:
        """The leaf's handshake or application ratchet, derived on first use."""
        pair = self._ratchets.get(leaf_index)
        if pair is None:
            pair = self._init_leaf(leaf_index)
        return pair[0] if ratchet_type is RatchetType.HANDSHAKE else pair[1]

    def _init_leaf(
        self, leaf_index: int, pair: tuple[HashRatchet, HashRatchet] | None = None
    ) -> tuple[HashRatchet, HashRatchet]:
        """Derives the leaf's ratchets (or installs `pair`, derived from the same secret by
        `key_for`) and deletes the tree secrets that are no longer needed (§9.2)."""
        start, siblings, leaf_secret = self._plan_leaf(leaf_index)
        # The parent is no longer needed once both children exist: the retained ancestor is
        # replaced by the siblings of the path below it, and the leaf secret by its ratchets.
        del self._nodes[start]
        self._nodes.update(siblings)
        if pair is None:
            pair = self._ratchet_pair(leaf_secret)
        self._ratchets[leaf_index] = pair
        return pair

    def _plan_leaf(self, leaf_index: int) -> tuple[int, dict[int, bytes], bytes]:
        """What deriving the leaf's secret takes, without changing the tree: (the lowest
        retained ancestor, which derivation deletes; the secrets of the siblings of the path
        below it, which it keeps; the leaf secret)."""
        if not 0 <= leaf_index < self._n_leaves:
            raise ValidationError(
                f"leaf index {leaf_index} is outside the group's tree of {self._n_leaves} leaves"
            )
        c = self._crypto
        target = 2 * leaf_index
        node = root(self._width_leaves)
        # Walk down to the lowest retained ancestor, then expand each node into both children.
        while node not in self._nodes:
            node = left(node) if target < node else right(node)
            if level(node) == 0 and node not in self._nodes:
                # Below a retained node every path node is retained, so this means the
                # leaf's ratchets were built before and dropped; that cannot happen here.
                raise SecretReuseError(f"the secret of leaf {leaf_index} has been deleted")
        start, secret = node, self._nodes[node]
        siblings: dict[int, bytes] = {}
        while node != target:
            lo, hi = left(node), right(node)
            lo_secret = c.expand_with_label(secret, b"tree", b"left", c.hash_length)
            hi_secret = c.expand_with_label(secret, b"tree", b"right", c.hash_length)
            if target < node:
                siblings[hi], node, secret = hi_secret, lo, lo_secret
            else:
                siblings[lo], node, secret = lo_secret, hi, hi_secret
        return start, siblings, secret

    def _ratchet_pair(self, leaf_secret: bytes) -> tuple[HashRatchet, HashRatchet]:
        c = self._crypto
        return (
            HashRatchet(
                c, c.expand_with_label(leaf_secret, b"handshake", b"", c.hash_length), self._window
            ),
            HashRatchet(
                c,
                c.expand_with_label(leaf_secret, b"application", b"", c.hash_length),
                self._window,
            ),
        )

    def delete_all(self) -> None:
        """Forgets every secret and key of the tree (§9.2: its epoch is over); later use raises
        SecretReuseError."""
        self._nodes.clear()
        for pair in self._ratchets.values():
            for ratchet in pair:
                ratchet._secret = None
                ratchet._skipped.clear()
                ratchet._version += 1
        self._ratchets.clear()

    def next_key(self, leaf_index: int, ratchet_type: RatchetType) -> RatchetKey:
        """Sending as `leaf_index`: the next unused generation's key and nonce, consumed."""
        return self.ratchet(leaf_index, ratchet_type).next()

    def key_for(self, leaf_index: int, ratchet_type: RatchetType, generation: int) -> PendingKey:
        """Receiving: the key for (leaf, generation), not yet consumed.

        Changes nothing: for a leaf whose ratchets are not derived yet they are derived apart
        and installed by `consume`, so that a message that fails later leaves the tree exactly
        as it was (its saved state too), not with a leaf expanded at a forger's request.
        """
        pair = self._ratchets.get(leaf_index)
        detached = pair is None
        if pair is None:
            pair = self._ratchet_pair(self._plan_leaf(leaf_index)[2])
        ratchet = pair[0] if ratchet_type is RatchetType.HANDSHAKE else pair[1]
        key, next_secret, skipped = ratchet.prepare(generation)
        return PendingKey(
            leaf_index, ratchet_type, key, ratchet, ratchet._version, next_secret, skipped,
            pair if detached else None, self,
        )

    def consume(self, pending: PendingKey) -> None:
        """Mark a received generation used after its message decrypted and verified (§9.2)."""
        if pending._tree is not self:
            # Installing another tree's ratchets would silently corrupt this one.
            raise ValidationError("this pending key belongs to another secret tree")
        if pending._detached_pair is not None:
            if pending.leaf_index not in self._ratchets:
                self._init_leaf(pending.leaf_index, pending._detached_pair)
            else:
                # Another message of the leaf was consumed since: check against its ratchet.
                installed = self.ratchet(pending.leaf_index, pending.ratchet_type)
                pending = replace(
                    pending, _ratchet=installed, _state_version=-1, _detached_pair=None
                )
        pending._ratchet.commit(pending)

    # --- persistence (a group's saved state) -----------------------------------------------------

    def write(self, w: Writer) -> None:
        """The tree's state: size, window, the node secrets still held and the leaves' ratchets.
        The result holds secrets."""
        w.uint32(self._n_leaves)
        w.uint32(self._window.out_of_order_tolerance)
        w.uint32(self._window.maximum_forward_distance)
        w.vector(sorted(self._nodes.items()), lambda w2, kv: (w2.uint32(kv[0]), w2.opaque(kv[1])))

        def write_pair(w2: Writer, item: tuple[int, tuple[HashRatchet, HashRatchet]]) -> None:
            w2.uint32(item[0])
            item[1][0].write(w2)
            item[1][1].write(w2)

        w.vector(sorted(self._ratchets.items()), write_pair)

    @classmethod
    def read(cls, r: Reader, crypto: Crypto) -> SecretTree:
        """A secret tree saved by `write`."""
        n_leaves = r.uint32("secret_tree.n_leaves")
        window = RatchetWindow(r.uint32("window.tolerance"), r.uint32("window.forward"))
        nodes = r.vector(
            lambda s: (s.uint32("secret_tree.node"), s.opaque("secret_tree.secret")),
            "secret_tree.nodes",
        )
        pairs = r.vector(
            lambda s: (
                s.uint32("secret_tree.leaf"),
                (HashRatchet.read(s, crypto, window), HashRatchet.read(s, crypto, window)),
            ),
            "secret_tree.ratchets",
        )
        tree = cls(crypto, bytes(crypto.hash_length), max(n_leaves, 1), window)
        width = 2 * tree._width_leaves - 1
        if any(x >= width for x, _ in nodes) or any(i >= tree._n_leaves for i, _ in pairs):
            raise DecodeError("a node or leaf outside the secret tree", "secret_tree.nodes")
        tree._nodes = dict(nodes)
        tree._ratchets = dict(pairs)
        return tree

    def to_bytes(self) -> bytes:
        return encode_with(self.write)

    @classmethod
    def from_bytes(cls, data: bytes, crypto: Crypto) -> SecretTree:
        return decode_all(data, lambda r: cls.read(r, crypto), "SecretTree")
