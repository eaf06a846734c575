"""Serialising a `Group` with its secrets (`Group.to_bytes` / `Group.from_bytes`), versioned.

The encoding is a private TLS-style format: magic "MLSG", a format version, then the client, the
group settings and the epoch state (GroupContext, ratchet tree, private tree keys, epoch secrets,
secret tree with its ratchets and retained keys, transcript hash, cached proposals, resumption
PSKs) and the pending Commit's state if there is one. The result holds private keys: store it as
a secret. The secret tree is read through its private attributes (it has no public serialiser).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import Client
from .crypto import Crypto, get_crypto
from .errors import DecodeError, MLSError
from .framing import Sender
from .group_context import GroupContext
from .group_epoch import EpochState, PendingCommit
from .group_types import PendingProposal
from .key_schedule import EpochSecrets
from .proposals import Proposal, ReInit
from .ratchet_tree import RatchetTree
from .secret_tree import HashRatchet, RatchetKey, RatchetWindow, SecretTree
from .tls import Reader, Writer
from .treekem import NodeKeyPair, TreeKEMPrivateState

if TYPE_CHECKING:
    from .group import Group


__all__ = ["dump_group", "load_group"]

_MAGIC = b"MLSG"
_FORMAT_VERSION = 1


def _write_ratchet(w: Writer, r: HashRatchet) -> None:
    w.optional(r._secret, Writer.opaque)
    w.uint32(r._next_generation)

    def write_key(w2: Writer, k: RatchetKey) -> None:
        w2.uint32(k.generation)
        w2.opaque(k.key)
        w2.opaque(k.nonce)

    w.vector(sorted(r._skipped.values(), key=lambda k: k.generation), write_key)


def _read_ratchet(r: Reader, crypto: Crypto, window: RatchetWindow) -> HashRatchet:
    secret = r.optional(lambda s: s.opaque("ratchet.secret"), "ratchet.secret")
    ratchet = HashRatchet(crypto, b"", window)
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


def _write_secret_tree(w: Writer, t: SecretTree) -> None:
    w.uint32(t._n_leaves)
    w.uint32(t._window.out_of_order_tolerance)
    w.uint32(t._window.maximum_forward_distance)
    w.vector(sorted(t._nodes.items()), lambda w2, kv: (w2.uint32(kv[0]), w2.opaque(kv[1])))

    def write_pair(w2: Writer, item: tuple[int, tuple[HashRatchet, HashRatchet]]) -> None:
        w2.uint32(item[0])
        _write_ratchet(w2, item[1][0])
        _write_ratchet(w2, item[1][1])

    w.vector(sorted(t._ratchets.items()), write_pair)


def _read_secret_tree(r: Reader, crypto: Crypto) -> SecretTree:
    n_leaves = r.uint32("secret_tree.n_leaves")
    window = RatchetWindow(r.uint32("window.tolerance"), r.uint32("window.forward"))
    nodes = r.vector(
        lambda s: (s.uint32("secret_tree.node"), s.opaque("secret_tree.secret")),
        "secret_tree.nodes",
    )
    pairs = r.vector(
        lambda s: (
            s.uint32("secret_tree.leaf"),
            (_read_ratchet(s, crypto, window), _read_ratchet(s, crypto, window)),
        ),
        "secret_tree.ratchets",
    )
    tree = SecretTree(crypto, bytes(crypto.hash_length), max(n_leaves, 1), window)
    tree._nodes = dict(nodes)
    tree._ratchets = dict(pairs)
    return tree


def read_format_header(r: Reader, magic: bytes, version: int, what: str) -> None:
    """Checks the magic and format version that start a serialised `what`."""
    if r.raw(len(magic), f"{what}.magic") != magic:
        raise DecodeError(f"not a serialised mls.{what}", f"{what}.magic")
    found = r.uint16(f"{what}.format_version")
    if found != version:
        raise DecodeError(
            f"{what} state format {found} is not supported (expected {version})",
            f"{what}.format_version",
        )


def write_proposal_cache(w: Writer, proposals: dict[bytes, PendingProposal]) -> None:
    """An epoch's received proposals by reference, in arrival order."""

    def write_item(w2: Writer, item: tuple[bytes, PendingProposal]) -> None:
        w2.opaque(item[0])
        item[1].proposal.write(w2)
        item[1].sender.write(w2)

    w.vector(list(proposals.items()), write_item)


def read_proposal_cache(r: Reader, where: str) -> dict[bytes, PendingProposal]:
    def read_item(r2: Reader) -> tuple[bytes, PendingProposal]:
        ref = r2.opaque(f"{where}.proposal_ref")
        return ref, PendingProposal(Proposal.read(r2), Sender.read(r2))

    return dict(r.vector(read_item, f"{where}.proposals"))


def _write_private_state(w: Writer, private: TreeKEMPrivateState | None) -> None:
    """The member's tree keys as (node index, private key, public key), leaf first."""
    pairs: list[tuple[int, NodeKeyPair]] = []
    if private is not None:
        pairs = [(2 * private.leaf_index, private.leaf), *sorted(private.path.items())]
    w.vector(
        pairs,
        lambda w2, kv: (w2.uint32(kv[0]), w2.opaque(kv[1].private), w2.opaque(kv[1].public)),
    )


