"""TreeKEM (RFC 9420 §7.4-§7.6) against treekem.json, and whole-group scenarios built from scratch
(add with Welcome path secrets, update, remove) in which every member must agree."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mls import tree_math as tm
from mls.commit import HPKECiphertext, UpdatePath
from mls.credential import Credential
from mls.crypto import Crypto, get_crypto
from mls.errors import CryptoError, ValidationError
from mls.group_context import GroupContext
from mls.key_package import Capabilities, LeafNode, LeafNodeSource, Lifetime
from mls.leaf_validation import sign_leaf_node, validate_leaf_node, validate_ratchet_tree
from mls.ratchet_tree import RatchetTree
from mls.treekem import (
    TreeKEMPrivateState,
    create_update_path,
    merge_update_path,
    process_update_path,
)
from tests.vectors import vector_cases


def _context(case: dict[str, Any]) -> Any:
    group_id = bytes.fromhex(case["group_id"])
    cth = bytes.fromhex(case["confirmed_transcript_hash"])

    def provisional(tree_hash: bytes) -> bytes:
        return GroupContext(case["cipher_suite"], group_id, case["epoch"], tree_hash, cth).encode()

    return provisional


@pytest.mark.parametrize("case", vector_cases("mls/treekem.json"))
def test_treekem_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    tree = RatchetTree.decode(crypto, bytes.fromhex(case["ratchet_tree"]))
    group_id = bytes.fromhex(case["group_id"])
    provisional = _context(case)

    states: dict[int, TreeKEMPrivateState] = {}
    signature_privs: dict[int, bytes] = {}
    for entry in case["leaves_private"]:
        state = TreeKEMPrivateState.from_leaf_private(
            crypto, entry["index"], bytes.fromhex(entry["encryption_priv"])
        )
        for ps in entry["path_secrets"]:
            state = state.with_path_secret(crypto, tree, ps["node"], bytes.fromhex(ps["path_secret"]))
        state.check_consistent(tree)
        states[entry["index"]] = state
        signature_privs[entry["index"]] = bytes.fromhex(entry["signature_priv"])
    assert sorted(states) == [i for i, _ in tree.members()]

    for up in case["update_paths"]:
        sender = up["sender"]
        path = UpdatePath.decode(bytes.fromhex(up["update_path"]))
        validate_leaf_node(
            crypto, path.leaf_node, source=LeafNodeSource.commit, group_id=group_id,
            leaf_index=sender,
        )
        merged = tree.copy()
        merge_update_path(merged, sender, path)  # parent-hash valid relative to the tree
        assert merged.tree_hash().hex() == up["tree_hash_after"]
        for j, state in states.items():
            if j == sender:
                continue
            receiver_tree = tree.copy()
            result = process_update_path(
                receiver_tree, state, sender, path, provisional_context=provisional
            )
            assert result.path_secret.hex() == up["path_secrets"][j]
            assert result.decrypted_node == tm.common_ancestor(2 * sender, 2 * j)
            assert result.commit_secret.hex() == up["commit_secret"]
            assert receiver_tree.tree_hash().hex() == up["tree_hash_after"]
            result.private_state.check_consistent(receiver_tree)

        # A fresh UpdatePath from the same sender: every other member reaches its commit secret.
        sender_tree = tree.copy()
        created = create_update_path(
            sender_tree, sender, group_id=group_id,
            signature_priv=signature_privs[sender], provisional_context=provisional,
        )
        created.private_state.check_consistent(sender_tree)
        sender_tree.verify_parent_hashes()
        for j, state in states.items():
            if j == sender:
                continue
            receiver_tree = tree.copy()
            result = process_update_path(
                receiver_tree, state, sender, created.update_path, provisional_context=provisional
            )
            assert result.commit_secret == created.commit_secret
            assert receiver_tree == sender_tree
            assert receiver_tree.tree_hash() == sender_tree.tree_hash()


# --- scenarios built from scratch ------------------------------------------------------------------

GROUP_ID = b"test group"


def make_leaf(crypto: Crypto, identity: bytes) -> tuple[bytes, LeafNode]:
    """A signed key_package-source LeafNode; returns (signature private key, leaf)."""
    signature_priv, signature_pub = crypto.signature_key_pair()
    _, encryption_pub = crypto.hpke_key_pair()
    leaf = LeafNode(
        encryption_key=encryption_pub,
        signature_key=signature_pub,
        credential=Credential.basic(identity),
        capabilities=Capabilities(cipher_suites=[crypto.suite], credentials=[1]),
        leaf_node_source=LeafNodeSource.key_package,
        lifetime=Lifetime(0, 2**63),
    )
    return signature_priv, sign_leaf_node(crypto, leaf, signature_priv)


def _leaf_with_private(crypto: Crypto, identity: bytes) -> tuple[bytes, bytes, LeafNode]:
    signature_priv, leaf = make_leaf(crypto, identity)
    encryption_priv, encryption_pub = crypto.hpke_key_pair()
    leaf = sign_leaf_node(crypto, replace(leaf, encryption_key=encryption_pub), signature_priv)
    return signature_priv, encryption_priv, leaf


class Group:
    """A minimal stand-in for the Group state machine: one shared view per member."""

    def __init__(self, crypto: Crypto) -> None:
        self.crypto = crypto
        self.epoch = 0
        sig, enc, leaf = _leaf_with_private(crypto, b"member-0")
        self.trees: dict[int, RatchetTree] = {0: RatchetTree(crypto, [leaf])}
        self.states = {0: TreeKEMPrivateState.from_leaf_private(crypto, 0, enc)}
        self.sigs = {0: sig}

    def context(self, tree_hash: bytes) -> bytes:
        return GroupContext(self.crypto.suite, GROUP_ID, self.epoch + 1, tree_hash, b"").encode()

    def commit(
        self,
        committer: int,
        adds: int = 0,
        removes: tuple[int, ...] = (),
    ) -> bytes:
        """Applies removes and adds, then an UpdatePath from `committer`, at every member."""
        crypto = self.crypto
        new_members = [_leaf_with_private(crypto, b"member-%d" % i) for i in range(adds)]
        pending: dict[int, RatchetTree] = {}
        added: list[int] = []
        for m, tree in self.trees.items():
            t = tree.copy()
            for r in removes:
                t.remove_leaf(r)
            added = [t.add_leaf(leaf) for _, _, leaf in new_members]
            pending[m] = t
        new_leaves = frozenset(added)
        result = create_update_path(
            pending[committer], committer, group_id=GROUP_ID,
            signature_priv=self.sigs[committer], provisional_context=self.context,
            new_leaves=new_leaves,
        )
        secrets = {committer: result.commit_secret}
        states = {committer: result.private_state}
        for m in self.trees:
            if m in (committer, *removes):
                continue
            out = process_update_path(
                pending[m], self.states[m], committer, result.update_path,
                provisional_context=self.context, new_leaves=new_leaves,
            )
            secrets[m], states[m] = out.commit_secret, out.private_state
        for r in removes:
            pending.pop(r)
            self.sigs.pop(r)
        reference = pending[committer]
        for index, (sig, enc, _) in zip(added, new_members, strict=True):
            # The Welcome: a copy of the tree and the path secret of the common ancestor.
            tree = reference.copy()
            state = TreeKEMPrivateState.from_leaf_private(crypto, index, enc)
            states[index] = state.with_welcome_path_secret(
                crypto, tree, committer, result.path_secret_for(committer, index)
            )
            pending[index] = tree
            self.sigs[index] = sig
        assert len(set(secrets.values())) == 1
        for m, tree in pending.items():
            assert tree == reference and tree.tree_hash() == reference.tree_hash()
            states[m].check_consistent(tree)
        self.trees, self.states = pending, states
        self.epoch += 1
        return result.commit_secret


@pytest.mark.parametrize("suite", [1, 2, 7])
def test_group_grows_updates_and_shrinks(suite: int) -> None:
    group = Group(get_crypto(suite))
    for committer, adds in ((0, 1), (1, 2), (0, 3), (4, 2)):
        group.commit(committer, adds=adds)
    assert group.trees[0].member_count == 9 and group.trees[0].n_leaves == 16
    # Every parent set by these commits is parent-hash valid and every leaf verifies.
    validate_ratchet_tree(group.trees[0], group_id=GROUP_ID)
    secrets = {group.commit(m) for m in (3, 8, 5)}  # plain updates: fresh secrets each time
    assert len(secrets) == 3
    group.commit(2, removes=(8, 7))
    assert group.trees[2].n_leaves == 8 and group.trees[2].member_count == 7
    group.commit(6, adds=1, removes=(1,))  # the new member takes the blank leaf 1
    assert group.trees[6].leaf_node(1) is not None
    validate_ratchet_tree(group.trees[1], group_id=GROUP_ID)


def test_new_members_excluded_from_encryption() -> None:
    group = Group(get_crypto(1))
    group.commit(0, adds=3)
    _, leaf = make_leaf(group.crypto, b"late")
    excluded_tree = group.trees[0].copy()
    index = excluded_tree.add_leaf(leaf)
    excluded = create_update_path(
        excluded_tree, 0, group_id=GROUP_ID, signature_priv=group.sigs[0],
        provisional_context=group.context, new_leaves={index},
    )
    included_tree = group.trees[0].copy()
    included_tree.add_leaf(leaf)
    included = create_update_path(
        included_tree, 0, group_id=GROUP_ID, signature_priv=group.sigs[0],
        provisional_context=group.context,
    )
    counts = [len(n.encrypted_path_secret) for n in excluded.update_path.nodes]
    counts_with_new = [len(n.encrypted_path_secret) for n in included.update_path.nodes]
    # Leaf 4 sits under the root's right child, which holds only it: no ciphertext there.
    assert index == 4 and counts == [1, 2, 0] and counts_with_new == [1, 2, 1]


def test_single_member_update_path_is_empty() -> None:
    group = Group(get_crypto(1))
    tree = group.trees[0].copy()
    result = create_update_path(
        tree, 0, group_id=GROUP_ID, signature_priv=group.sigs[0],
        provisional_context=group.context,
    )
    assert result.update_path.nodes == [] and result.update_path.leaf_node.parent_hash == b""
    assert len(result.commit_secret) == 32
    validate_ratchet_tree(tree, group_id=GROUP_ID)


# --- tampered UpdatePaths -------------------------------------------------------------------------


@pytest.fixture
def four() -> tuple[Group, Any]:
    """A group of four after some commits, and a fresh UpdatePath from member 1."""
    group = Group(get_crypto(1))
    group.commit(0, adds=3)
    group.commit(2)
    tree = group.trees[1].copy()
    result = create_update_path(
        tree, 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
        provisional_context=group.context,
    )
    return group, result


def _process(group: Group, member: int, path: UpdatePath) -> Any:
    return process_update_path(
        group.trees[member].copy(), group.states[member], 1, path,
        provisional_context=group.context,
    )


def test_process_leaves_original_tree_untouched(four: tuple[Group, Any]) -> None:
    group, result = four
    before = group.trees[3].encode()
    hash_before = group.trees[3].tree_hash()
    _process(group, 3, result.update_path)
    assert group.trees[3].encode() == before and group.trees[3].tree_hash() == hash_before


def test_tampered_ciphertext_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    node = path.nodes[-1]
    ct = node.encrypted_path_secret[0]
    bad_ct = HPKECiphertext(ct.kem_output, bytes([ct.ciphertext[0] ^ 1]) + ct.ciphertext[1:])
    bad = replace(path, nodes=[*path.nodes[:-1], replace(node, encrypted_path_secret=[bad_ct])])
    with pytest.raises(CryptoError, match="cannot decrypt the path secret"):
        _process(group, 2, bad)


def test_wrong_context_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    with pytest.raises(CryptoError):
        process_update_path(
            group.trees[3].copy(), group.states[3], 1, result.update_path,
            provisional_context=lambda th: b"other context" + th,
        )


def test_public_key_not_matching_secret_refused(four: tuple[Group, Any]) -> None:
    """Well-formed ciphertexts of a secret that does not give the announced public keys."""
    group, _ = four
    crypto = group.crypto
    tree = group.trees[1].copy()
    result = create_update_path(
        tree, 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
        provisional_context=group.context,
    )
    context = group.context(tree.tree_hash())
    wrong = crypto.random_secret()
    nodes = []
    for node, (_, s) in zip(
        result.update_path.nodes, tree.filtered_direct_path_with_copath(1), strict=True
    ):
        cts = [
            HPKECiphertext(*crypto.encrypt_with_label(
                tree.encryption_key(r), b"UpdatePathNode", context, wrong
            ))
            for r in tree.resolution(s)
        ]
        nodes.append(replace(node, encrypted_path_secret=cts))
    with pytest.raises(ValidationError, match="does not match its path secret"):
        _process(group, 0, replace(result.update_path, nodes=nodes))


def test_wrong_parent_hash_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    leaf = replace(path.leaf_node, parent_hash=bytes(32))
    with pytest.raises(ValidationError, match="parent_hash does not match"):
        _process(group, 0, replace(path, leaf_node=leaf))


def test_wrong_path_length_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    with pytest.raises(ValidationError, match="filtered direct path has"):
        _process(group, 0, replace(path, nodes=path.nodes[:-1]))


def test_reused_public_key_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    existing = group.trees[0].leaf_node(3)
    assert existing is not None
    nodes = [replace(path.nodes[0], encryption_key=existing.encryption_key), *path.nodes[1:]]
    with pytest.raises(ValidationError, match="already appears in the ratchet tree"):
        _process(group, 0, replace(path, nodes=nodes))


def test_wrong_ciphertext_count_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    node = path.nodes[-1]
    extra = replace(node, encrypted_path_secret=[*node.encrypted_path_secret, HPKECiphertext(b"", b"")])
    with pytest.raises(ValidationError, match="encrypted path secrets for a resolution"):
        _process(group, 0, replace(path, nodes=[*path.nodes[:-1], extra]))


def test_non_commit_leaf_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    path: UpdatePath = result.update_path
    leaf = replace(path.leaf_node, leaf_node_source=LeafNodeSource.update, parent_hash=None)
    with pytest.raises(ValidationError, match="must be commit"):
        _process(group, 0, replace(path, leaf_node=leaf))


def test_own_path_refused(four: tuple[Group, Any]) -> None:
    group, result = four
    with pytest.raises(ValidationError, match="its own UpdatePath"):
        process_update_path(
            group.trees[1].copy(), group.states[1], 1, result.update_path,
            provisional_context=group.context,
        )


def test_secrets_not_in_repr(four: tuple[Group, Any]) -> None:
    group, result = four
    text = repr(result) + repr(group.states[0]) + repr(result.private_state)
    assert result.commit_secret.hex() not in text and repr(result.commit_secret) not in text
    assert repr(result.private_state.leaf.private) not in text
    for pair in result.private_state.path.values():
        assert repr(pair.private) not in text


# --- private state --------------------------------------------------------------------------------


def test_welcome_path_secret_must_match_tree(four: tuple[Group, Any]) -> None:
    group, _ = four
    crypto = group.crypto
    state = TreeKEMPrivateState(3, group.states[3].leaf)
    with pytest.raises(ValidationError, match="Welcome path secret does not give"):
        state.with_welcome_path_secret(crypto, group.trees[3], 2, crypto.random_secret())
    with pytest.raises(ValidationError, match="does not give the public key"):
        state.with_path_secret(crypto, group.trees[3], 3, crypto.random_secret())


def test_check_consistent_detects_foreign_keys(four: tuple[Group, Any]) -> None:
    group, _ = four
    tree = group.trees[0]
    group.states[0].check_consistent(tree)
    with pytest.raises(ValidationError, match="private leaf key does not match"):
        TreeKEMPrivateState(0, group.states[1].leaf).check_consistent(tree)
    other = group.states[3].path
    foreign = TreeKEMPrivateState(0, group.states[0].leaf, dict(other))
    with pytest.raises(ValidationError, match="not on its direct path"):
        foreign.check_consistent(tree)


def test_pruned_drops_keys_of_blanked_nodes(four: tuple[Group, Any]) -> None:
    group, _ = four
    tree = group.trees[0].copy()
    state = group.states[0]
    assert state.path  # member 0 holds keys on its direct path
    tree.remove_leaf(1)  # blanks leaf 1's direct path, which is member 0's too
    pruned = state.pruned(tree)
    assert pruned.path == {} and pruned.leaf == state.leaf
    pruned.check_consistent(tree)


def test_external_join_path() -> None:
    """An external joiner (§12.4.3.2) takes the leftmost free leaf and commits with a path."""
    group = Group(get_crypto(1))
    group.commit(0, adds=4)
    group.commit(3, removes=(1,))
    joiner_sig, joiner_leaf = make_leaf(group.crypto, b"external")
    joiner_tree = group.trees[0].copy()
    index = joiner_tree.free_leaf()
    assert index == 1 and joiner_tree.leaf_node(index) is None
    result = create_update_path(
        joiner_tree, index, group_id=GROUP_ID, signature_priv=joiner_sig,
        provisional_context=group.context, leaf_node=joiner_leaf,
    )
    assert result.update_path.leaf_node.leaf_node_source == LeafNodeSource.commit
    result.private_state.check_consistent(joiner_tree)
    for m in group.trees:
        tree = group.trees[m].copy()
        assert tree.free_leaf() == index
        out = process_update_path(
            tree, group.states[m], index, result.update_path, provisional_context=group.context
        )
        assert out.commit_secret == result.commit_secret and tree == joiner_tree
    validate_ratchet_tree(joiner_tree, group_id=GROUP_ID)


def test_given_path_secret_is_deterministic(four: tuple[Group, Any]) -> None:
    group, _ = four
    secret = group.crypto.random_secret()
    results = [
        create_update_path(
            group.trees[1].copy(), 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
            provisional_context=group.context, path_secret=secret,
        )
        for _ in range(2)
    ]
    keys = [[n.encryption_key for n in r.update_path.nodes] for r in results]
    assert keys[0] == keys[1] and results[0].commit_secret == results[1].commit_secret
    # The leaf key is fresh each time, so the leaves (and their ciphertexts' contexts) differ.
    assert results[0].update_path.leaf_node != results[1].update_path.leaf_node


# Random histories: whatever the sequence of adds, removes and path updates, all members agree on
# the tree and the commit secret (checked inside Group.commit) and the tree stays valid.
_commits = st.lists(
    st.tuples(st.integers(0, 63), st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=8
)


@settings(max_examples=30, deadline=None)
@given(_commits)
def test_random_histories_stay_consistent(history: list[tuple[int, int, int]]) -> None:
    group = Group(get_crypto(1))
    for pick, adds, n_removes in history:
        members = sorted(group.trees)
        committer = members[pick % len(members)]
        others = [m for m in members if m != committer]
        removes = tuple(others[(pick + k) % len(others)] for k in range(min(n_removes, len(others))))
        group.commit(committer, adds=adds, removes=tuple(sorted(set(removes))))
    some = next(iter(group.trees.values()))
    validate_ratchet_tree(some, group_id=GROUP_ID)


# --- all-or-nothing: a refused UpdatePath leaves the tree it was applied to unchanged ------------


def _refused_path(path: UpdatePath, stage: str) -> UpdatePath:
    """An UpdatePath refused only after the receiver's tree was already changed."""
    if stage == "parent hash":  # detected once the new path keys are in the tree
        return replace(path, leaf_node=replace(path.leaf_node, parent_hash=bytes(32)))
    node = path.nodes[-1]  # "ciphertext": detected once the whole path is merged
    ct = node.encrypted_path_secret[0]
    bad_ct = HPKECiphertext(ct.kem_output, bytes([ct.ciphertext[0] ^ 1]) + ct.ciphertext[1:])
    return replace(path, nodes=[*path.nodes[:-1], replace(node, encrypted_path_secret=[bad_ct])])


