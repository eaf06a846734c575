"""TreeKEM (RFC 9420 §7.4-§7.6): creating and processing UpdatePaths, and a member's private view
of the ratchet tree.

The public tree is a `RatchetTree`; the private keys a member holds for it (its leaf's HPKE key and
the keys of the parent nodes it knows, §4.2) are a `TreeKEMPrivateState`, which the Group owns and
which never shows a key in `repr()`.

Both `create_update_path` and `process_update_path` change the tree they are given in place and
return a *new* private state. Each is all-or-nothing on its own (a failure restores the tree), but
a Group also applies the Commit's proposals first, so it works on `tree.copy()` and keeps the copy
and the new state only when every check has passed.

The GroupContext for the HPKE encryptions is the provisional one of §12.4.1/§12.4.2, which holds
the tree hash of the tree *after* the UpdatePath is merged. The caller supplies it as a function
`provisional_context(tree_hash) -> encoded GroupContext`, called once the new tree hash is known.

How a Group uses this module (`added` = leaf indices of this Commit's Adds):

- Creating a Commit: `tree = old.copy()`; apply the proposals (`update_leaf`, `remove_leaf`,
  `add_leaf`); `result = create_update_path(tree, my_index, ..., new_leaves=added)`; each new
  member's Welcome carries `result.path_secret_for(my_index, member)`; keep `tree` and
  `result.private_state` pending until the Commit is accepted.
- Processing a Commit: `tree = old.copy()`; apply the proposals;
  `validate_leaf_node(crypto, path.leaf_node, source=commit, group_id=..., leaf_index=sender,
  tree=tree)`; `out = process_update_path(tree, state, sender, path, ..., new_leaves=added)`.
  Without a path: `state = state.pruned(tree)` and the commit_secret is Nh zero bytes.
- Joining by Welcome: `tree = RatchetTree.decode(...)`; `validate_ratchet_tree(tree, ...)`;
  `state = TreeKEMPrivateState.from_leaf_private(crypto, tree.find_leaf(my_leaf), enc_priv)`,
  then `.with_welcome_path_secret(crypto, tree, group_info.signer, path_secret)` if one was sent.
- An own Update proposal that was committed: `replace(state, leaf=NodeKeyPair(priv, pub))`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from . import tree_math as tm
from .commit import HPKECiphertext, UpdatePath, UpdatePathNode
from .crypto import Crypto, SignaturePrivateKey
from .errors import CryptoError, ValidationError
from .key_package import LeafNode, LeafNodeSource
from .leaf_validation import resign_leaf_node
from .ratchet_tree import RatchetTree

__all__ = [
    "NodeKeyPair",
    "ProcessedUpdatePath",
    "ProvisionalContext",
    "TreeKEMPrivateState",
    "UpdatePathResult",
    "create_update_path",
    "derive_path_secrets",
    "merge_update_path",
    "node_key_pair",
    "process_update_path",
]

ProvisionalContext = Callable[[bytes], bytes]
"""Maps the new root tree hash to the encoded provisional GroupContext (§12.4.1)."""

UPDATE_PATH_NODE_LABEL = b"UpdatePathNode"


@dataclass(frozen=True, slots=True)
class NodeKeyPair:
    """An HPKE key pair of a tree node; `public` is the key the public tree holds."""

    private: bytes = field(repr=False)
    public: bytes


def node_key_pair(crypto: Crypto, path_secret: bytes) -> NodeKeyPair:
    """node_secret = DeriveSecret(path_secret, "node"); KEM.DeriveKeyPair(node_secret) (§7.4)."""
    private, public = crypto.derive_key_pair(crypto.derive_secret(path_secret, b"node"))
    return NodeKeyPair(private, public)


def derive_path_secrets(crypto: Crypto, path_secret: bytes, count: int) -> list[bytes]:
    """path_secret[0..count-1] from path_secret[0]: path_secret[n] = DeriveSecret(path_secret[n-1],
    "path") (§7.4)."""
    out = [path_secret]
    for _ in range(count - 1):
        out.append(crypto.derive_secret(out[-1], b"path"))
    return out


@dataclass(slots=True)
class TreeKEMPrivateState:
    """The private keys one member holds for the ratchet tree (§4.2).

    `leaf` is the key pair of the member's own leaf; `path` maps parent node indices to the key
    pairs the member knows (nodes on its direct path). Treat as immutable: the functions of this
    module return a new state rather than change one.
    """

    leaf_index: int
    leaf: NodeKeyPair
    path: dict[int, NodeKeyPair] = field(default_factory=dict, repr=False)

    @classmethod
    def from_leaf_private(
        cls, crypto: Crypto, leaf_index: int, encryption_priv: bytes
    ) -> TreeKEMPrivateState:
        """A state holding only the leaf's key, e.g. that of a KeyPackage used to join."""
        return cls(leaf_index, NodeKeyPair(encryption_priv, crypto.hpke_public_key(encryption_priv)))

    def copy(self) -> TreeKEMPrivateState:
        return TreeKEMPrivateState(self.leaf_index, self.leaf, dict(self.path))

    def private_key(self, x: int) -> bytes | None:
        """The private key of node `x`, if this member holds it."""
        if x == 2 * self.leaf_index:
            return self.leaf.private
        pair = self.path.get(x)
        return None if pair is None else pair.private

    def with_path_secret(
        self, crypto: Crypto, tree: RatchetTree, x: int, path_secret: bytes
    ) -> TreeKEMPrivateState:
        """A copy holding the key of parent node `x` derived from `path_secret`; the tree's node
        must hold the matching public key."""
        pair = node_key_pair(crypto, path_secret)
        node = tree.node(x)
        if not x & 1 or node is None or node.encryption_key != pair.public:
            raise ValidationError(
                f"the path secret for node {x} does not give the public key the tree holds there"
            )
        new = self.copy()
        new.path[x] = pair
        return new

    def with_welcome_path_secret(
        self, crypto: Crypto, tree: RatchetTree, committer: int, path_secret: bytes
    ) -> TreeKEMPrivateState:
        """A new member's keys from the Welcome's path_secret (§12.4.3.1): it belongs to the lowest
        common ancestor of this leaf and the committer's; the keys above it follow by
        DeriveSecret(., "path") along the committer's filtered direct path. Every derived public
        key must match the tree."""
        lca = tm.common_ancestor(2 * self.leaf_index, 2 * committer)
        path = tree.filtered_direct_path(committer)
        if lca not in path:
            raise ValidationError(
                f"node {lca}, the common ancestor with committer {committer}, is not on its"
                " filtered direct path"
            )
        nodes = path[path.index(lca) :]
        new = self.copy()
        for x, secret in zip(nodes, derive_path_secrets(crypto, path_secret, len(nodes)), strict=True):
            pair = node_key_pair(crypto, secret)
            if tree.encryption_key(x) != pair.public:
                raise ValidationError(
                    f"the Welcome path secret does not give the public key of node {x}"
                )
            new.path[x] = pair
        return new

    def pruned(self, tree: RatchetTree) -> TreeKEMPrivateState:
        """A copy without the keys of nodes the tree no longer holds (blanked or replaced): §9.2
        asks to delete them as soon as they are replaced."""
        kept = {
            x: pair
            for x, pair in self.path.items()
            if x < tree.width and (node := tree.node(x)) is not None
            and node.encryption_key == pair.public
        }
        return TreeKEMPrivateState(self.leaf_index, self.leaf, kept)

    def check_consistent(self, tree: RatchetTree) -> None:
        """Every key held matches a non-blank node of the tree holding the same public key, and
        each parent key is on this member's direct path (§4.2's tree invariant)."""
        leaf = tree.leaf_node(self.leaf_index)
        if leaf is None or leaf.encryption_key != self.leaf.public:
            raise ValidationError(
                f"leaf {self.leaf_index}: the private leaf key does not match the tree"
            )
        on_path = set(tree.direct_path(2 * self.leaf_index))
        for x, pair in self.path.items():
            if x not in on_path:
                raise ValidationError(
                    f"leaf {self.leaf_index} holds a key for node {x}, not on its direct path"
                )
            node = tree.node(x)
            if node is None or node.encryption_key != pair.public:
                raise ValidationError(
                    f"leaf {self.leaf_index}: the private key for node {x} does not match the tree"
                )


