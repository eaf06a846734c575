"""Serialising a `Group` with its secrets (`Group.to_bytes` / `Group.from_bytes`), versioned.

The encoding is a private TLS-style format: magic "MLSG", a format version, then the client, the
group settings and the epoch state (GroupContext, ratchet tree, private tree keys, epoch secrets,
secret tree with its ratchets and retained keys, transcript hash, cached proposals, resumption
PSKs) and the pending Commit's state if there is one. The result holds private keys: store it as
a secret. `EpochSecrets` and `SecretTree` write and read their own parts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .client import Client
from .crypto import Crypto, get_crypto
from .errors import DecodeError, MLSError, ValidationError
from .framing import Sender
from .group_context import GroupContext
from .group_epoch import EpochState, PendingCommit
from .group_types import PendingProposal
from .key_schedule import EpochSecrets
from .proposals import Proposal, ReInit
from .ratchet_tree import RatchetTree
from .secret_tree import SecretTree
from .tls import Reader, Writer
from .treekem import NodeKeyPair, TreeKEMPrivateState

if TYPE_CHECKING:
    from .group import Group


__all__ = ["dump_group", "load_group"]

_MAGIC = b"MLSG"
_FORMAT_VERSION = 1


def read_format_header(
    r: Reader, magic: bytes, version: int | tuple[int, ...], what: str
) -> int:
    """Checks the magic and format version (one of `version`) that start a serialised
    `what`; returns the version found."""
    if r.raw(len(magic), f"{what}.magic") != magic:
        raise DecodeError(f"not a serialised mls.{what}", f"{what}.magic")
    found = r.uint16(f"{what}.format_version")
    versions = (version,) if isinstance(version, int) else version
    if found not in versions:
        expected = " or ".join(str(v) for v in versions)
        raise DecodeError(
            f"{what} state format {found} is not supported (expected {expected})",
            f"{what}.format_version",
        )
    return found


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
    st.secrets.write(w)
    st.secret_tree.write(w)
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
    st.secrets = EpochSecrets.read(r, crypto)
    st.secret_tree = SecretTree.read(r, crypto)
    # State written before encryption_secret was deleted on use (§9.2) still holds it; the
    # secret tree restored above is all that needs it.
    st.secrets.delete("encryption_secret")
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
    w.opaque(group._client.to_bytes(key_packages=False))  # the group needs none of them
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
        if client is not None and (
            client.signature_key != stored_client.signature_key
            or client.cipher_suite != stored_client.cipher_suite
        ):
            raise ValidationError(
                "the Client given to Group.from_bytes is not the one this group state belongs "
                "to (another signature key or cipher suite)"
            )
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
        group.ratchet_window = state.secret_tree.window
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
