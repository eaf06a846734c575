"""Bad input: each validation rule of RFC 9420 §7.3, §7.9.2, §10.1, §12.2 and §12.4 is fed a
violating message, which must raise the rule's error and leave the receiving group unchanged.

Violating Commits are forged by a member: properly signed and membership-tagged, so that the
receiver's rule checks (which run before the confirmation tag is checked) are what rejects them.
Each test names the rule's message with `match` so that an earlier, unrelated check cannot pass
for it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mls.client import Client
from mls.commit import Commit, HPKECiphertext, UpdatePath, UpdatePathNode
from mls.credential import Credential
from mls.errors import CryptoError, MLSError, ValidationError
from mls.extensions import Extension, RequiredCapabilities
from mls.framing import (
    ContentType,
    FramedContent,
    MLSMessage,
    PublicMessage,
    Sender,
    WireFormat,
)
from mls.group import Group
from mls.group_framing import membership_tag, sign_content
from mls.key_package import KeyPackage, LeafNodeSource, Lifetime
from mls.key_schedule import derive_psk_secret, derive_welcome_secret, welcome_key_and_nonce
from mls.leaf_validation import sign_leaf_node, validate_ratchet_tree
from mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ProposalOrRef,
    ReInit,
    Remove,
    ResumptionPSKUsage,
    Update,
)
from mls.welcome import EncryptedGroupSecrets, GroupInfo, GroupSecrets, Welcome

from .test_group import make_group, snapshot

by_value = ProposalOrRef.by_value


def forge_commit(
    g: Group,
    proposals: list[ProposalOrRef],
    path: UpdatePath | None = None,
    tag: bytes | None = None,
) -> bytes:
    """A Commit from member `g`, signed and membership-tagged, with any content."""
    state = g._state
    content = FramedContent(
        state.context.group_id,
        state.context.epoch,
        Sender.member(state.leaf_index),
        b"",
        ContentType.commit,
        commit=Commit(proposals, path),
    )
    ac = sign_content(
        g.crypto, g._client.signature_priv, WireFormat.mls_public_message, content, state.context
    )
    ac.auth.confirmation_tag = bytes(g.crypto.hash_length) if tag is None else tag
    mt = membership_tag(g.crypto, state.secrets.membership_key, ac, state.context)
    return MLSMessage(PublicMessage(content, ac.auth, mt)).encode()


def real_commit(g: Group, make) -> tuple[Commit, bytes]:  # type: ignore[no-untyped-def]
    """The Commit and confirmation tag `make()` creates, then discarded."""
    result = make()
    g.discard_pending_commit()
    pm = MLSMessage.decode(result.commit).public_message
    assert pm.content.commit is not None and pm.auth.confirmation_tag is not None
    return pm.content.commit, pm.auth.confirmation_tag


def rejects(receiver: Group, message: bytes, error: type[MLSError], match: str) -> None:
    before = snapshot(receiver)
    with pytest.raises(error, match=match):
        receiver.process(message)
    assert snapshot(receiver) == before


def key_package(client: Client, **changes: object) -> KeyPackage:
    kp, _ = client.make_key_package()
    return replace(kp, **changes) if changes else kp


def resign_kp(client: Client, kp: KeyPackage) -> KeyPackage:
    crypto = client.crypto
    return replace(kp, signature=crypto.sign_with_label(client.signature_priv, b"KeyPackageTBS", kp.tbs()))


def kp_with_leaf(client: Client, **changes: object) -> KeyPackage:
    """A KeyPackage of `client` whose leaf has `changes`; leaf and KeyPackage re-signed."""
    kp = key_package(client)
    leaf = sign_leaf_node(client.crypto, replace(kp.leaf_node, **changes), client.signature_priv)
    return resign_kp(client, replace(kp, leaf_node=leaf))


def add(kp: KeyPackage) -> ProposalOrRef:
    return by_value(Proposal(Add(kp)))


# --- §12.2 proposal list validation ---------------------------------------------------------------


def test_update_from_committer_rejected() -> None:
    ga, gb, _ = make_group(3)
    proposal = ga.propose_update()
    gb.process(proposal)
    ref = next(iter(ga._state.proposals))
    rejects(gb, forge_commit(ga, [ProposalOrRef.by_reference(ref)]), ValidationError, "committer")


def test_remove_of_committer_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(0)))]), ValidationError, "committer")


def test_two_removes_of_one_leaf_rejected() -> None:
    ga, gb, _ = make_group(3)
    remove = by_value(Proposal(Remove(2)))
    rejects(gb, forge_commit(ga, [remove, remove]), ValidationError, "more than one")


def test_update_and_remove_of_one_leaf_rejected() -> None:
    ga, gb, gc = make_group(3)
    proposal = gc.propose_update()
    ga.process(proposal)
    gb.process(proposal)
    ref = next(iter(ga._state.proposals))
    message = forge_commit(ga, [ProposalOrRef.by_reference(ref), by_value(Proposal(Remove(2)))])
    rejects(gb, message, ValidationError, "more than one")


def test_remove_of_blank_leaf_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(7)))]), ValidationError, "not a member")


def test_two_adds_of_one_client_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp1, kp2 = key_package(carol), key_package(carol)
    rejects(gb, forge_commit(ga, [add(kp1), add(kp2)]), ValidationError, "signature_key")


def test_two_adds_sharing_an_init_key_rejected() -> None:
    """§10: an init_key is unique to its KeyPackage; two Adds with one (a copied KeyPackage key)
    would make one Welcome readable by the other's holder. Nor may an added leaf's
    encryption_key be another Add's init_key."""
    ga, gb = make_group(2)
    carol, dave = Client(b"carol"), Client(b"dave")
    kp1 = key_package(carol)
    kp2 = resign_kp(dave, key_package(dave, init_key=kp1.init_key))
    match = "init_key is also the init_key of another KeyPackage this Commit adds"
    rejects(gb, forge_commit(ga, [add(kp1), add(kp2)]), ValidationError, match)
    with pytest.raises(ValidationError, match=match):
        ga.add([MLSMessage(kp1).encode(), MLSMessage(kp2).encode()])
    assert not ga.has_pending_commit
    kp3 = kp_with_leaf(dave, encryption_key=kp1.init_key)
    rejects(gb, forge_commit(ga, [add(kp1), add(kp3)]), ValidationError,
            "encryption_key is the init_key of a KeyPackage this Commit adds")