@dataclass(slots=True)
class UpdatePathResult:
    """What `create_update_path` gives the committer."""

    update_path: UpdatePath
    commit_secret: bytes = field(repr=False)
    # Node index -> path secret, for the nodes a Welcome needs: a new member's Welcome carries the
    # one of its lowest common ancestor with the committer (§12.4.1). Only the common ancestors of
    # the committer and the Commit's `new_leaves` are kept; the other path secrets were consumed
    # deriving the path keys and are deleted (§9.2).
    path_secrets: dict[int, bytes] = field(repr=False)
    private_state: TreeKEMPrivateState

    def path_secret_for(self, committer: int, new_member: int) -> bytes:
        """The path secret for the Welcome of `new_member` (§12.4.1)."""
        lca = tm.common_ancestor(2 * committer, 2 * new_member)
        secret = self.path_secrets.get(lca)
        if secret is None:
            raise ValidationError(
                f"no path secret for node {lca}, the common ancestor of leaves {committer} and"
                f" {new_member}"
            )
        return secret


@dataclass(slots=True)
class ProcessedUpdatePath:
    """What `process_update_path` gives a receiver."""

    commit_secret: bytes = field(repr=False)
    private_state: TreeKEMPrivateState
    # The node whose path secret this member decrypted, and that secret (the test vectors check it).
    decrypted_node: int
    path_secret: bytes = field(repr=False)


