"""MUSTs of RFC 9420 found unenforced in a rule-by-rule review of the validation code: each is fed
a message that breaks it (or, for §12.1.7, a valid one the library used to refuse).

As in test_group_validation.py, forged Commits are signed and membership-tagged by a member, so
that the rule's own check (which runs before the confirmation tag is checked) must reject them;
a `PublicGroup`, which cannot check confirmation tags, shows that nothing else would.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from mls.client import Client, default_capabilities
from mls.commit import UpdatePath
from mls.errors import ValidationError
from mls.extensions import Extension, RequiredCapabilities
from mls.framing import MLSMessage
from mls.group import Group
from mls.key_package import Capabilities
from mls.leaf_validation import sign_leaf_node
from mls.proposals import GroupContextExtensions, Proposal, ReInit, Remove
from mls.public_group import PublicGroup
from mls.ratchet_tree import RatchetTree
from mls.tree_nodes import ParentNode, decode_ratchet_tree, encode_ratchet_tree

from .test_group import same_epoch
from .test_group_validation import (
    _forge_external,
    add,
    by_value,
    forge_commit,
    key_package,
    real_commit,
    rejects,
)

CUSTOM_EXTENSION = 0x0F00  # a non-default extension type (not GREASE)


class ExtensionClient(Client):
    """A client whose capabilities list CUSTOM_EXTENSION."""

    def capabilities(self) -> Capabilities:
        return replace(default_capabilities(self.cipher_suite), extensions=[CUSTOM_EXTENSION])


def public_rejects(pub: PublicGroup, message: bytes, match: str) -> None:
    before = pub.to_bytes()
    with pytest.raises(ValidationError, match=match):
        pub.process(message)
    assert pub.to_bytes() == before


# --- §12.4.3.3: a ratchet_tree array that ends in a parent node ----------------------------------


def test_ratchet_tree_ending_in_a_parent_node_is_extended_to_a_full_tree() -> None:
    """§12.4.3.3: the receiver extends the array to 2^(d+1) - 1 nodes; an even-length array
    (last node a parent) was cut to a smaller tree, which then failed with IndexError."""
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, ratchet_tree_extension=False)
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    nodes = decode_ratchet_tree(ga.ratchet_tree())
    assert len(nodes) == 3
    parent = ParentNode(b"\x01" * 32)
    # [leaf, parent] is a 2-leaf tree, [leaf, _, leaf, parent] a 4-leaf one.
    assert RatchetTree(ga.crypto, [nodes[0], parent]).n_leaves == 2
    assert RatchetTree(ga.crypto, [*nodes, parent]).n_leaves == 4
    assert RatchetTree(ga.crypto, [*nodes, None, None, None, None, parent]).n_leaves == 8
    # An untrusted source (the tree comes out of band) appends a parent node: a clear refusal.
    bad = encode_ratchet_tree([*nodes, parent])
    refs = bob.key_package_refs()
    with pytest.raises(ValidationError, match="tree hash"):
        Group.join(bob, welcome, bad)
    assert bob.key_package_refs() == refs
    Group.join(bob, welcome, ga.ratchet_tree())


# --- §12.2 external Commits: a Remove makes the path's LeafNode an Update of that leaf ------------


def test_external_resync_reusing_the_removed_leafs_encryption_key_rejected() -> None:
    """§12.2: the LeafNode of a resync's path MUST meet the criteria of an Update of the removed
    leaf (§12.1.2, §7.3): its encryption_key differs from the removed leaf's."""
    ga, gb = make_pair()
    carol = Client(b"carol")
    gc, message = Group.join_external(carol, ga.group_info())
    for g in (ga, gb):
        g.process(message)
    pub = PublicGroup.from_group_info(ga.group_info())
    old = ga.tree.leaf_node(gc.leaf_index)
    assert old is not None
    _, resync = Group.join_external(carol, ga.group_info(), remove_leaf=gc.leaf_index)
    commit = MLSMessage.decode(resync).public_message.content.commit
    assert commit is not None and commit.path is not None
    leaf = replace(commit.path.leaf_node, encryption_key=old.encryption_key)
    leaf = sign_leaf_node(carol.crypto, leaf, carol.signature_priv, ga.group_id, gc.leaf_index)
    forged = _forge_external(carol, ga, commit.proposals, UpdatePath(leaf, commit.path.nodes))
    rejects(ga, forged, ValidationError, "reuses the encryption_key of leaf 2")
    public_rejects(pub, forged, "reuses the encryption_key of leaf 2")
    # The real resync (a fresh key) is accepted.
    pub.process(resync)
    ga.process(resync)