def test_add_whose_init_key_is_already_in_the_tree_rejected() -> None:
    """§10: an init_key equal to an encryption key of the tree (here a member's leaf key) is
    refused in a Commit, in a received Add proposal, and by the would-be proposer."""
    ga, gb = make_group(2)
    carol = Client(b"carol")
    leaf_key = gb.tree.leaf_node(1).encryption_key  # type: ignore[union-attr]
    kp = resign_kp(carol, key_package(carol, init_key=leaf_key))
    match = "init_key is an encryption_key already in the ratchet tree"
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, match)
    rejects(gb, ga._send_proposal(Proposal(Add(kp))), ValidationError, match)
    with pytest.raises(ValidationError, match=match):
        gb.propose_add(MLSMessage(kp).encode())


def test_add_of_existing_member_rejected() -> None:
    ga, gb = make_group(2)
    rejects(gb, forge_commit(ga, [add(key_package(gb._client))]), ValidationError, "signature_key")


def test_duplicate_psk_rejected() -> None:
    ga, gb = make_group(2)
    for g in (ga, gb):
        g.add_external_psk(b"id", b"k" * 32)
    pid = PreSharedKeyID.external(b"id", b"n" * 32)
    psk = by_value(Proposal(PreSharedKey(pid)))
    rejects(gb, forge_commit(ga, [psk, psk]), ValidationError, "same PSK")


def test_psk_nonce_length_rejected() -> None:
    ga, gb = make_group(2)
    for g in (ga, gb):
        g.add_external_psk(b"id", b"k" * 32)
    psk = by_value(Proposal(PreSharedKey(PreSharedKeyID.external(b"id", b"short"))))
    rejects(gb, forge_commit(ga, [psk]), ValidationError, "psk_nonce")


def test_reinit_usage_psk_in_proposal_rejected() -> None:
    ga, gb = make_group(2)
    pid = PreSharedKeyID.resumption(ResumptionPSKUsage.reinit, ga.group_id, 1, b"n" * 32)
    rejects(
        gb, forge_commit(ga, [by_value(Proposal(PreSharedKey(pid)))]), ValidationError, "usage"
    )


def test_two_group_context_extensions_rejected() -> None:
    ga, gb = make_group(2)
    gce = by_value(Proposal(GroupContextExtensions([])))
    rejects(gb, forge_commit(ga, [gce, gce]), ValidationError, "at most one GroupContextExt")


def test_reinit_with_other_proposals_rejected() -> None:
    ga, gb, _ = make_group(3)
    reinit = by_value(Proposal(ReInit(b"new", 1, 1, [])))
    message = forge_commit(ga, [reinit, by_value(Proposal(Remove(2)))])
    rejects(gb, message, ValidationError, "only proposal")


def test_external_init_in_member_commit_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(ExternalInit(b"kem")))])
    rejects(gb, message, ValidationError, "only an external Commit")


def test_unknown_proposal_reference_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [ProposalOrRef.by_reference(b"\x00" * 32)])
    rejects(gb, message, ValidationError, "has not received")


def test_group_extension_unsupported_by_a_member_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(GroupContextExtensions([Extension(0x7F00, b"")])))])
    rejects(gb, message, ValidationError, "does not support")


# --- §12.4 commit structure ------------------------------------------------------------------------


def test_missing_path_rejected() -> None:
    ga, gb, _ = make_group(3)
    rejects(gb, forge_commit(ga, [by_value(Proposal(Remove(2)))]), ValidationError, "UpdatePath")
    rejects(gb, forge_commit(ga, []), ValidationError, "UpdatePath")


def test_bad_confirmation_tag_rejected() -> None:
    ga, gb = make_group(2)
    commit, tag = real_commit(ga, ga.update)
    wrong = bytes([tag[0] ^ 1]) + tag[1:]
    rejects(gb, forge_commit(ga, commit.proposals, commit.path, wrong), CryptoError, "confirmation")
    # The same Commit with its real tag is accepted: the forging itself is sound.
    gb.process(forge_commit(ga, commit.proposals, commit.path, tag))


def test_bad_membership_tag_and_signature_rejected() -> None:
    ga, gb = make_group(2)
    commit, tag = real_commit(ga, ga.update)
    pm = MLSMessage.decode(forge_commit(ga, commit.proposals, commit.path, tag)).public_message
    assert pm.membership_tag is not None
    bad_tag = replace(pm, membership_tag=bytes(len(pm.membership_tag)))
    rejects(gb, MLSMessage(bad_tag).encode(), CryptoError, "membership_tag")
    # Re-tagged correctly but with a signature by someone else: the signature check fails.
    state = ga._state
    ac = sign_content(
        ga.crypto, Client(b"mallory").signature_priv, WireFormat.mls_public_message,
        pm.content, state.context,
    )
    ac.auth.confirmation_tag = tag
    mt = membership_tag(ga.crypto, state.secrets.membership_key, ac, state.context)
    forged = MLSMessage(PublicMessage(pm.content, ac.auth, mt)).encode()
    rejects(gb, forged, CryptoError, "signature")


# --- §7.3 / §7.9.2 / §12.4.2: the UpdatePath ---------------------------------------------------------


def _resign_path_leaf(g: Group, path: UpdatePath, **changes: object) -> UpdatePath:
    leaf = replace(path.leaf_node, **changes)
    leaf = sign_leaf_node(g.crypto, leaf, g._client.signature_priv, g.group_id, g.leaf_index)
    return UpdatePath(leaf, path.nodes)


def test_path_parent_hash_mismatch_rejected() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, parent_hash=bytes(32))
    rejects(gb, forge_commit(ga, [], path), ValidationError, "parent_hash")


def test_path_leaf_source_must_be_commit() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, leaf_node_source=LeafNodeSource.update, parent_hash=None)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "leaf_node_source")


def test_path_leaf_bad_signature_rejected() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    leaf = replace(commit.path.leaf_node, signature=bytes(64))
    rejects(gb, forge_commit(ga, [], UpdatePath(leaf, commit.path.nodes)), ValidationError, "signature")


def test_path_leaf_must_change_encryption_key() -> None:
    ga, gb = make_group(2)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    old = ga.tree.leaf_node(0)
    assert old is not None
    path = _resign_path_leaf(ga, commit.path, encryption_key=old.encryption_key)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "encryption_key")


def test_path_node_count_must_match() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None and commit.path.nodes
    path = UpdatePath(commit.path.leaf_node, commit.path.nodes[:-1])
    rejects(gb, forge_commit(ga, [], path), ValidationError, "path nodes")


def test_path_key_already_in_tree_rejected() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    existing = gb.tree.leaf_node(1)
    assert existing is not None
    first = commit.path.nodes[0]
    nodes = [UpdatePathNode(existing.encryption_key, first.encrypted_path_secret), *commit.path.nodes[1:]]
    rejects(gb, forge_commit(ga, [], UpdatePath(commit.path.leaf_node, nodes)), ValidationError, "already appears")