def _encrypt(crypto: Crypto, public: bytes, context: bytes, secret: bytes) -> HPKECiphertext:
    kem_output, ciphertext = crypto.encrypt_with_label(
        public, UPDATE_PATH_NODE_LABEL, context, secret
    )
    return HPKECiphertext(kem_output, ciphertext)


def create_update_path(
    tree: RatchetTree,
    leaf_index: int,
    *,
    group_id: bytes,
    signature_priv: bytes | SignaturePrivateKey,
    provisional_context: ProvisionalContext,
    new_leaves: AbstractSet[int] = frozenset(),
    leaf_node: LeafNode | None = None,
    path_secret: bytes | None = None,
) -> UpdatePathResult:
    """The committer's side of §7.4-§7.6 and §12.4.1, on the tree with the Commit's proposals
    already applied. Changes `tree` in place: the committer's direct path is replaced by the new
    keys and its leaf by the new, signed LeafNode. The returned private state replaces the
    committer's old one entirely (every key it held was on the path just replaced).

    For an external commit (§12.4.3.2), `leaf_index` is `tree.free_leaf()` and `leaf_node` the
    joiner's LeafNode.

    - `new_leaves`: leaf indices added by this Commit; they get no encryption (§7.6), and only
      the path secrets their Welcomes need are returned.
    - `leaf_node`: the leaf content to use (new credential, capabilities, extensions, signature key);
      default the current leaf. Its encryption key, source, parent hash and signature are replaced.
    - `path_secret`: path_secret[0]; default fresh random. Only tests need to pass it.

    All-or-nothing: if anything fails (a bad signature key, an unusable public key in the tree),
    `tree` is left as it was.
    """
    with tree.atomic():
        return _create_update_path(
            tree,
            leaf_index,
            group_id=group_id,
            signature_priv=signature_priv,
            provisional_context=provisional_context,
            new_leaves=new_leaves,
            leaf_node=leaf_node,
            path_secret=path_secret,
        )


