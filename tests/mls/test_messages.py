"""RFC 9420 wire structures: the `messages` test vectors, plus the rules the vectors do not reach
(GREASE and unknown values, closed enums, select arms, to-be-signed encodings, secrets in repr)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mls.commit import Commit, HPKECiphertext, UpdatePath
from mls.credential import Credential, CredentialType
from mls.errors import DecodeError, ValidationError
from mls.extensions import (
    Extension,
    ExtensionType,
    ExternalPub,
    ExternalSender,
    RequiredCapabilities,
    application_id_extension,
    check_unique_extension_types,
    external_senders_extension,
    find_extension,
    parse_application_id,
    parse_external_senders,
)
from mls.framing import (
    AuthenticatedContent,
    ContentType,
    FramedContent,
    FramedContentAuthData,
    FramedContentTBS,
    MLSMessage,
    PrivateContentAAD,
    PrivateMessage,
    PrivateMessageContent,
    PublicMessage,
    Sender,
    SenderData,
    SenderDataAAD,
    SenderType,
    WireFormat,
)
from mls.group_context import GroupContext, ProtocolVersion
from mls.key_package import Capabilities, KeyPackage, LeafNode, LeafNodeSource, Lifetime
from mls.proposals import (
    Add,
    ExternalInit,
    GroupContextExtensions,
    PreSharedKey,
    PreSharedKeyID,
    Proposal,
    ProposalOrRef,
    ProposalType,
    PSKType,
    ReInit,
    Remove,
    ResumptionPSKUsage,
    Update,
)
from mls.tls import Reader, Struct, Writer
from mls.tree_nodes import (
    ParentNode,
    decode_ratchet_tree,
    encode_ratchet_tree,
    parse_ratchet_tree_extension,
    ratchet_tree_extension,
)
from mls.welcome import GroupInfo, GroupSecrets, PathSecret, Welcome
from tests.vectors import vector_cases

from .test_interop_passive import INTEROP_PASSIVE_FILES

PLAIN_FIELDS: dict[str, type[Struct]] = {
    "group_secrets": GroupSecrets,
    "add_proposal": Add,
    "update_proposal": Update,
    "remove_proposal": Remove,
    "pre_shared_key_proposal": PreSharedKey,
    "re_init_proposal": ReInit,
    "external_init_proposal": ExternalInit,
    "group_context_extensions_proposal": GroupContextExtensions,
    "commit": Commit,
}

MESSAGE_FIELDS: dict[str, tuple[WireFormat, type]] = {
    "mls_welcome": (WireFormat.mls_welcome, Welcome),
    "mls_group_info": (WireFormat.mls_group_info, GroupInfo),
    "mls_key_package": (WireFormat.mls_key_package, KeyPackage),
    "public_message_application": (WireFormat.mls_public_message, PublicMessage),
    "public_message_proposal": (WireFormat.mls_public_message, PublicMessage),
    "public_message_commit": (WireFormat.mls_public_message, PublicMessage),
    "private_message": (WireFormat.mls_private_message, PrivateMessage),
}

PUBLIC_CONTENT_TYPES = {
    "public_message_application": ContentType.application,
    "public_message_proposal": ContentType.proposal,
    "public_message_commit": ContentType.commit,
}


@pytest.mark.parametrize("case", vector_cases("mls/messages.json"))
def test_messages_vector(case: dict[str, Any]) -> None:
    # Every field of the case is covered: a new field in the vectors must fail here.
    assert set(case) == set(PLAIN_FIELDS) | set(MESSAGE_FIELDS) | {"ratchet_tree"}

    for name, cls in PLAIN_FIELDS.items():
        data = bytes.fromhex(case[name])
        assert cls.decode(data).encode() == data, name

    for name, (wire_format, body_cls) in MESSAGE_FIELDS.items():
        data = bytes.fromhex(case[name])
        message = MLSMessage.decode(data)
        assert message.version == ProtocolVersion.mls10
        assert message.wire_format == wire_format, name
        assert isinstance(message.body, body_cls), name
        assert data[2:4] == int(wire_format).to_bytes(2, "big")
        assert message.encode() == data, name
        # The body alone is the rest of the bytes after version and wire_format.
        assert body_cls.decode(data[4:]).encode() == data[4:], name
        if name in PUBLIC_CONTENT_TYPES:
            assert message.public_message.content.content_type == PUBLIC_CONTENT_TYPES[name]

    tree = bytes.fromhex(case["ratchet_tree"])
    nodes = decode_ratchet_tree(tree)
    assert nodes[-1] is not None
    assert encode_ratchet_tree(nodes) == tree


# --- Every wire structure in the other vector files round-trips too ------------------------------
# (Their semantics are tested elsewhere; here only the encoding, including the GREASE values the
# interop vectors carry in capabilities and extensions.)

Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes]]
MESSAGE: Codec = (MLSMessage.decode, MLSMessage.encode)
TREE: Codec = (decode_ratchet_tree, encode_ratchet_tree)


def _passive_client_fields(case: dict[str, Any]) -> Iterator[tuple[str, Codec, str]]:
    yield "key_package", MESSAGE, case["key_package"]
    yield "welcome", MESSAGE, case["welcome"]
    if case["ratchet_tree"] is not None:
        yield "ratchet_tree", TREE, case["ratchet_tree"]
    for i, epoch in enumerate(case["epochs"]):
        for j, proposal in enumerate(epoch["proposals"]):
            yield f"epochs[{i}].proposals[{j}]", MESSAGE, proposal
        yield f"epochs[{i}].commit", MESSAGE, epoch["commit"]


def _fields(stem: str, case: dict[str, Any]) -> Iterator[tuple[str, Codec, str]]:
    if stem.startswith("passive-client") or stem.startswith("interop-"):
        yield from _passive_client_fields(case)
    elif stem == "welcome":
        yield "welcome", MESSAGE, case["welcome"]
        yield "key_package", MESSAGE, case["key_package"]
    elif stem == "treekem":
        yield "ratchet_tree", TREE, case["ratchet_tree"]
        for i, path in enumerate(case["update_paths"]):
            yield f"update_paths[{i}]", (UpdatePath.decode, UpdatePath.encode), path["update_path"]
    elif stem == "tree-validation":
        yield "tree", TREE, case["tree"]
    elif stem == "tree-operations":
        yield "tree_before", TREE, case["tree_before"]
        yield "tree_after", TREE, case["tree_after"]
        yield "proposal", (Proposal.decode, Proposal.encode), case["proposal"]
    elif stem == "message-protection":
        yield "proposal", (Proposal.decode, Proposal.encode), case["proposal"]
        yield "commit", (Commit.decode, Commit.encode), case["commit"]
        for kind in ("proposal", "commit"):
            yield f"{kind}_pub", MESSAGE, case[f"{kind}_pub"]
            yield f"{kind}_priv", MESSAGE, case[f"{kind}_priv"]
        yield "application_priv", MESSAGE, case["application_priv"]
    elif stem == "transcript-hashes":
        codec = (AuthenticatedContent.decode, AuthenticatedContent.encode)
        yield "authenticated_content", codec, case["authenticated_content"]
    else:  # pragma: no cover - a new file in OTHER_VECTOR_FILES without a mapping
        raise AssertionError(f"no field mapping for {stem}")


OTHER_VECTOR_FILES = [
    "mls/welcome.json",
    "mls/treekem.json",
    "mls/tree-validation.json",
    "mls/tree-operations.json",
    "mls/message-protection.json",
    "mls/transcript-hashes.json",
    "mls/passive-client-welcome.json",
    "mls/passive-client-handling-commit.json",
    "mls/passive-client-random.json",
    *INTEROP_PASSIVE_FILES,
]


def _other_files() -> list[Any]:
    """One param per file (not per case: each case already has its own conformance test under
    the id `<stem>[<index>]`, and this check must not repeat those ids)."""
    params = []
    for relative in OTHER_VECTOR_FILES:
        # The interop files get a prefix: their stems (commit, welcome_join...) say too little.
        prefix = "interop-" if relative.startswith("mls/interop-passive/") else ""
        stem = prefix + Path(relative).stem
        cases = vector_cases(relative)
        params.append(
            pytest.param(stem, [p.values[0] for p in cases], id=f"{stem}.json", marks=cases[0].marks)
        )
    return params


@pytest.mark.parametrize("stem, cases", _other_files())
def test_wire_structs_in_other_vectors(stem: str, cases: list[dict[str, Any]]) -> None:
    """Every wire struct inside the other vector files round-trips: encode(decode(x)) == x."""
    assert cases
    for index, case in enumerate(cases):
        fields = list(_fields(stem, case))
        assert fields
        for label, (decode, encode), hex_data in fields:
            data = bytes.fromhex(hex_data)
            assert encode(decode(data)) == data, f"{stem}[{index}] {label}"


# --- Builders for hand-made structures ---------------------------------------------------------


def make_leaf(source: LeafNodeSource = LeafNodeSource.key_package) -> LeafNode:
    return LeafNode(
        encryption_key=b"E" * 32,
        signature_key=b"S" * 32,
        credential=Credential.basic(b"alice"),
        capabilities=Capabilities(
            versions=[1],
            cipher_suites=[1, 0x0A0A],
            extensions=[0x1A1A],
            proposals=[0x2A2A],
            credentials=[1, 0x3A3A],
        ),
        leaf_node_source=source,
        lifetime=Lifetime(10, 20) if source == LeafNodeSource.key_package else None,
        parent_hash=b"P" * 32 if source == LeafNodeSource.commit else None,
        extensions=[Extension(0x4A4A, b"grease")],
        signature=b"sig",
    )


def make_key_package() -> KeyPackage:
    return KeyPackage(
        cipher_suite=1, init_key=b"I" * 32, leaf_node=make_leaf(), extensions=[], signature=b"kps"
    )


def make_context() -> GroupContext:
    return GroupContext(
        cipher_suite=1,
        group_id=b"g",
        epoch=7,
        tree_hash=b"t" * 32,
        confirmed_transcript_hash=b"c" * 32,
    )


# --- Extensibility: GREASE and unknown values survive, closed sets are rejected ---------------


def test_grease_and_unknown_values_decode_as_ints_and_round_trip() -> None:
    leaf = make_leaf()
    decoded = LeafNode.decode(leaf.encode())
    assert decoded == leaf
    assert decoded.capabilities.cipher_suites == [1, 0x0A0A]
    assert decoded.extensions[0].extension_type == 0x4A4A
    assert not isinstance(decoded.extensions[0].extension_type, ExtensionType)
    known = Extension.decode(Extension(ExtensionType.external_pub, b"").encode())
    assert known.extension_type is ExtensionType.external_pub


@pytest.mark.parametrize(
    "cls, data, field",
    [
        (Credential, b"\x0a\x0a\x00", "Credential.credential_type"),
        (Proposal, b"\x0a\x0a\x00", "Proposal.proposal_type"),
        (Sender, b"\x05", "Sender.sender_type"),
        (Sender, b"\x00", "Sender.sender_type"),
        (ProposalOrRef, b"\x03\x00", "ProposalOrRef.type"),
        (PreSharedKeyID, b"\x03\x00", "PreSharedKeyID.psktype"),
        (MLSMessage, b"\x00\x01\x00\x06", "MLSMessage.wire_format"),
        (MLSMessage, b"\x00\x01\x00\x00", "MLSMessage.wire_format"),
        (MLSMessage, b"\x00\x02\x00\x03", "MLSMessage.version"),
        (PrivateMessage, b"\x01g" + bytes(8) + b"\x04", "PrivateMessage.content_type"),
    ],
)
def test_closed_sets_reject_unknown_values(cls: type[Struct], data: bytes, field: str) -> None:
    with pytest.raises(DecodeError) as info:
        cls.decode(data)
    assert info.value.field == field


def test_leaf_node_source_and_node_type_are_closed() -> None:
    data = bytearray(make_leaf().encode())
    source_at = data.index(b"\x01" + (10).to_bytes(8, "big"))  # leaf_node_source, then lifetime
    data[source_at] = 9
    with pytest.raises(DecodeError, match="LeafNodeSource"):
        LeafNode.decode(bytes(data))
    tree = bytearray(encode_ratchet_tree([make_leaf()]))
    assert tree[:3] == bytes([0x40, len(tree) - 2, 1])  # 2-byte vector length, presence octet
    tree[3] = 3
    with pytest.raises(DecodeError, match="NodeType"):
        decode_ratchet_tree(bytes(tree))


# --- Select arms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("source", list(LeafNodeSource)[1:])
def test_leaf_node_select_arms_round_trip(source: LeafNodeSource) -> None:
    leaf = make_leaf(source)
    assert LeafNode.decode(leaf.encode()) == leaf


def test_leaf_node_missing_select_field_is_refused_on_encode() -> None:
    leaf = make_leaf(LeafNodeSource.commit)
    leaf.parent_hash = None
    with pytest.raises(ValidationError, match="parent_hash"):
        leaf.encode()


def test_x509_credential_chain_round_trips_in_order() -> None:
    cred = Credential.x509([b"end-entity", b"intermediate", b"root"])
    decoded = Credential.decode(cred.encode())
    assert decoded.credential_type == CredentialType.x509
    assert [c.cert_data for c in decoded.certificates] == [b"end-entity", b"intermediate", b"root"]
    # uint16 type, then a vector of three opaque<V> certificates
    assert cred.encode() == b"\x00\x02\x1d\x0aend-entity\x0cintermediate\x04root"


def test_sender_arms() -> None:
    assert Sender.member(5).encode() == b"\x01\x00\x00\x00\x05"
    assert Sender.external(2).encode() == b"\x02\x00\x00\x00\x02"
    assert Sender.new_member_proposal().encode() == b"\x03"
    assert Sender.new_member_commit().encode() == b"\x04"
    for s in (Sender.member(5), Sender.external(2), Sender.new_member_commit()):
        assert Sender.decode(s.encode()) == s


def test_psk_ids_round_trip_both_types() -> None:
    ext = PreSharedKeyID.external(b"id", b"n" * 32)
    res = PreSharedKeyID.resumption(ResumptionPSKUsage.branch, b"grp", 3, b"n" * 32)
    assert PreSharedKeyID.decode(ext.encode()) == ext
    assert PreSharedKeyID.decode(res.encode()) == res
    assert res.encode()[:2] == bytes([PSKType.resumption, ResumptionPSKUsage.branch])


def test_proposal_types_follow_the_body() -> None:
    proposals = [
        Proposal(Add(make_key_package())),
        Proposal(Update(make_leaf(LeafNodeSource.update))),
        Proposal(Remove(3)),
        Proposal(PreSharedKey(PreSharedKeyID.external(b"id", b"n"))),
        Proposal(ReInit(b"g2", ProtocolVersion.mls10, 2, [])),
        Proposal(ExternalInit(b"kem")),
        Proposal(GroupContextExtensions([ExternalPub(b"k").to_extension()])),
    ]
    for i, proposal in enumerate(proposals, start=1):
        assert proposal.proposal_type == ProposalType(i)
        data = proposal.encode()
        assert data[:2] == i.to_bytes(2, "big")
        assert Proposal.decode(data) == proposal
    commit = Commit(
        [ProposalOrRef.by_value(p) for p in proposals] + [ProposalOrRef.by_reference(b"r")]
    )
    assert Commit.decode(commit.encode()) == commit


def test_public_message_membership_tag_only_for_members() -> None:
    def message(sender: Sender, tag: bytes | None) -> PublicMessage:
        content = FramedContent(
            b"g", 1, sender, b"", ContentType.proposal, proposal=Proposal(Remove(1))
        )
        return PublicMessage(content, FramedContentAuthData(b"sig"), tag)

    member = message(Sender.member(0), b"tag")
    assert PublicMessage.decode(member.encode()) == member
    external = message(Sender.external(0), None)
    assert PublicMessage.decode(external.encode()) == external
    with pytest.raises(ValidationError):
        message(Sender.member(0), None).encode()
    with pytest.raises(ValidationError):
        message(Sender.external(0), b"tag").encode()


def test_confirmation_tag_present_iff_commit() -> None:
    commit_content = FramedContent(
        b"g", 1, Sender.member(0), b"", ContentType.commit, commit=Commit()
    )
    ac = AuthenticatedContent(
        WireFormat.mls_public_message, commit_content, FramedContentAuthData(b"s", b"T")
    )
    assert AuthenticatedContent.decode(ac.encode()) == ac
    assert ac.encode().endswith(b"\x01s\x01T")
    ac.auth.confirmation_tag = None
    with pytest.raises(ValidationError, match="confirmation_tag"):
        ac.encode()


# --- To-be-signed encodings ---------------------------------------------------------------------


def test_leaf_node_tbs_tail_depends_on_source() -> None:
    kp_leaf = make_leaf(LeafNodeSource.key_package)
    body = kp_leaf.encode()
    signature_len = 1 + len(kp_leaf.signature)
    assert kp_leaf.tbs() == body[:-signature_len]
    with pytest.raises(ValidationError):
        kp_leaf.tbs(b"group", 1)

    commit_leaf = make_leaf(LeafNodeSource.commit)
    content = commit_leaf.encode()[: -(1 + len(commit_leaf.signature))]
    assert commit_leaf.tbs(b"group", 258) == content + b"\x05group" + b"\x00\x00\x01\x02"
    with pytest.raises(ValidationError, match="group_id and leaf_index"):
        make_leaf(LeafNodeSource.update).tbs()


def test_key_package_and_group_info_tbs_are_all_but_the_signature() -> None:
    kp = make_key_package()
    assert kp.tbs() + b"\x03kps" == kp.encode()
    gi = GroupInfo(make_context(), [Extension(0x5A5A, b"x")], b"tag", 3, b"gsig")
    assert gi.tbs() + b"\x04gsig" == gi.encode()
    assert GroupInfo.decode(gi.encode()) == gi


def test_framed_content_tbs_covers_context_for_member_and_new_member_commit() -> None:
    context = make_context()
    for sender, with_context in [
        (Sender.member(1), True),
        (Sender.new_member_commit(), True),
        (Sender.external(0), False),
        (Sender.new_member_proposal(), False),
    ]:
        content = FramedContent(
            b"g", 7, sender, b"ad", ContentType.application, application_data=b"hi"
        )
        if sender.sender_type in (SenderType.external, SenderType.new_member_proposal):
            content = FramedContent(
                b"g", 7, sender, b"ad", ContentType.proposal, proposal=Proposal(Remove(0))
            )
        prefix = b"\x00\x01\x00\x01" + content.encode()
        tbs = FramedContentTBS(
            WireFormat.mls_public_message, content, context if with_context else None
        )
        expected = prefix + (context.encode() if with_context else b"")
        assert tbs.encode() == expected
        with pytest.raises(ValidationError):
            FramedContentTBS(
                WireFormat.mls_public_message, content, None if with_context else context
            ).encode()


# --- PrivateMessage pieces ----------------------------------------------------------------------


def test_private_message_content_padding() -> None:
    pmc = PrivateMessageContent(
        ContentType.application, FramedContentAuthData(b"sig"), application_data=b"hi", padding=5
    )
    data = pmc.encode()
    assert data == b"\x02hi\x03sig" + bytes(5)
    assert PrivateMessageContent.decode(data, ContentType.application) == pmc
    with pytest.raises(DecodeError, match="padding"):
        PrivateMessageContent.decode(data[:-1] + b"\x01", ContentType.application)
    commit = PrivateMessageContent(
        ContentType.commit, FramedContentAuthData(b"s", b"t"), commit=Commit()
    )
    assert PrivateMessageContent.decode(commit.encode(), ContentType.commit) == commit


def test_sender_data_and_aads() -> None:
    sd = SenderData(1, 2, b"\xaa\xbb\xcc\xdd")
    assert sd.encode() == b"\x00\x00\x00\x01\x00\x00\x00\x02\xaa\xbb\xcc\xdd"
    assert SenderData.decode(sd.encode()) == sd
    pm = PrivateMessage(b"g", 5, ContentType.commit, b"ad", b"esd", b"ct")
    assert pm.sender_data_aad() == SenderDataAAD(b"g", 5, ContentType.commit).encode()
    assert pm.sender_data_aad() == b"\x01g" + (5).to_bytes(8, "big") + b"\x03"
    assert pm.content_aad() == pm.sender_data_aad() + b"\x02ad"
    assert PrivateContentAAD.decode(pm.content_aad()).authenticated_data == b"ad"


# --- Extensions and the ratchet tree -------------------------------------------------------------


def test_known_extension_helpers_round_trip() -> None:
    assert parse_application_id(application_id_extension(b"app")) == b"app"
    rc = RequiredCapabilities([0x10], [0x11], [1])
    assert RequiredCapabilities.from_extension(rc.to_extension()) == rc
    assert ExternalPub.from_extension(ExternalPub(b"pub").to_extension()).external_pub == b"pub"
    senders = [ExternalSender(b"key", Credential.basic(b"ds"))]
    assert parse_external_senders(external_senders_extension(senders)) == senders
    nodes = [make_leaf(), ParentNode(b"pk", b"", [2]), make_leaf()]
    assert parse_ratchet_tree_extension(ratchet_tree_extension(nodes)) == nodes
    with pytest.raises(DecodeError, match="expected extension type application_id, got 2"):
        parse_application_id(ratchet_tree_extension(nodes))


def test_extension_list_helpers() -> None:
    exts = [Extension(1, b"\x00"), Extension(0x0A0A, b"")]
    assert find_extension(exts, ExtensionType.application_id) is exts[0]
    assert find_extension(exts, ExtensionType.external_pub) is None
    check_unique_extension_types(exts, "test")
    with pytest.raises(ValidationError, match="more than once"):
        check_unique_extension_types(exts + [Extension(1, b"")], "GroupContext.extensions")


def test_ratchet_tree_shape_is_checked() -> None:
    leaf, parent = make_leaf(), ParentNode(b"pk")
    assert encode_ratchet_tree([leaf, None, None, None, None]) == encode_ratchet_tree([leaf])
    with pytest.raises(DecodeError, match="empty"):
        decode_ratchet_tree(b"\x00")
    trailing_blank = Writer()
    trailing_blank.opaque(b"\x01" + b"\x01" + leaf.encode() + b"\x00")
    with pytest.raises(DecodeError, match="last node"):
        decode_ratchet_tree(trailing_blank.getvalue())
    w = Writer()
    w.opaque(b"\x01\x02" + parent.encode())  # a parent where leaf 0 belongs
    with pytest.raises(DecodeError, match="expected a LeafNode"):
        decode_ratchet_tree(w.getvalue())


# --- Secrets and misc ----------------------------------------------------------------------------


def test_secrets_stay_out_of_repr() -> None:
    secrets = GroupSecrets(b"JOINER-SECRET", PathSecret(b"PATH-SECRET"), [])
    assert "JOINER" not in repr(secrets) and "PATH-SECRET" not in repr(secrets)
    assert "PATH-SECRET" not in repr(PathSecret(b"PATH-SECRET"))
    assert GroupSecrets.decode(secrets.encode()) == secrets


def test_mls_message_accessors_check_the_wire_format() -> None:
    msg = MLSMessage(make_key_package())
    assert msg.key_package is msg.body
    assert MLSMessage.decode(msg.encode()) == msg
    with pytest.raises(ValidationError, match="Welcome"):
        _ = msg.welcome


def test_wire_structs_carry_no_instance_dict() -> None:
    # The ratchet tree holds many nodes: slots keep them small.
    assert not hasattr(make_leaf(), "__dict__")
    assert not hasattr(ParentNode(b"k"), "__dict__")


def test_update_path_and_welcome_round_trip() -> None:
    path = UpdatePath(make_leaf(LeafNodeSource.commit), [])
    assert UpdatePath.decode(path.encode()) == path
    welcome = Welcome(1, [], b"egi")
    assert Welcome.decode(welcome.encode()) == welcome
    ct = HPKECiphertext(b"kem", b"ct")
    assert Reader(ct.encode()).opaque("kem_output") == b"kem"