def test_path_ciphertext_count_must_match_resolution() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    nodes = [UpdatePathNode(n.encryption_key, []) for n in commit.path.nodes]
    message = forge_commit(ga, [], UpdatePath(commit.path.leaf_node, nodes))
    rejects(gb, message, ValidationError, "encrypted path secrets")


# --- §10.1 KeyPackages, §7.3 their leaves -----------------------------------------------------------


def test_key_package_bad_signature_rejected() -> None:
    ga, gb = make_group(2)
    kp = replace(key_package(Client(b"carol")), signature=bytes(64))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "KeyPackage signature")
    with pytest.raises(ValidationError, match="KeyPackage signature"):
        ga.propose_add(MLSMessage(kp).encode())


def test_key_package_wrong_cipher_suite_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = resign_kp(carol, key_package(carol, cipher_suite=3))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "cipher suite")


def test_key_package_init_key_equals_encryption_key_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    kp = resign_kp(carol, replace(kp, init_key=kp.leaf_node.encryption_key))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "init_key")


def test_key_package_expired_lifetime_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = sign_leaf_node(
        carol.crypto, replace(kp.leaf_node, lifetime=Lifetime(0, int(time.time()) - 10)),
        carol.signature_priv,
    )
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "lifetime")


def test_key_package_leaf_source_must_be_key_package() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    leaf = replace(kp.leaf_node, leaf_node_source=LeafNodeSource.update, lifetime=None)
    leaf = sign_leaf_node(carol.crypto, leaf, carol.signature_priv, ga.group_id, 2)
    kp = resign_kp(carol, replace(kp, leaf_node=leaf))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "leaf_node_source")


def test_key_package_unsupported_credential_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    caps = replace(carol.capabilities(), credentials=[2])
    kp = kp_with_leaf(carol, capabilities=caps)
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "credential type")


# --- §7.3 on Update proposals ------------------------------------------------------------------------


def _forge_proposal(g: Group, proposal: Proposal) -> bytes:
    state = g._state
    content = FramedContent(
        state.context.group_id, state.context.epoch, Sender.member(state.leaf_index), b"",
        ContentType.proposal, proposal=proposal,
    )
    ac = sign_content(
        g.crypto, g._client.signature_priv, WireFormat.mls_public_message, content, state.context
    )
    mt = membership_tag(g.crypto, state.secrets.membership_key, ac, state.context)
    return MLSMessage(PublicMessage(content, ac.auth, mt)).encode()


def test_update_with_duplicate_encryption_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    other = gc.tree.leaf_node(2)
    own = ga.tree.leaf_node(0)
    assert other is not None and own is not None
    leaf = replace(own, encryption_key=other.encryption_key, leaf_node_source=LeafNodeSource.update,
                   lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 0)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "encryption_key")


def test_update_signed_for_another_leaf_rejected() -> None:
    ga, gb = make_group(2)
    own = ga.tree.leaf_node(0)
    assert own is not None
    leaf = replace(own, encryption_key=ga.crypto.hpke_key_pair()[1],
                   leaf_node_source=LeafNodeSource.update, lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 5)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "signature")


def test_remove_proposal_of_non_member_rejected() -> None:
    ga, gb = make_group(2)
    rejects(gb, _forge_proposal(ga, Proposal(Remove(9))), ValidationError, "not a member")


# --- §12.4.3.1 joining ---------------------------------------------------------------------------------


def test_join_with_wrong_tree_rejected() -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, ratchet_tree_extension=False)
    welcome = ga.add([bob.key_package()]).welcome
    assert welcome is not None
    stale_tree = ga.ratchet_tree()  # the tree before the commit: wrong tree hash
    ga.merge_pending_commit()
    with pytest.raises(ValidationError, match="tree hash"):
        Group.join(bob, welcome, stale_tree)
    Group.join(bob, welcome, ga.ratchet_tree())


# --- property tests: mutated Commits and Welcomes ---------------------------------------------------

_GROUPS = {hs: make_group(3, handshake=hs) for hs in ("public", "private")}
_COMMITS = {}
for _hs, _groups in _GROUPS.items():
    _COMMITS[_hs] = _groups[0].update().commit
    _groups[0].discard_pending_commit()
_JOINER = Client(b"late")
_WELCOME_RESULT = _GROUPS["public"][0].add([_JOINER.key_package()])
_GROUPS["public"][0].discard_pending_commit()