@pytest.mark.parametrize(
    ("stage", "error"), [("parent hash", ValidationError), ("ciphertext", CryptoError)]
)
def test_refused_path_leaves_tree_unchanged(
    four: tuple[Group, Any], stage: str, error: type[Exception]
) -> None:
    group, result = four
    bad = _refused_path(result.update_path, stage)
    tree = group.trees[2].copy()
    before, hash_before = tree.encode(), tree.tree_hash()
    with pytest.raises(error):
        process_update_path(tree, group.states[2], 1, bad, provisional_context=group.context)
    assert tree.encode() == before and tree.tree_hash() == hash_before
    if stage == "parent hash":
        merged = group.trees[2].copy()
        with pytest.raises(ValidationError):
            merge_update_path(merged, 1, bad)
        assert merged.encode() == before and merged.tree_hash() == hash_before
    # The same tree still processes the genuine path afterwards.
    out = process_update_path(
        tree, group.states[2], 1, result.update_path, provisional_context=group.context
    )
    assert out.commit_secret == result.commit_secret


def test_failed_create_update_path_leaves_tree_unchanged(four: tuple[Group, Any]) -> None:
    group, _ = four
    tree = group.trees[1].copy()
    before, hash_before = tree.encode(), tree.tree_hash()

    def failing_context(tree_hash: bytes) -> bytes:
        raise ValidationError("no provisional context")

    with pytest.raises(ValidationError, match="no provisional context"):
        create_update_path(
            tree, 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
            provisional_context=failing_context,
        )
    assert tree.encode() == before and tree.tree_hash() == hash_before
    with pytest.raises(CryptoError):
        create_update_path(
            tree, 1, group_id=GROUP_ID, signature_priv=b"not a key",
            provisional_context=group.context,
        )
    assert tree.encode() == before and tree.tree_hash() == hash_before