def _read_private_state(r: Reader, leaf_index: int) -> TreeKEMPrivateState | None:
    pairs = {
        x: NodeKeyPair(private, public)
        for x, private, public in r.vector(
            lambda s: (s.uint32("priv.node"), s.opaque("priv.key"), s.opaque("priv.pub")),
            "state.tree_priv",
        )
    }
    if not pairs:
        return None
    leaf = pairs.pop(2 * leaf_index, None)
    if leaf is None:
        raise DecodeError("the state holds no key for its own leaf", "state.tree_priv")
    return TreeKEMPrivateState(leaf_index, leaf, pairs)


def _write_state(w: Writer, st: EpochState) -> None:
    st.context.write(w)
    w.opaque(st.tree.encode())
    w.uint32(st.leaf_index)
    _write_private_state(w, st.private_state)
    w.vector(
        sorted(st.secrets._secrets.items()),
        lambda w2, kv: (w2.opaque(kv[0].encode()), w2.opaque(kv[1])),
    )
    _write_secret_tree(w, st.secret_tree)
    w.opaque(st.interim_transcript_hash)

    write_proposal_cache(w, st.proposals)
    w.vector(
        list(st.own_update_privs.items()), lambda w2, kv: (w2.opaque(kv[0]), w2.opaque(kv[1]))
    )
    w.vector(
        sorted(st.resumption_psks.items()), lambda w2, kv: (w2.uint64(kv[0]), w2.opaque(kv[1]))
    )
    w.optional(st.reinit, lambda w2, ri: ri.write(w2))
    w.uint8(1 if st.active else 0)
    w.vector(list(st.sent_proposals.items()), lambda w2, kv: (w2.opaque(kv[0]), w2.opaque(kv[1])))


def _read_state(r: Reader, crypto: Crypto) -> EpochState:
    st = EpochState.__new__(EpochState)
    st.context = GroupContext.read(r)
    st.tree = RatchetTree.decode(crypto, r.opaque("state.tree"))
    leaf_index = r.uint32("state.leaf_index")
    st.leaf_index = leaf_index if leaf_index != 0xFFFFFFFF else -1
    st.private_state = _read_private_state(r, st.leaf_index)
    secrets = r.vector(
        lambda s: (s.opaque("secret.name").decode("ascii"), s.opaque("secret.value")),
        "state.secrets",
    )
    st.secrets = EpochSecrets(crypto, dict(secrets))
    st.secret_tree = _read_secret_tree(r, crypto)
    st.interim_transcript_hash = r.opaque("state.interim_transcript_hash")
    st.proposals = read_proposal_cache(r, "state")
    st.own_update_privs = dict(
        r.vector(lambda s: (s.opaque("update.pub"), s.opaque("update.priv")), "state.updates")
    )
    st.resumption_psks = dict(
        r.vector(lambda s: (s.uint64("psk.epoch"), s.opaque("psk.value")), "state.psks")
    )
    st.reinit = r.optional(ReInit.read, "state.reinit")
    st.active = r.uint8("state.active") == 1
    st.sent_proposals = dict(
        r.vector(lambda s: (s.opaque("sent.message"), s.opaque("sent.ref")), "state.sent")
    )
    return st


def dump_group(group: Group) -> bytes:
    w = Writer()
    w.raw(_MAGIC)
    w.uint16(_FORMAT_VERSION)
    w.opaque(group._client.to_bytes())
    w.uint8(1 if group.handshake == "private" else 0)
    w.uint8(1 if group.ratchet_tree_extension else 0)
    w.uint8(1 if group.check_lifetimes else 0)
    w.vector(
        sorted(group._external_psks.items()), lambda w2, kv: (w2.opaque(kv[0]), w2.opaque(kv[1]))
    )
    w.vector(
        sorted(group._other_resumption_psks.items()),
        lambda w2, kv: (w2.opaque(kv[0][0]), w2.uint64(kv[0][1]), w2.opaque(kv[1])),
    )
    _write_state(w, group._state)
    pending = group._pending
    if pending is None:
        w.uint8(0)
    else:
        w.uint8(1)
        _write_state(w, pending.state)
        w.opaque(pending.message)
        w.optional(pending.welcome, Writer.opaque)
        w.opaque(pending.group_info)
    return w.getvalue()


def load_group(cls: type[Group], data: bytes, client: Client | None) -> Group:
    try:
        r = Reader(bytes(data))
        read_format_header(r, _MAGIC, _FORMAT_VERSION, "Group")
        stored_client = Client.from_bytes(r.opaque("Group.client"))
        client = client or stored_client
        crypto = get_crypto(client.cipher_suite)
        handshake = "private" if r.uint8("Group.handshake") else "public"
        tree_ext = r.uint8("Group.ratchet_tree_extension") == 1
        check_lifetimes = r.uint8("Group.check_lifetimes") == 1
        psks = dict(r.vector(lambda s: (s.opaque("psk.id"), s.opaque("psk.value")), "Group.psks"))
        others = r.vector(
            lambda s: ((s.opaque("rpsk.group"), s.uint64("rpsk.epoch")), s.opaque("rpsk.value")),
            "Group.resumption_psks",
        )
        state = _read_state(r, crypto)
        group = cls(
            client, state, handshake=handshake, ratchet_tree_extension=tree_ext, psks=psks
        )
        group.check_lifetimes = check_lifetimes
        group._other_resumption_psks = dict(others)
        if r.uint8("Group.pending"):
            pstate = _read_state(r, crypto)
            message = r.opaque("pending.message")
            welcome = r.optional(lambda s: s.opaque("pending.welcome"), "pending.welcome")
            group._pending = PendingCommit(pstate, message, welcome, r.opaque("pending.info"))
        r.finish("Group")
    except MLSError:
        raise
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise DecodeError(f"corrupt group state: {exc}", "Group") from None
    return group