@pytest.mark.parametrize("handshake", ["public", "private"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_commits_change_nothing(handshake: str, data: st.DataObject) -> None:
    receiver = _GROUPS[handshake][1]
    before = snapshot(receiver)
    message = bytearray(_COMMITS[handshake])
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(message) - 1))
    if kind == "flip":
        message[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del message[pos:]
    else:
        message[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(MLSError):
        receiver.process(bytes(message))
    assert snapshot(receiver) == before


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_welcomes_raise_mls_errors(data: st.DataObject) -> None:
    welcome = bytearray(_WELCOME_RESULT.welcome or b"")
    pos = data.draw(st.integers(0, len(welcome) - 1))
    welcome[pos] ^= data.draw(st.integers(1, 255))
    refs_before = _JOINER.key_package_refs()
    with pytest.raises(MLSError):
        Group.join(_JOINER, bytes(welcome))
    assert _JOINER.key_package_refs() == refs_before


def test_key_package_missing_required_capability_rejected() -> None:
    required = RequiredCapabilities(extension_types=[0x7F02]).to_extension()
    alice, bob = Client(b"alice"), Client(b"bob")
    # Members that support the required extension type.
    for c in (alice, bob):
        c.capabilities = lambda c=c: replace(  # type: ignore[method-assign]
            type(c).capabilities(c), extensions=[0x7F02]
        )
    ga = Group.create(alice, extensions=[required])
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    carol = Client(b"carol")  # does not list 0x7F02
    rejects(gb, forge_commit(ga, [add(key_package(carol))]), ValidationError, "required extension")


def test_leaf_extension_not_in_capabilities_rejected() -> None:
    ga, gb = make_group(2)
    kp = kp_with_leaf(Client(b"carol"), extensions=[Extension(0x7F03, b"x")])
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "extension type")


def test_welcome_tree_with_bad_parent_hash_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    from mls.ratchet_tree import RatchetTree

    ga, gb, _ = make_group(3)
    dave = Client(b"dave")
    real = RatchetTree.set_path_keys

    def corrupt(self, leaf_index, path, keys):  # type: ignore[no-untyped-def]
        real(self, leaf_index, path, keys)
        return bytes(self.crypto.hash_length)  # a parent hash that matches nothing

    with monkeypatch.context() as m:
        m.setattr(RatchetTree, "set_path_keys", corrupt)
        kp = MLSMessage.decode(dave.key_package()).key_package
        result = ga.commit([Proposal(Add(kp))], force_path=True)
    ga.discard_pending_commit()
    assert result.welcome is not None
    refs = dave.key_package_refs()
    with pytest.raises(ValidationError, match="parent"):
        Group.join(dave, result.welcome)
    assert dave.key_package_refs() == refs  # the KeyPackage was not consumed


# --- §12.2 / §12.4.3.2: external Commits -------------------------------------------------------------


def _forge_external(
    joiner: Client, receiver: Group, proposals: list[ProposalOrRef], path: UpdatePath | None
) -> bytes:
    content = FramedContent(
        receiver.group_id, receiver.epoch, Sender.new_member_commit(), b"", ContentType.commit,
        commit=Commit(proposals, path),
    )
    ac = sign_content(
        joiner.crypto, joiner.signature_priv, WireFormat.mls_public_message, content,
        receiver.group_context,
    )
    ac.auth.confirmation_tag = bytes(joiner.crypto.hash_length)
    return MLSMessage(PublicMessage(content, ac.auth, None)).encode()


def _real_external(ga: Group) -> tuple[Client, Commit]:
    carol = Client(b"carol")
    _, message = Group.join_external(carol, ga.group_info())
    commit = MLSMessage.decode(message).public_message.content.commit
    assert commit is not None and commit.path is not None
    return carol, commit


def test_external_commit_rules() -> None:
    ga, _ = make_group(2)
    carol, commit = _real_external(ga)
    init = commit.proposals[0]
    gce = by_value(Proposal(GroupContextExtensions([])))
    cases = [
        ([init, init], commit.path, "exactly one ExternalInit"),
        ([], commit.path, "exactly one ExternalInit"),
        ([init, gce], commit.path, "cannot hold"),
        ([init, by_value(Proposal(Remove(0))), by_value(Proposal(Remove(1)))], commit.path,
         "at most one Remove"),
        ([init, ProposalOrRef.by_reference(b"\x01" * 32)], commit.path, "has not received"),
    ]
    for proposals, path, match in cases:
        rejects(ga, _forge_external(carol, ga, proposals, path), ValidationError, match)
    # Without a path the commit cannot name its sender's key at all.
    rejects(ga, _forge_external(carol, ga, [init], None), ValidationError, "UpdatePath")
    # Signed by someone other than the path's leaf: refused.
    rejects(ga, _forge_external(Client(b"mallory"), ga, [init], commit.path), CryptoError, "signature")


def test_external_commit_by_reference_rejected() -> None:
    ga, gb = make_group(2)
    carol, commit = _real_external(ga)
    proposal = gb.propose_remove(0)
    ga.process(proposal)
    ref = next(iter(ga._state.proposals))
    message = _forge_external(carol, ga, [commit.proposals[0], ProposalOrRef.by_reference(ref)], commit.path)
    rejects(ga, message, ValidationError, "by reference")


# --- further rules: each fed a violating message, error named, group unchanged ------------------


def _forge_as(
    signer_priv: bytes, g: Group, sender: Sender, *, proposal: Proposal | None = None,
    commit: Commit | None = None, tagged: bool = True,
) -> bytes:
    """A PublicMessage in `g`'s epoch from any `sender`, signed with `signer_priv`; members'
    messages are membership-tagged with `g`'s key (so the sender checks are what is tested)."""
    state = g._state
    content = FramedContent(
        state.context.group_id, state.context.epoch, sender, b"",
        ContentType.proposal if proposal is not None else ContentType.commit,
        proposal=proposal, commit=commit,
    )
    ac = sign_content(g.crypto, signer_priv, WireFormat.mls_public_message, content, state.context)
    if commit is not None:
        ac.auth.confirmation_tag = bytes(g.crypto.hash_length)
    mt = None
    if tagged:
        mt = membership_tag(g.crypto, state.secrets.membership_key, ac, state.context)
    return MLSMessage(PublicMessage(content, ac.auth, mt)).encode()


def _update_leaf(
    g: Group, index: int, signer: Client | None = None, **changes: object
) -> Update:
    """An Update for leaf `index` of `g`'s tree with `changes`, signed by `signer` (default:
    `g`'s member)."""
    own = g.tree.leaf_node(index)
    assert own is not None
    fields: dict[str, object] = {
        "encryption_key": g.crypto.hpke_key_pair()[1],
        "leaf_node_source": LeafNodeSource.update,
        "lifetime": None,
        "parent_hash": None,
    }
    fields.update(changes)
    leaf = replace(own, **fields)
    priv = (signer or g._client).signature_priv
    return Update(sign_leaf_node(g.crypto, leaf, priv, g.group_id, index))


# §7.3 on Update proposals and UpdatePath leaves


def test_update_with_key_package_source_rejected() -> None:
    ga, gb = make_group(2)
    update = _update_leaf(ga, 0, leaf_node_source=LeafNodeSource.key_package,
                          lifetime=Lifetime(0, 2**62))
    rejects(gb, _forge_proposal(ga, Proposal(update)), ValidationError, "leaf_node_source")


def test_update_with_another_members_signature_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    other = gc.tree.leaf_node(2)
    assert other is not None
    # Signed by the other member's key, so that only the uniqueness rule can refuse it.
    update = _update_leaf(ga, 0, gc._client, signature_key=other.signature_key)
    rejects(gb, _forge_proposal(ga, Proposal(update)), ValidationError,
            "signature_key is already used by leaf 2")


def test_path_leaf_with_another_members_signature_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    other = gc.tree.leaf_node(2)
    assert other is not None
    leaf = replace(commit.path.leaf_node, signature_key=other.signature_key)
    leaf = sign_leaf_node(ga.crypto, leaf, gc._client.signature_priv, ga.group_id, 0)
    path = UpdatePath(leaf, commit.path.nodes)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "signature_key is already used")


def test_key_package_leaf_bad_signature_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol)
    kp = resign_kp(carol, replace(kp, leaf_node=replace(kp.leaf_node, signature=bytes(64))))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "LeafNode signature")


def test_key_package_encryption_key_in_tree_rejected() -> None:
    ga, gb = make_group(2)
    member = gb.tree.leaf_node(1)
    assert member is not None
    kp = kp_with_leaf(Client(b"carol"), encryption_key=member.encryption_key)
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "encryption_key")