def test_committer_keeps_only_the_path_secrets_welcomes_need() -> None:
    """§9.2: each path secret is consumed once the next one and its node key are derived; only
    those a new member's Welcome carries (its common ancestor with the committer) are kept."""
    group = Group(get_crypto(1))
    group.commit(0, adds=4)  # leaves 0..4, tree of 8 leaves
    tree = group.trees[1].copy()
    added = [tree.add_leaf(make_leaf(group.crypto, b"new%d" % i)[1]) for i in range(2)]
    assert added == [5, 6]
    result = create_update_path(
        tree, 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
        provisional_context=group.context, new_leaves=set(added),
    )
    assert set(result.path_secrets) == {7} == {tm.common_ancestor(2, 2 * a) for a in added}
    assert result.path_secret_for(1, 5) == result.path_secret_for(1, 6)
    # The Welcome's secret leads every new member to the committer's keys above it.
    state = TreeKEMPrivateState.from_leaf_private(group.crypto, 5, group.crypto.hpke_key_pair()[0])
    welcomed = state.with_welcome_path_secret(
        group.crypto, tree, 1, result.path_secret_for(1, 5)
    )
    assert welcomed.path[7] == result.private_state.path[7]
    no_adds = create_update_path(
        group.trees[1].copy(), 1, group_id=GROUP_ID, signature_priv=group.sigs[1],
        provisional_context=group.context,
    )
    assert no_adds.path_secrets == {}
    with pytest.raises(ValidationError, match="no path secret for node 1, the common ancestor of leaves 1 and 0"):
        result.path_secret_for(1, 0)
