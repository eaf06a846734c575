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
from mls.credential import Credential
from mls.errors import ValidationError
from mls.extensions import (
    Extension,
    ExternalSender,
    RequiredCapabilities,
    external_senders_extension,
)
from mls.framing import MLSMessage
from mls.group import Group
from mls.key_package import Capabilities, LeafNodeSource, Lifetime
from mls.leaf_validation import resign_leaf_node, sign_leaf_node
from mls.proposals import Add, GroupContextExtensions, Proposal, ReInit, Remove, Update
from mls.public_group import PublicGroup
from mls.ratchet_tree import RatchetTree
from mls.tree_nodes import ParentNode, decode_ratchet_tree, encode_ratchet_tree

from .test_group import make_group, same_epoch
from .test_group_validation import (
    _forge_external,
    add,
    by_value,
    forge_commit,
    key_package,
    kp_with_leaf,
    real_commit,
    rejects,
    resign_kp,
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


# --- §12.4.2: after a ReInit Commit the group takes no more messages -------------------------------


def test_no_message_is_accepted_after_a_reinit_commit() -> None:
    """§12.4.2: "If the Commit included a ReInit proposal, the client MUST NOT use the group to
    send messages anymore. Instead, it MUST wait for a Welcome". A member that ignores it
    cannot revive the old group at the others, nor at a delivery service (after a restart
    too), and they can still follow the ReInit to the new group."""
    ga, gb, gc = make_group(3)
    pub = PublicGroup.from_group_info(ga.group_info())
    result = ga.reinit(group_id=b"next")
    ga.merge_pending_commit()
    for g in (gb, gc):
        g.process(result.commit)
    pub.process(result.commit)
    reinit = gb.pending_reinit
    assert reinit is not None
    gc._state.reinit = None  # C ignores the ReInit: its own send guard is bypassed
    application = gc.encrypt_application(b"still here")
    proposal = gc.propose_update()
    commit = gc.update().commit
    match = "reinitialised by a ReInit Commit"
    for message in (application, proposal, commit):
        rejects(gb, message, ValidationError, match)
    assert gb.pending_reinit == reinit and not gb.active
    assert pub.pending_reinit == reinit
    for message in (proposal, commit):
        public_rejects(pub, message, match)
    restored = PublicGroup.from_bytes(pub.to_bytes())
    assert restored.pending_reinit == reinit
    public_rejects(restored, commit, match)
    _, created = ga.reinit_group(None, [gb.client.key_package(), gc.client.key_package()])
    assert created.welcome is not None
    assert Group.join(gb.client, created.welcome, previous=gb).group_id == b"next"


# --- §10: KeyPackage.extensions are listed in the leaf's capabilities -------------------------------

LAST_RESORT = 0x000A  # the last_resort KeyPackage extension (draft-ietf-mls-extensions)


class LastResortClient(Client):
    """A client whose capabilities list the last_resort extension."""

    def capabilities(self) -> Capabilities:
        return replace(default_capabilities(self.cipher_suite), extensions=[LAST_RESORT])


def test_key_package_extension_missing_from_capabilities_rejected() -> None:
    """§10: "Extensions included in the extensions or leaf_node.extensions fields MUST be
    included in the leaf_node.capabilities field" (KeyPackage.extensions too)."""
    ga, gb = make_pair()
    pub = PublicGroup.from_group_info(ga.group_info())
    carol = Client(b"carol")
    kp = resign_kp(carol, key_package(carol, extensions=[Extension(LAST_RESORT, b"")]))
    match = "KeyPackage: carries extension type 10 that its leaf's capabilities do not list"
    forged = forge_commit(ga, [add(kp)])
    rejects(gb, forged, ValidationError, match)
    public_rejects(pub, forged, match)
    rejects(gb, ga._send_proposal(Proposal(Add(kp))), ValidationError, match)
    with pytest.raises(ValidationError, match=match):
        gb.propose_add(MLSMessage(kp).encode())
    # Listed, or a GREASE type (which receivers ignore in KeyPackage.extensions, §13.5): added.
    dave = LastResortClient(b"dave")
    extensions = [Extension(LAST_RESORT, b""), Extension(0x1A1A, b"grease")]
    listed = resign_kp(dave, key_package(dave, extensions=extensions))
    result = ga.add([MLSMessage(listed).encode()])
    ga.merge_pending_commit()
    gb.process(result.commit)
    pub.process(result.commit)
    same_epoch(ga, gb)


# --- §7.2: the application's maximum total lifetime of a LeafNode -----------------------------------

DAY = 24 * 3600


def test_max_lifetime_refuses_longer_key_package_leaves() -> None:
    """§7.2: "Applications MUST define a maximum total lifetime that is acceptable for a
    LeafNode, and reject any LeafNode where the total lifetime is longer than this duration":
    `max_lifetime` on Group and PublicGroup, for Adds received and sent."""
    limit = 100 * DAY  # this library's KeyPackages last 90 days (and 1 h of clock skew)
    ga, gb = make_group(2)
    for g in (ga, gb):
        g.max_lifetime = limit
    carol = Client(b"carol")
    forever = kp_with_leaf(carol, lifetime=Lifetime(0, 2**64 - 1))
    match = f"LeafNode: lifetime is longer than the {limit} s this application accepts"
    forged = forge_commit(ga, [add(forever)])
    rejects(gb, forged, ValidationError, match)
    pub = PublicGroup.from_group_info(ga.group_info(), max_lifetime=limit)
    public_rejects(pub, forged, match)
    rejects(gb, ga._send_proposal(Proposal(Add(forever))), ValidationError, match)
    with pytest.raises(ValidationError, match=match):
        gb.propose_add(MLSMessage(forever).encode())
    with pytest.raises(ValidationError, match=match):
        ga.add([MLSMessage(forever).encode()])
    assert not ga.has_pending_commit
    result = ga.add([carol.key_package()])
    ga.merge_pending_commit()
    gb.process(result.commit)
    pub.process(result.commit)
    # Application policy is not stored with the group: it is given again on restore.
    assert Group.from_bytes(ga.to_bytes(), max_lifetime=limit).max_lifetime == limit
    assert PublicGroup.from_bytes(pub.to_bytes(), max_lifetime=limit).max_lifetime == limit


def test_max_lifetime_refuses_a_tree_holding_a_longer_leaf() -> None:
    """§7.2 on joining: a tree with a leaf whose lifetime is longer than the maximum is
    refused by Welcome, for an external Commit, and by a PublicGroup."""
    limit = 100 * DAY
    (ga,) = make_group(1)
    forever = kp_with_leaf(Client(b"carol"), lifetime=Lifetime(0, 2**64 - 1))
    erin = Client(b"erin")
    welcome = ga.add([MLSMessage(forever).encode(), erin.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    match = f"leaf 1: lifetime is longer than the {limit} s this application accepts"
    refs = erin.key_package_refs()
    with pytest.raises(ValidationError, match=match):
        Group.join(erin, welcome, max_lifetime=limit)
    assert erin.key_package_refs() == refs
    with pytest.raises(ValidationError, match=match):
        Group.join_external(Client(b"frank"), ga.group_info(), max_lifetime=limit)
    with pytest.raises(ValidationError, match=match):
        PublicGroup.from_group_info(ga.group_info(), max_lifetime=limit)
    joined = Group.join(erin, welcome, max_lifetime=None)  # None: no maximum (the default)
    same_epoch(ga, joined)
    # Without such a leaf the join succeeds, and the group keeps the setting.
    (gx,) = make_group(1)
    dave = Client(b"dave")
    welcome = gx.add([dave.key_package()]).welcome
    assert welcome is not None
    assert Group.join(dave, welcome, max_lifetime=limit).max_lifetime == limit


# --- §5.3.1: every new credential is validated with the AS ------------------------------------------


class Directory:
    """A stand-in Authentication Service: the signature key registered for each identity.
    Records the identities it is asked about."""

    def __init__(self, *clients: Client) -> None:
        self.keys = {c.identity: c.signature_key for c in clients}
        self.asked: list[bytes] = []

    def register(self, client: Client) -> None:
        self.keys[client.identity] = client.signature_key

    def __call__(self, credential: Credential, signature_key: bytes) -> bool:
        self.asked.append(credential.identity)
        return self.keys.get(credential.identity) == signature_key


REFUSED = "the credential_validator refused the credential"


def test_credential_validator_refuses_an_external_join_under_a_members_name() -> None:
    """§5.3.1 "When a member receives ... a Commit with an UpdatePath whose LeafNode has a new
    credential": an outsider with a GroupInfo joins by external Commit as "member-1", with its
    own key; the AS refuses it before any member applies it."""
    ga, gb = make_group(2)
    directory = Directory(ga.client, gb.client)
    gb.credential_validator = directory
    _, commit = Group.join_external(Client(b"member-1"), ga.group_info())
    rejects(gb, commit, ValidationError, f"leaf 2: {REFUSED}")
    pub = PublicGroup.from_group_info(ga.group_info(), credential_validator=directory)
    public_rejects(pub, commit, f"leaf 2: {REFUSED}")
    carol = Client(b"carol")
    directory.register(carol)
    _, commit = Group.join_external(carol, ga.group_info())
    gb.process(commit)
    pub.process(commit)


def test_credential_validator_asked_about_added_key_packages() -> None:
    """§5.3.1: a KeyPackage a member will add, and an Add proposal or Commit received."""
    ga, gb = make_group(2)
    directory = Directory(ga.client, gb.client)
    for g in (ga, gb):
        g.credential_validator = directory
    stranger = Client(b"stranger")
    kp = key_package(stranger)
    match = f"LeafNode: {REFUSED}"
    forged = forge_commit(ga, [add(kp)])
    rejects(gb, forged, ValidationError, match)
    pub = PublicGroup.from_group_info(ga.group_info(), credential_validator=directory)
    public_rejects(pub, forged, match)
    rejects(gb, ga._send_proposal(Proposal(Add(kp))), ValidationError, match)
    with pytest.raises(ValidationError, match=match):
        gb.propose_add(MLSMessage(kp).encode())
    with pytest.raises(ValidationError, match=match):
        gb.add([MLSMessage(kp).encode()])
    assert not gb.has_pending_commit
    directory.register(stranger)
    result = gb.add([stranger.key_package()])
    gb.merge_pending_commit()
    ga.process(result.commit)
    pub.process(result.commit)


def test_credential_validator_asked_about_a_new_signature_key_only() -> None:
    """§5.3.1 "an Update proposal whose LeafNode has a new credential": here the same
    identity with another signature key, a binding the AS has not seen. An Update or
    UpdatePath that keeps the member's credential and key asks nothing."""
    ga, gb = make_group(2)
    directory = Directory(ga.client, gb.client)
    ga.credential_validator = directory
    ga.process(gb.propose_update())
    result = gb.update()
    gb.merge_pending_commit()
    ga.process(result.commit)
    assert directory.asked == []
    rekeyed = Client(b"member-1")
    old = gb.tree.leaf_node(gb.leaf_index)
    assert old is not None
    _, enc_pub = gb.crypto.hpke_key_pair()
    leaf = resign_leaf_node(
        gb.crypto, replace(old, signature_key=rekeyed.signature_key), encryption_key=enc_pub,
        source=LeafNodeSource.update, parent_hash=None, signature_priv=rekeyed.signing_key,
        group_id=gb.group_id, leaf_index=gb.leaf_index,
    )
    proposal = gb._send_proposal(Proposal(Update(leaf)))
    rejects(ga, proposal, ValidationError, f"leaf 1: {REFUSED}")
    assert directory.asked == [b"member-1"]
    directory.register(rekeyed)
    assert ga.process(proposal).kind == "proposal"


def test_credential_validator_asked_about_every_leaf_of_a_group_joined() -> None:
    """§5.3.1 "When a member receives a GroupInfo object that it will use to join a group,
    either via a Welcome or via an external Commit": every member's credential."""
    ga, gb = make_group(2)
    dave = Client(b"dave")
    welcome = ga.add([dave.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    directory = Directory(ga.client, dave)  # member-1 is not known to this AS
    match = f"leaf 1: {REFUSED}"
    refs = dave.key_package_refs()
    with pytest.raises(ValidationError, match=match):
        Group.join(dave, welcome, credential_validator=directory)
    assert dave.key_package_refs() == refs
    with pytest.raises(ValidationError, match=match):
        Group.join_external(Client(b"erin"), ga.group_info(), credential_validator=directory)
    with pytest.raises(ValidationError, match=match):
        PublicGroup.from_group_info(ga.group_info(), credential_validator=directory)
    directory.register(gb.client)
    joined = Group.join(dave, welcome, credential_validator=directory)
    assert joined.credential_validator is directory
    same_epoch(ga, joined)


def test_credential_validator_asked_about_new_external_senders() -> None:
    """§5.3.1 "When an external_senders extension is added to the group" (or updated), and in
    the GroupContext of a group joined."""
    ga, gb = make_group(2)
    directory = Directory(ga.client, gb.client)
    gb.credential_validator = directory
    server = Client(b"ds")
    senders = [ExternalSender(server.signature_key, Credential.basic(b"ds"))]
    result = ga.commit([Proposal(GroupContextExtensions([external_senders_extension(senders)]))])
    ga.merge_pending_commit()
    rejects(gb, result.commit, ValidationError, f"external sender 0: {REFUSED}")
    with pytest.raises(ValidationError, match=f"external sender 0: {REFUSED}"):
        Group.join_external(Client(b"erin"), ga.group_info(), credential_validator=directory)
    with pytest.raises(ValidationError, match=f"external sender 0: {REFUSED}"):
        Group.create(ga.client, extensions=[external_senders_extension(senders)],
                     credential_validator=directory)
    directory.register(server)
    gb.process(result.commit)
    same_epoch(ga, gb)
    # An external_senders list that only grows asks about its new entries only.
    directory.asked.clear()
    other = Client(b"ds2")
    directory.register(other)
    grown = [*senders, ExternalSender(other.signature_key, Credential.basic(b"ds2"))]
    result = ga.commit([Proposal(GroupContextExtensions([external_senders_extension(grown)]))])
    ga.merge_pending_commit()
    gb.process(result.commit)
    assert directory.asked == [b"ds2"]


def test_credential_validator_errors_are_validation_errors() -> None:
    """A validator that raises any exception refuses the credential with a ValidationError
    (an MLSError), the group unchanged."""
    ga, gb = make_group(2)

    def broken(credential: Credential, signature_key: bytes) -> None:
        raise LookupError("directory unreachable")

    gb.credential_validator = broken
    forged = forge_commit(ga, [add(key_package(Client(b"carol")))])
    rejects(gb, forged, ValidationError, r"refused the credential \(directory unreachable\)")