def test_key_package_leaf_with_repeated_extension_type_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    caps = replace(carol.capabilities(), extensions=[0x7F04])
    kp = kp_with_leaf(
        carol, capabilities=caps, extensions=[Extension(0x7F04, b"a"), Extension(0x7F04, b"b")]
    )
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "appears more than once")


# §10.1 KeyPackages


def test_key_package_wrong_version_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = resign_kp(carol, key_package(carol, version=2))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "protocol version")


def test_key_package_with_repeated_extension_type_rejected() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    kp = key_package(carol, extensions=[Extension(0x7F05, b""), Extension(0x7F05, b"")])
    rejects(gb, forge_commit(ga, [add(resign_kp(carol, kp))]), ValidationError,
            "appears more than once")


# §12.2 proposal lists


def test_two_updates_from_one_leaf_rejected() -> None:
    ga, gb, gc = make_group(3)
    for _ in range(2):
        proposal = gc.propose_update()
        ga.process(proposal)
        gb.process(proposal)
    refs = [ProposalOrRef.by_reference(ref) for ref in ga._state.proposals]
    assert len(refs) == 2
    rejects(gb, forge_commit(ga, refs), ValidationError, "more than one Update or Remove")


def test_same_proposal_referenced_twice_rejected() -> None:
    ga, gb, gc = make_group(3)
    proposal = gc.propose_remove(1)
    ga.process(proposal)
    gb.process(proposal)
    ref = ProposalOrRef.by_reference(next(iter(ga._state.proposals)))
    rejects(gb, forge_commit(ga, [ref, ref]), ValidationError, "same proposal twice")


def test_reinit_to_unsupported_cipher_suite_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(ReInit(b"new", 1, 0x7F00, [])))])
    rejects(gb, message, ValidationError, "unsupported cipher suite")


def test_reinit_to_older_version_rejected() -> None:
    ga, gb = make_group(2)
    message = forge_commit(ga, [by_value(Proposal(ReInit(b"new", 0, 1, [])))])
    rejects(gb, message, ValidationError, "older protocol version")


def test_group_context_extensions_with_unmet_required_capabilities_rejected() -> None:
    ga, gb = make_group(2)
    required = RequiredCapabilities(extension_types=[0x7F06]).to_extension()
    message = forge_commit(ga, [by_value(Proposal(GroupContextExtensions([required])))])
    rejects(gb, message, ValidationError, "required extension type")


def test_group_context_extensions_with_repeated_type_rejected() -> None:
    ga, gb = make_group(2)
    gce = GroupContextExtensions([Extension(0x7F07, b""), Extension(0x7F07, b"")])
    rejects(gb, forge_commit(ga, [by_value(Proposal(gce))]), ValidationError,
            "appears more than once")


def test_new_member_sender_may_only_propose_add() -> None:
    ga, gb = make_group(2)
    message = _forge_as(Client(b"x").signature_priv, ga, Sender.new_member_proposal(),
                        proposal=Proposal(Remove(1)), tagged=False)
    rejects(gb, message, ValidationError, "can only propose Add")


def test_external_sender_update_rejected() -> None:
    from .test_group_external import group_with_external_sender

    (ga, gb), server = group_with_external_sender()
    update = _update_leaf(ga, 0)
    message = _forge_as(server.signature_priv, ga, Sender.external(0), proposal=Proposal(update),
                        tagged=False)
    rejects(gb, message, ValidationError, "must come from a member")


# §12.4 Commits: who may send one


def test_commit_from_blank_leaf_rejected() -> None:
    ga, gb, _ = make_group(3)
    message = _forge_as(ga._client.signature_priv, ga, Sender.member(5), commit=Commit([], None))
    rejects(gb, message, ValidationError, "sender leaf 5 is not a member")


def test_commit_from_external_sender_rejected() -> None:
    from .test_group_external import group_with_external_sender

    (ga, gb), server = group_with_external_sender()
    message = _forge_as(server.signature_priv, ga, Sender.external(0),
                        commit=Commit([by_value(Proposal(Remove(1)))], None), tagged=False)
    rejects(gb, message, ValidationError, "can only send proposals")


def test_public_group_applies_the_same_commit_rules() -> None:
    from mls.public_group import PublicGroup

    ga, gb, gc = make_group(3)
    proposal = gc.propose_remove(1)
    ga.process(proposal)
    pub = PublicGroup.from_group_info(ga.group_info())
    pub.process(proposal)
    ref = ProposalOrRef.by_reference(next(iter(ga._state.proposals)))
    required = RequiredCapabilities(extension_types=[0x7F06]).to_extension()
    cases = [
        (forge_commit(ga, [ref, ref]), "same proposal twice"),
        (forge_commit(ga, [by_value(Proposal(ReInit(b"new", 1, 0x7F00, [])))]),
         "unsupported cipher suite"),
        (forge_commit(ga, [by_value(Proposal(GroupContextExtensions([required])))]),
         "required extension type"),
        (_forge_as(ga._client.signature_priv, ga, Sender.member(5), commit=Commit([], None)),
         "sender leaf 5 is not a member"),
    ]
    before = pub.to_bytes()
    for message, match in cases:
        with pytest.raises(ValidationError, match=match):
            pub.process(message)
        assert pub.to_bytes() == before


# §12.4.3.1 / §12.4.3.2: Welcomes and GroupInfos; a refused join consumes no KeyPackage


def _reseal_welcome(
    opener: Client,
    welcome: bytes,
    group_info: GroupInfo,
    recipients: list[KeyPackage],
    group_secrets: GroupSecrets | None = None,
    resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
) -> bytes:
    """`welcome` with its GroupInfo replaced by `group_info` and its GroupSecrets (or
    `group_secrets`) encrypted to each of `recipients`; the GroupInfo is encrypted under the
    welcome secret of the GroupSecrets sent."""
    crypto = opener.crypto
    psks = resumption_psks or {}
    gs, _, psk_secret, _, _, _ = Group.open_welcome(opener, welcome, resumption_psks=psks)
    if group_secrets is not None:
        gs = group_secrets
        pairs = [(pid.encode(), psks[(pid.psk_group_id, pid.psk_epoch)]) for pid in gs.psks]
        psk_secret = derive_psk_secret(crypto, pairs)
    welcome_secret = derive_welcome_secret(crypto, gs.joiner_secret, psk_secret)
    key, nonce = welcome_key_and_nonce(crypto, welcome_secret)
    encrypted_group_info = crypto.aead_seal(key, nonce, b"", group_info.encode())
    secrets = []
    for kp in recipients:
        kem_output, ct = crypto.encrypt_with_label(
            kp.init_key, b"Welcome", encrypted_group_info, gs.encode()
        )
        ref = crypto.make_key_package_ref(kp.encode())
        secrets.append(EncryptedGroupSecrets(ref, HPKECiphertext(kem_output, ct)))
    w = MLSMessage.decode(welcome).welcome
    return MLSMessage(Welcome(w.cipher_suite, secrets, encrypted_group_info)).encode()