def make_pair() -> tuple[Group, Group]:
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice)
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    return ga, Group.join(bob, welcome)


# --- §13.4: every GroupContext extension is supported by every member ------------------------------


def extension_group(n: int) -> list[Group]:
    """A group of `n` ExtensionClients whose GroupContext carries CUSTOM_EXTENSION."""
    clients = [ExtensionClient(f"member-{i}".encode()) for i in range(n)]
    ga = Group.create(clients[0], extensions=[Extension(CUSTOM_EXTENSION, b"on")])
    if n == 1:
        return [ga]
    result = ga.add([c.key_package() for c in clients[1:]])
    ga.merge_pending_commit()
    assert result.welcome is not None
    return [ga, *(Group.join(c, result.welcome) for c in clients[1:])]


def test_add_of_a_client_not_supporting_a_group_context_extension_rejected() -> None:
    """§13.4: "The capabilities field MUST indicate support for each extension in the
    GroupContext" of a member being added: by the committer and by every receiver."""
    ga, gb = extension_group(2)
    pub = PublicGroup.from_group_info(ga.group_info())
    plain = Client(b"plain")
    with pytest.raises(ValidationError, match=f"GroupContext extension type {CUSTOM_EXTENSION}"):
        ga.add([plain.key_package()])
    assert not ga.has_pending_commit
    forged = forge_commit(ga, [add(key_package(plain))])
    rejects(gb, forged, ValidationError, f"GroupContext extension type {CUSTOM_EXTENSION}")
    public_rejects(pub, forged, f"GroupContext extension type {CUSTOM_EXTENSION}")


def test_join_by_a_client_not_supporting_a_group_context_extension_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§13.4: "A client joining a group MUST verify that it supports every extension in the
    GroupContext" (here: a committer that skipped its own check sends the Welcome)."""
    (ga,) = extension_group(1)
    plain = Client(b"plain")
    with monkeypatch.context() as m:
        m.setattr("mls.proposal_validation.check_group_extensions_supported", lambda *a: None)
        welcome = ga.add([plain.key_package()]).welcome
    assert welcome is not None
    refs = plain.key_package_refs()
    with pytest.raises(ValidationError, match=f"GroupContext extension type {CUSTOM_EXTENSION}"):
        Group.join(plain, welcome)
    assert plain.key_package_refs() == refs
    # By external Commit too: the joiner refuses, and so would the members.
    ga.discard_pending_commit()
    with pytest.raises(ValidationError, match=f"GroupContext extension type {CUSTOM_EXTENSION}"):
        Group.join_external(plain, ga.group_info())
    # And a creator cannot put in its GroupContext an extension it does not support.
    with pytest.raises(ValidationError, match=f"GroupContext extension type {CUSTOM_EXTENSION}"):
        Group.create(plain, extensions=[Extension(CUSTOM_EXTENSION, b"on")])


# --- §12.1.7: required capabilities of all members, "excluding those removed" ---------------------


def test_group_context_extensions_with_a_remove_of_the_member_lacking_support_accepted() -> None:
    """§12.1.7: a GroupContextExtensions proposal is invalid if members lack the required
    capabilities "(including those added in the same Commit, and excluding those removed)": the
    member the same Commit removes does not count."""
    ea, eb = (ExtensionClient(n) for n in (b"a", b"b"))
    ga = Group.create(ea)
    result = ga.add([eb.key_package(), Client(b"plain").key_package()])
    ga.merge_pending_commit()
    assert result.welcome is not None
    gb = Group.join(eb, result.welcome)
    required = RequiredCapabilities(extension_types=[CUSTOM_EXTENSION]).to_extension()
    new_extensions = [required, Extension(CUSTOM_EXTENSION, b"on")]
    commit = ga.commit([Proposal(Remove(2)), Proposal(GroupContextExtensions(new_extensions))])
    ga.merge_pending_commit()
    gb.process(commit.commit)
    same_epoch(ga, gb)
    assert ga.group_context.extensions == new_extensions
    # Without the Remove the same proposal is still refused.
    ga2 = _plain_member_group()[0]
    with pytest.raises(ValidationError, match="leaf 2"):
        ga2.commit([Proposal(GroupContextExtensions([required]))])