def _create_update_path(
    tree: RatchetTree,
    leaf_index: int,
    *,
    group_id: bytes,
    signature_priv: bytes | SignaturePrivateKey,
    provisional_context: ProvisionalContext,
    new_leaves: AbstractSet[int],
    leaf_node: LeafNode | None,
    path_secret: bytes | None,
) -> UpdatePathResult:
    crypto = tree.crypto
    index = leaf_index
    template = leaf_node if leaf_node is not None else tree.leaf_node(index)
    if template is None:
        raise ValidationError(f"leaf {index} is blank and no leaf node was given for the commit")

    tree.blank_direct_path(index)
    path = tree.filtered_direct_path_with_copath(index)
    # One more secret than nodes: the last is the commit_secret (§12.4.1).
    first = path_secret if path_secret is not None else crypto.random_secret()
    secrets = derive_path_secrets(crypto, first, len(path) + 1)
    pairs = [node_key_pair(crypto, s) for s in secrets[: len(path)]]
    leaf_parent_hash = tree.set_path_keys(index, path, [p.public for p in pairs])

    leaf_private, leaf_public = crypto.hpke_key_pair()
    new_leaf = resign_leaf_node(
        crypto,
        template,
        encryption_key=leaf_public,
        source=LeafNodeSource.commit,
        parent_hash=leaf_parent_hash,
        signature_priv=signature_priv,
        group_id=group_id,
        leaf_index=index,
    )
    tree.set_leaf(index, new_leaf)

    context = provisional_context(tree.tree_hash())
    nodes: list[UpdatePathNode] = []
    for (_, s), pair, secret in zip(path, pairs, secrets, strict=False):
        encrypted = [
            _encrypt(crypto, tree.encryption_key(r), context, secret)
            for r in tree.resolution(s, new_leaves)
        ]
        nodes.append(UpdatePathNode(pair.public, encrypted))

    for_welcomes = {tm.common_ancestor(2 * index, 2 * leaf) for leaf in new_leaves}
    state = TreeKEMPrivateState(
        index,
        NodeKeyPair(leaf_private, leaf_public),
        {p: pair for (p, _), pair in zip(path, pairs, strict=True)},
    )
    return UpdatePathResult(
        update_path=UpdatePath(new_leaf, nodes),
        commit_secret=secrets[-1],
        path_secrets={p: s for (p, _), s in zip(path, secrets, strict=False) if p in for_welcomes},
        private_state=state,
    )


def merge_update_path(
    tree: RatchetTree,
    sender: int,
    update_path: UpdatePath,
    new_leaves: AbstractSet[int] = frozenset(),
) -> None:
    """The public half of processing an UpdatePath (§7.5 "merges UpdatePath into the tree",
    §12.4.2), on the tree with the Commit's proposals applied; changes `tree` in place.

    Checks the leaf_node_source, the number of path nodes and of ciphertexts in each (one per
    node of the copath child's resolution without `new_leaves`, the leaves this Commit adds), that
    no new public key is already in the tree, and the leaf's parent hash. It does not check the LeafNode's signature, credential or
    capabilities: call `leaf_validation.validate_leaf_node(..., source=commit)` for that. The
    delivery service can use this alone to follow the public tree. All-or-nothing: on any error
    `tree` is left as it was.
    """
    with tree.atomic():
        _merge_update_path(tree, sender, update_path, new_leaves)


def _merge_update_path(
    tree: RatchetTree, sender: int, update_path: UpdatePath, new_leaves: AbstractSet[int]
) -> None:
    leaf = update_path.leaf_node
    where = f"UpdatePath from leaf {sender}"
    if leaf.leaf_node_source != LeafNodeSource.commit:
        raise ValidationError(
            f"{where}: leaf_node_source is {leaf.leaf_node_source.name}, must be commit"
        )
    if sender < 0 or sender >= tree.n_leaves:
        raise ValidationError(f"{where}: sender is outside the tree of {tree.n_leaves} leaves")
    path = tree.filtered_direct_path_with_copath(sender)
    if len(update_path.nodes) != len(path):
        raise ValidationError(
            f"{where}: {len(update_path.nodes)} path nodes, but the filtered direct path has"
            f" {len(path)}"
        )
    for node, (p, s) in zip(update_path.nodes, path, strict=True):
        # one ciphertext per node of the copath child's resolution, new members excluded
        # (§7.6): public, so a server following the tree rejects what every member would
        expected = len(tree.resolution(s, new_leaves))
        if len(node.encrypted_path_secret) != expected:
            raise ValidationError(
                f"{where}: node {p} has {len(node.encrypted_path_secret)} encrypted path secrets"
                f" for a resolution of {expected}"
            )
    new_keys = [leaf.encryption_key, *(n.encryption_key for n in update_path.nodes)]
    if len(set(new_keys)) != len(new_keys):
        raise ValidationError(f"{where}: the same public key appears twice")
    for key in new_keys[1:]:  # the leaf's: validate_leaf_node checks it with the leaf
        try:
            tree.crypto.check_hpke_public_key(key)
        except CryptoError as exc:
            raise ValidationError(f"{where}: unusable public key ({exc})") from None
    existing = tree.encryption_keys()
    for key in new_keys:
        if key in existing:
            raise ValidationError(f"{where}: a public key already appears in the ratchet tree")
    tree.blank_direct_path(sender)
    parent_hash = tree.set_path_keys(sender, path, [n.encryption_key for n in update_path.nodes])
    if leaf.parent_hash != parent_hash:
        raise ValidationError(
            f"{where}: the leaf's parent_hash does not match the new path (RFC 9420 §7.9.2)"
        )
    tree.set_leaf(sender, leaf)