def _welcome_for(joiner: Client) -> tuple[Group, bytes, KeyPackage]:
    ga = make_group(2)[0]
    kp_bytes = joiner.key_package()
    welcome = ga.add([kp_bytes]).welcome
    ga.discard_pending_commit()
    assert welcome is not None
    return ga, welcome, MLSMessage.decode(kp_bytes).key_package


def refuses_join(
    joiner: Client,
    welcome: bytes,
    error: type[MLSError],
    match: str,
    previous: Group | None = None,
    resumption_psks: dict[tuple[bytes, int], bytes] | None = None,
) -> None:
    refs = joiner.key_package_refs()
    with pytest.raises(error, match=match):
        Group.join(joiner, welcome, previous=previous, resumption_psks=resumption_psks)
    assert joiner.key_package_refs() == refs


def test_welcome_with_bad_group_info_signature_rejected() -> None:
    dave = Client(b"dave")
    _, welcome, kp = _welcome_for(dave)
    gi = Group.open_welcome(dave, welcome)[1]
    forged = _reseal_welcome(dave, welcome, replace(gi, signature=bytes(len(gi.signature))), [kp])
    refuses_join(dave, forged, CryptoError, "GroupInfo signature")
    # Resealing the real GroupInfo gives a Welcome that works: the forging itself is sound.
    Group.join(dave, _reseal_welcome(dave, welcome, gi, [kp]))


def test_welcome_with_bad_confirmation_tag_rejected() -> None:
    dave = Client(b"dave")
    ga, welcome, kp = _welcome_for(dave)
    gi = Group.open_welcome(dave, welcome)[1]
    assert gi.signer == ga.leaf_index  # re-signed by its real signer: only the tag is wrong
    bad = replace(gi, confirmation_tag=bytes(len(gi.confirmation_tag)))
    bad.signature = ga.crypto.sign_with_label(ga._client.signature_priv, b"GroupInfoTBS", bad.tbs())
    refuses_join(dave, _reseal_welcome(dave, welcome, bad, [kp]), CryptoError, "confirmation_tag")


def test_welcome_to_a_key_package_not_in_the_tree_rejected() -> None:
    dave, eve = Client(b"dave"), Client(b"eve")
    _, welcome, _ = _welcome_for(dave)
    gi = Group.open_welcome(dave, welcome)[1]
    eve_kp = MLSMessage.decode(eve.key_package()).key_package
    forged = _reseal_welcome(dave, welcome, gi, [eve_kp])
    refuses_join(eve, forged, ValidationError, "does not hold this client's KeyPackage leaf")


def test_welcome_of_another_cipher_suite_rejected() -> None:
    dave = Client(b"dave")
    _, welcome, _ = _welcome_for(dave)
    w = MLSMessage.decode(welcome).welcome
    other = MLSMessage(replace(w, cipher_suite=2)).encode()
    refuses_join(dave, other, ValidationError, "the Welcome uses cipher suite 2")


def test_welcome_without_a_tree_rejected() -> None:
    alice, dave = Client(b"alice"), Client(b"dave")
    ga = Group.create(alice, ratchet_tree_extension=False)
    welcome = ga.add([dave.key_package()]).welcome
    assert welcome is not None
    refuses_join(dave, welcome, ValidationError, "no ratchet_tree extension")


def test_external_join_needs_external_pub() -> None:
    ga, _ = make_group(2)
    before = snapshot(ga)
    with pytest.raises(ValidationError, match="external_pub"):
        Group.join_external(Client(b"carol"), ga.group_info(external_pub=False))
    assert snapshot(ga) == before


def test_welcome_with_blank_signer_rejected() -> None:
    dave = Client(b"dave")
    _, welcome, kp = _welcome_for(dave)
    gi = Group.open_welcome(dave, welcome)[1]
    forged = _reseal_welcome(dave, welcome, replace(gi, signer=7), [kp])
    refuses_join(dave, forged, ValidationError, "signer leaf 7 is blank")


# §7.3 credential types: every member supports the new leaf's, the new leaf supports the group's


def _with_capabilities(client: Client, credentials: list[int]) -> Client:
    caps = replace(client.capabilities(), credentials=credentials)
    client.capabilities = lambda: caps  # type: ignore[method-assign]
    return client


def test_key_package_credential_type_unsupported_by_members_rejected() -> None:
    ga, gb = make_group(2)  # members support basic credentials only
    carol = _with_capabilities(Client(b"carol", credential=Credential.x509([b"cert"])), [1, 2])
    rejects(gb, forge_commit(ga, [add(key_package(carol))]), ValidationError,
            "credential type 2 is not supported by all members")


def test_key_package_not_supporting_a_credential_type_in_use_rejected() -> None:
    alice = _with_capabilities(Client(b"alice", credential=Credential.x509([b"cert"])), [1, 2])
    bob = _with_capabilities(Client(b"bob"), [1, 2])
    ga = Group.create(alice)
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    carol = Client(b"carol")  # supports basic only; alice's credential is x509
    rejects(gb, forge_commit(ga, [add(key_package(carol))]), ValidationError,
            "does not support credential type 2 used in the group")


def test_add_proposal_with_a_parent_nodes_encryption_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    result = ga.update()
    ga.merge_pending_commit()
    gb.process(result.commit)
    parent = next(n for x, n in enumerate(gb.tree.nodes) if x % 2 == 1 and n is not None)
    kp = kp_with_leaf(Client(b"carol"), encryption_key=parent.encryption_key)
    rejects(gb, _forge_proposal(ga, Proposal(Add(kp))), ValidationError,
            "encryption_key already appears in the ratchet tree")


# §12.2 / §11.1: required_capabilities set by GroupContextExtensions


@pytest.mark.parametrize(
    ("required", "match"),
    [
        (RequiredCapabilities(proposal_types=[0x7F10]), "required proposal type"),
        (RequiredCapabilities(credential_types=[2]), "required credential type"),
    ],
    ids=["proposal_type", "credential_type"],
)
def test_group_context_extensions_requiring_unsupported_types_rejected(
    required: RequiredCapabilities, match: str
) -> None:
    ga, gb = make_group(2)
    gce = GroupContextExtensions([required.to_extension()])
    rejects(gb, forge_commit(ga, [by_value(Proposal(gce))]), ValidationError, match)


# §12.1.8, §12.4: who may send what