def _plain_member_group() -> list[Group]:
    ea, eb = (ExtensionClient(n) for n in (b"a", b"b"))
    plain = Client(b"plain")
    ga = Group.create(ea)
    result = ga.add([eb.key_package(), plain.key_package()])
    ga.merge_pending_commit()
    assert result.welcome is not None
    return [ga, Group.join(eb, result.welcome), Group.join(plain, result.welcome)]


# --- §12.2 / §7.3: the committer's new leaf against the new GroupContext --------------------------


def test_path_leaf_lacking_a_capability_the_commit_requires_rejected() -> None:
    """§12.2: the list is invalid if "after processing the Commit the ratchet tree ... contains
    any leaf node that is invalid according to Section 7.3"; the committer's UpdatePath leaf is
    checked against the new GroupContext's required_capabilities, not the old one's."""
    ga, gb = _extension_members(2)
    pub = PublicGroup.from_group_info(ga.group_info())
    required = RequiredCapabilities(extension_types=[CUSTOM_EXTENSION]).to_extension()
    gce = Proposal(GroupContextExtensions([required]))
    commit, _ = real_commit(ga, lambda: ga.commit([gce]))
    assert commit.path is not None
    caps = replace(commit.path.leaf_node.capabilities, extensions=[])
    leaf = sign_leaf_node(
        ga.crypto, replace(commit.path.leaf_node, capabilities=caps), ga._client.signature_priv,
        ga.group_id, ga.leaf_index,
    )
    forged = forge_commit(ga, [by_value(gce)], UpdatePath(leaf, commit.path.nodes))
    rejects(gb, forged, ValidationError, f"required extension type {CUSTOM_EXTENSION}")
    public_rejects(pub, forged, f"required extension type {CUSTOM_EXTENSION}")


def _extension_members(n: int) -> list[Group]:
    """A group of `n` ExtensionClients with no GroupContext extensions yet."""
    clients = [ExtensionClient(f"member-{i}".encode()) for i in range(n)]
    ga = Group.create(clients[0])
    result = ga.add([c.key_package() for c in clients[1:]])
    ga.merge_pending_commit()
    assert result.welcome is not None
    return [ga, *(Group.join(c, result.welcome) for c in clients[1:])]



# --- §13.4: no list of extensions holds two of one type --------------------------------------------


def test_reinit_with_repeated_extension_type_rejected() -> None:
    """§13.4: "Any field containing a list of extensions MUST NOT have more than one extension
    of any given type": ReInit.extensions too."""
    ga, gb = make_pair()
    pub = PublicGroup.from_group_info(ga.group_info())
    twice = [Extension(CUSTOM_EXTENSION, b"a"), Extension(CUSTOM_EXTENSION, b"b")]
    forged = forge_commit(ga, [by_value(Proposal(ReInit(b"new", 1, 1, twice)))])
    rejects(gb, forged, ValidationError, "ReInit: extension type 3840 appears more than once")
    public_rejects(pub, forged, "ReInit: extension type 3840 appears more than once")


def test_group_info_with_repeated_group_context_extension_type_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§13.4, on the GroupContext a joiner receives (by Welcome or for an external Commit)."""
    twice = [Extension(CUSTOM_EXTENSION, b"a"), Extension(CUSTOM_EXTENSION, b"b")]
    with monkeypatch.context() as m:
        m.setattr("mls.group.check_unique_extension_types", lambda *a: None)
        ga = Group.create(ExtensionClient(b"a"), extensions=twice)
    joiner = ExtensionClient(b"b")
    welcome = ga.add([joiner.key_package()]).welcome
    assert welcome is not None
    match = "GroupContext.extensions: extension type 3840 appears more than once"
    with pytest.raises(ValidationError, match=match):
        Group.join(joiner, welcome)
    ga.discard_pending_commit()
    with pytest.raises(ValidationError, match=match):
        Group.join_external(ExtensionClient(b"c"), ga.group_info())
    with pytest.raises(ValidationError, match=match):
        PublicGroup.from_group_info(ga.group_info())