def process_update_path(
    tree: RatchetTree,
    private: TreeKEMPrivateState,
    sender: int,
    update_path: UpdatePath,
    *,
    provisional_context: ProvisionalContext,
    new_leaves: AbstractSet[int] = frozenset(),
) -> ProcessedUpdatePath:
    """A receiver's side of §7.5 and §12.4.2, on the tree with the Commit's proposals applied:
    merges the path (see `merge_update_path`, whose checks apply), then decrypts the path secret
    meant for this member, derives the keys above it, checks they match the UpdatePath, and returns
    the commit_secret with the new private state. Changes `tree` in place.

    Errors: `ValidationError` for a malformed or inconsistent path, `CryptoError` when the
    ciphertext meant for this member does not decrypt. All-or-nothing: on any error `tree` is left
    as it was (and `private` is never changed).
    """
    with tree.atomic():
        return _process_update_path(
            tree, private, sender, update_path, provisional_context, new_leaves
        )


def _process_update_path(
    tree: RatchetTree,
    private: TreeKEMPrivateState,
    sender: int,
    update_path: UpdatePath,
    provisional_context: ProvisionalContext,
    new_leaves: AbstractSet[int],
) -> ProcessedUpdatePath:
    crypto = tree.crypto
    me = private.leaf_index
    if me == sender:
        raise ValidationError(
            "a member cannot process its own UpdatePath; keep the result of create_update_path"
        )
    if me in new_leaves:
        raise ValidationError(f"leaf {me} was added by this Commit and joins by Welcome instead")
    _merge_update_path(tree, sender, update_path, new_leaves)
    path = tree.filtered_direct_path_with_copath(sender)
    context = provisional_context(tree.tree_hash())

    # The first node of the sender's path whose copath child holds this member (§7.5).
    mine = 2 * me
    start = None
    for i, (p, s) in enumerate(path):
        resolution = tree.resolution(s, new_leaves)
        if len(update_path.nodes[i].encrypted_path_secret) != len(resolution):
            raise ValidationError(
                f"UpdatePath from leaf {sender}: node {p} has"
                f" {len(update_path.nodes[i].encrypted_path_secret)} encrypted path secrets for a"
                f" resolution of {len(resolution)}"
            )
        lo, hi = tm.subtree_range(s)
        if start is None and lo <= mine <= hi:
            start = i, resolution
    if start is None:
        raise ValidationError(
            f"leaf {me} is on no copath of the UpdatePath from leaf {sender}: nothing to decrypt"
        )
    i, resolution = start
    choice: tuple[int, NodeKeyPair] | None = None
    for j, r in enumerate(resolution):
        held = private.leaf if r == mine else private.path.get(r)
        if held is not None and tree.encryption_key(r) == held.public:
            choice = j, held
            break
    if choice is None:
        raise ValidationError(
            f"leaf {me} holds no private key for the resolution of node {path[i][1]}"
        )
    j, held = choice
    ct = update_path.nodes[i].encrypted_path_secret[j]
    try:
        secret = crypto.decrypt_with_label(
            held.private, UPDATE_PATH_NODE_LABEL, context, ct.kem_output, ct.ciphertext
        )
    except CryptoError:
        raise CryptoError(
            f"cannot decrypt the path secret for node {path[i][0]} from leaf {sender}"
        ) from None

    remaining = path[i:]
    secrets = derive_path_secrets(crypto, secret, len(remaining) + 1)
    replaced = set(tree.direct_path(2 * sender))
    new_path = {x: pair for x, pair in private.path.items() if x not in replaced}
    for k, ((p, _), s) in enumerate(zip(remaining, secrets, strict=False)):
        pair = node_key_pair(crypto, s)
        if pair.public != update_path.nodes[i + k].encryption_key:
            raise ValidationError(
                f"UpdatePath from leaf {sender}: the public key of node {p} does not match its"
                " path secret"
            )
        new_path[p] = pair
    state = TreeKEMPrivateState(me, private.leaf, new_path).pruned(tree)
    return ProcessedUpdatePath(
        commit_secret=secrets[-1],
        private_state=state,
        decrypted_node=path[i][0],
        path_secret=secret,
    )