def test_external_init_proposal_rejected() -> None:
    ga, gb = make_group(2)
    rejects(gb, _forge_proposal(ga, Proposal(ExternalInit(b"kem"))), ValidationError,
            "ExternalInit may only appear by value in an external Commit")


def test_new_member_commit_sender_cannot_propose() -> None:
    ga, gb = make_group(2)
    message = _forge_as(Client(b"x").signature_priv, ga, Sender.new_member_commit(),
                        proposal=Proposal(Remove(1)), tagged=False)
    rejects(gb, message, ValidationError, "can only send a Commit")


# §6.2 on the public view


def test_public_group_refuses_public_application_data() -> None:
    from mls.public_group import PublicGroup

    ga, _ = make_group(2)
    pub = PublicGroup.from_group_info(ga.group_info())
    before = pub.to_bytes()
    state = ga._state
    content = FramedContent(ga.group_id, ga.epoch, Sender.member(0), b"",
                            ContentType.application, application_data=b"x")
    ac = sign_content(ga.crypto, ga._client.signature_priv, WireFormat.mls_public_message,
                      content, state.context)
    tag = membership_tag(ga.crypto, state.secrets.membership_key, ac, state.context)
    with pytest.raises(ValidationError, match="application data must be sent as a PrivateMessage"):
        pub.process(MLSMessage(PublicMessage(content, ac.auth, tag)).encode())
    assert pub.to_bytes() == before


# §12.4.3.1: a Welcome with a reinit or branch PSK, checked against the group it continues


def _special_welcome(
    creator: Group, previous: Group, usage: ResumptionPSKUsage, key_packages: list[bytes],
    extra_epochs: int = 0,
) -> bytes:
    """A Welcome of a new group by `creator`'s client carrying a `usage` resumption PSK of
    `previous`'s epoch; `extra_epochs` empty commits first move the new group past epoch 0."""
    new = Group.create(creator.client, b"new-group")
    for _ in range(extra_epochs):
        new.update()
        new.merge_pending_commit()
    new.add_resumption_psk(previous.group_id, previous.epoch, previous.resumption_psk())
    pid = PreSharedKeyID.resumption(
        usage, previous.group_id, previous.epoch, new.crypto.random_secret()
    )
    kps = [MLSMessage.decode(kp).key_package for kp in key_packages]
    welcome = new._commit_with_special_psk(pid, kps).welcome
    assert welcome is not None
    return welcome


def test_branch_welcome_with_an_outsider_rejected() -> None:
    ga, gb = make_group(2)
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.branch,
                               [gb.client.key_package(), Client(b"outsider").key_package()])
    refuses_join(gb.client, welcome, ValidationError, "may only hold members", previous=gb)


def test_branch_welcome_naming_another_group_rejected() -> None:
    ga, gb = make_group(2)
    other = Group.create(gb.client, b"other")
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.branch, [gb.client.key_package()])
    psks = {(ga.group_id, ga.epoch): ga.resumption_psk()}
    refuses_join(gb.client, welcome, ValidationError, "names another group", previous=other,
                 resumption_psks=psks)


def test_reinit_welcome_without_a_reinit_rejected() -> None:
    ga, gb = make_group(2)
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.reinit, [gb.client.key_package()])
    refuses_join(gb.client, welcome, ValidationError, "held no ReInit", previous=gb)


def test_reinit_welcome_dropping_a_member_rejected() -> None:
    ga, gb, gc = make_group(3)
    result = ga.reinit(group_id=b"new-group")
    ga.merge_pending_commit()
    gb.process(result.commit)
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.reinit, [gb.client.key_package()])
    refuses_join(gb.client, welcome, ValidationError, "member of the reinitialised group is missing",
                 previous=gb)


@pytest.mark.parametrize(
    "usage", [ResumptionPSKUsage.reinit, ResumptionPSKUsage.branch], ids=["reinit", "branch"]
)
def test_reinit_or_branch_welcome_without_previous_rejected(usage: ResumptionPSKUsage) -> None:
    """§12.4.3.1's checks on a reinit or branch Welcome need the group it continues: with the
    PSK alone (`resumption_psks`), one member could start a "reinit" that no ReInit Commit
    announced, or drop members, and the joiner could not tell."""
    ga, gb = make_group(2)
    welcome = _special_welcome(ga, ga, usage, [gb.client.key_package()])
    psks = {(ga.group_id, ga.epoch): ga.resumption_psk()}
    refuses_join(gb.client, welcome, ValidationError,
                 f"names a {usage.name} resumption PSK: pass the group it continues as `previous`",
                 resumption_psks=psks)


def test_branch_welcome_past_epoch_one_rejected() -> None:
    ga, gb = make_group(2)
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.branch, [gb.client.key_package()],
                               extra_epochs=1)
    refuses_join(gb.client, welcome, ValidationError, "must be at epoch 1", previous=gb)


def test_welcome_with_short_joiner_secret_rejected() -> None:
    dave = Client(b"dave")
    _, welcome, kp = _welcome_for(dave)
    gs, gi = Group.open_welcome(dave, welcome)[:2]
    forged = _reseal_welcome(dave, welcome, gi, [kp], replace(gs, joiner_secret=b"short"))
    refuses_join(dave, forged, ValidationError, "joiner_secret has the wrong length")


def test_welcome_with_two_branch_psks_rejected() -> None:
    ga, gb = make_group(2)
    kp_bytes = gb.client.key_package()
    welcome = _special_welcome(ga, ga, ResumptionPSKUsage.branch, [kp_bytes])
    psks = {(ga.group_id, ga.epoch): ga.resumption_psk()}
    gs, gi = Group.open_welcome(gb.client, welcome, resumption_psks=psks)[:2]
    (pid,) = gs.psks
    second = replace(pid, psk_nonce=ga.crypto.random_secret())
    forged = _reseal_welcome(gb.client, welcome, gi, [MLSMessage.decode(kp_bytes).key_package],
                             replace(gs, psks=[pid, second]), psks)
    refuses_join(gb.client, forged, ValidationError, "at most one reinit or branch PSK",
                 previous=gb)


def test_a_removed_member_rejects_an_invalid_commit_that_removes_it() -> None:
    # §12.4.2 "if the path value is populated, validate it": the removed member cannot check the
    # confirmation tag, but it checks the path as anyone can, or a Commit the rest of the group
    # refuses would end its membership
    a, b, c, _ = make_group(4)
    commit, tag = real_commit(a, lambda: a.remove([1]))
    assert commit.path is not None
    bad_leaf = replace(commit.path.leaf_node, signature=bytes(64))
    message = forge_commit(a, commit.proposals, replace(commit.path, leaf_node=bad_leaf), tag)
    rejects(c, message, ValidationError, "signature does not verify")
    rejects(b, message, ValidationError, "signature does not verify")
    assert b.active


def test_a_path_with_a_ciphertext_too_many_is_refused_by_the_public_view_too() -> None:
    # §7.6: one HPKECiphertext per node of the resolution; a public check, so the delivery
    # service's view must refuse what every member refuses, or its epochs fork from theirs
    from mls.public_group import PublicGroup

    a, b, _, _ = make_group(4)
    public = PublicGroup.from_group_info(a.group_info())
    commit, tag = real_commit(a, a.update)
    assert commit.path is not None
    first = commit.path.nodes[0]
    padded = replace(
        first, encrypted_path_secret=[*first.encrypted_path_secret, first.encrypted_path_secret[0]]
    )
    path = replace(commit.path, nodes=[padded, *commit.path.nodes[1:]])
    message = forge_commit(a, commit.proposals, path, tag)
    rejects(b, message, ValidationError, "encrypted path secrets for a resolution")
    epoch = public.epoch
    with pytest.raises(ValidationError, match="encrypted path secrets for a resolution"):
        public.process(message)
    assert public.epoch == epoch


@pytest.mark.parametrize("ext_type", [1, 2, 4], ids=["application_id", "ratchet_tree", "external_pub"])
def test_groupinfo_and_leafnode_extensions_stay_out_of_the_group_context(ext_type: int) -> None:
    # §17.3: these types are registered for GroupInfo (GI) or LeafNode (LN) messages only
    a, b = make_group(2)
    gce = Proposal(GroupContextExtensions([Extension(ext_type, b"\x00")]))
    with pytest.raises(ValidationError, match="belong in a GroupInfo or a LeafNode"):
        a.commit([gce])
    commit, tag = real_commit(a, a.update)
    rejects(b, forge_commit(a, [by_value(gce)], commit.path, tag), ValidationError,
            "belong in a GroupInfo or a LeafNode")


# --- §5.3.1: a replacing credential presents the identifiers of the one it replaces --------------


def test_update_naming_another_member_rejected() -> None:
    ga, gb, _ = make_group(3)
    own = ga.tree.leaf_node(0)
    assert own is not None
    leaf = replace(own, encryption_key=ga.crypto.hpke_key_pair()[1],
                   credential=Credential.basic(b"member-2"),
                   leaf_node_source=LeafNodeSource.update, lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 0)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "another identity")


def test_path_leaf_naming_another_member_rejected() -> None:
    ga, gb, _ = make_group(3)
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, credential=Credential.basic(b"member-2"))
    rejects(gb, forge_commit(ga, [], path), ValidationError, "another identity")


def test_external_commit_may_remove_only_the_joiners_own_leaf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§12.2: the Remove of an external Commit is of the joiner's old leaf; with another
    member's, anyone holding the GroupInfo could expel any member."""
    ga, gb, gc = make_group(3)
    mallory = Client(b"mallory")
    with pytest.raises(ValidationError, match="another identity"):
        Group.join_external(mallory, ga.group_info(), remove_leaf=0)
    # forged anyway (the joiner's own check skipped): every member refuses it
    monkeypatch.setattr("mls.group_external.check_credential_successor", lambda *a: None)
    _, commit = Group.join_external(mallory, ga.group_info(), remove_leaf=0)
    monkeypatch.undo()
    for g in (ga, gb, gc):
        rejects(g, commit, ValidationError, "another identity")
    # the same identity coming back (new keys, the state lost) may replace its old leaf
    again = Client(b"member-0")
    new, commit = Group.join_external(again, gb.group_info(), remove_leaf=0)
    for g in (gb, gc):
        g.process(commit)
    assert sorted(m.identity for m in gb.members) == [b"member-0", b"member-1", b"member-2"]
    assert new.epoch == gb.epoch == gc.epoch


# --- RFC 9180 §7.1.4: public keys HPKE cannot encrypt to are refused where they arrive -------------

# per suite: an all-zero (low-order) X25519 point, a key of the wrong length, a P-256 point that
# is not on the curve
UNUSABLE = {
    "x25519-zero": (1, bytes(32)),
    "x25519-short": (1, bytes(7)),
    "p256-origin": (2, b"\x04" + bytes(64)),
    "p256-off-curve": (2, b"\x04" + (1).to_bytes(32, "big") * 2),
}


@pytest.mark.parametrize(("suite", "bad"), list(UNUSABLE.values()), ids=list(UNUSABLE))
def test_unusable_keys_in_updates_and_paths_rejected(suite: int, bad: bytes) -> None:
    """A member's Update or UpdatePath with a key no one can encrypt to would stop every later
    Commit with a path in the group (found by the review: an all-zero X25519 key was taken)."""
    ga, gb, _ = make_group(3, suite)
    own = ga.tree.leaf_node(0)
    assert own is not None
    leaf = replace(own, encryption_key=bad, leaf_node_source=LeafNodeSource.update,
                   lifetime=None, parent_hash=None)
    leaf = sign_leaf_node(ga.crypto, leaf, ga._client.signature_priv, ga.group_id, 0)
    rejects(gb, _forge_proposal(ga, Proposal(Update(leaf))), ValidationError, "unusable")
    commit, _ = real_commit(ga, ga.update)
    assert commit.path is not None
    path = _resign_path_leaf(ga, commit.path, encryption_key=bad)
    rejects(gb, forge_commit(ga, [], path), ValidationError, "unusable")
    first = commit.path.nodes[0]
    nodes = [UpdatePathNode(bad, first.encrypted_path_secret), *commit.path.nodes[1:]]
    message = forge_commit(ga, [], UpdatePath(commit.path.leaf_node, nodes))
    rejects(gb, message, ValidationError, "unusable")
    dave = Client(b"dave", suite)
    kp = resign_kp(dave, replace(key_package(dave), init_key=bad))
    rejects(gb, forge_commit(ga, [add(kp)]), ValidationError, "unusable init_key")


def test_a_received_tree_with_an_unusable_parent_key_rejected() -> None:
    ga, gb, gc = make_group(3)
    ga.update()
    ga.merge_pending_commit()
    tree = ga.tree.copy()
    x = next(x for x in range(1, 2 * tree.n_leaves - 1, 2) if tree.parent_node(x) is not None)
    parent = tree.parent_node(x)
    assert parent is not None
    tree.set_parent(x, replace(parent, encryption_key=bytes(32)))
    with pytest.raises(ValidationError, match=f"node {x}: unusable"):
        validate_ratchet_tree(tree, group_id=ga.group_id)
    validate_ratchet_tree(ga.tree.copy(), group_id=ga.group_id)
