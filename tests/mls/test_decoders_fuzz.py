"""Property tests of the top-level RFC 9420 decoders.

Random bytes and mutations of valid vector encodings must either raise `DecodeError` (never any
other exception) or decode to a structure that re-encodes to exactly the same bytes: the TLS
encoding is canonical (minimal varints, 0/1 presence octets, closed enums), so a decoder that
accepts two spellings of one value is a bug.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mls.commit import Commit
from mls.credential import Credential
from mls.crypto import get_crypto
from mls.errors import DecodeError
from mls.extensions import (
    Extension,
    ExtensionType,
    ExternalSender,
    RequiredCapabilities,
    external_senders_extension,
    parse_external_senders,
)
from mls.framing import (
    AuthenticatedContent,
    ContentType,
    MLSMessage,
    PrivateMessageContent,
    SenderData,
)
from mls.group_context import GroupContext
from mls.key_package import KeyPackage, LeafNode
from mls.proposals import Proposal, ProposalType
from mls.ratchet_tree import RatchetTree
from mls.tree_nodes import decode_ratchet_tree, encode_ratchet_tree
from mls.welcome import GroupInfo, GroupSecrets, Welcome
from tests.vectors import vector_path

SEED_CASES = 3  # vector cases whose encodings seed the mutations
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Decoder:
    def __init__(
        self,
        decode: Callable[[bytes], Any],
        encode: Callable[[Any], bytes],
        seeds: Callable[[dict[str, Any]], list[bytes]],
    ) -> None:
        self.decode = decode
        self.encode = encode
        self.seeds = seeds


X509 = Credential.x509([b"end-entity", b"intermediate"])


def _h(case: dict[str, Any], name: str) -> bytes:
    return bytes.fromhex(case[name])


PROPOSAL_FIELDS = {
    ProposalType.add: "add_proposal",
    ProposalType.update: "update_proposal",
    ProposalType.remove: "remove_proposal",
    ProposalType.psk: "pre_shared_key_proposal",
    ProposalType.reinit: "re_init_proposal",
    ProposalType.external_init: "external_init_proposal",
    ProposalType.group_context_extensions: "group_context_extensions_proposal",
}


def _private_content_decoder(content_type: ContentType) -> Decoder:
    def seeds(case: dict[str, Any]) -> list[bytes]:
        if content_type == ContentType.commit:
            body, auth = _h(case, "commit"), b"\x03sig\x02ct"
        elif content_type == ContentType.proposal:
            body, auth = b"\x00\x03" + _h(case, "remove_proposal"), b"\x03sig"
        else:
            body, auth = b"\x05hello", b"\x03sig"
        return [body + auth, body + auth + bytes(7)]

    return Decoder(
        lambda b: PrivateMessageContent.decode(b, content_type),
        lambda v: v.encode(),
        seeds,
    )


DECODERS: dict[str, Decoder] = {
    "MLSMessage": Decoder(
        MLSMessage.decode,
        MLSMessage.encode,
        lambda c: [
            _h(c, k)
            for k in (
                "mls_welcome",
                "mls_group_info",
                "mls_key_package",
                "public_message_application",
                "public_message_proposal",
                "public_message_commit",
                "private_message",
            )
        ],
    ),
    "KeyPackage": Decoder(
        KeyPackage.decode, KeyPackage.encode, lambda c: [_h(c, "mls_key_package")[4:]]
    ),
    "Welcome": Decoder(Welcome.decode, Welcome.encode, lambda c: [_h(c, "mls_welcome")[4:]]),
    "GroupInfo": Decoder(
        GroupInfo.decode, GroupInfo.encode, lambda c: [_h(c, "mls_group_info")[4:]]
    ),
    "Commit": Decoder(Commit.decode, Commit.encode, lambda c: [_h(c, "commit")]),
    "Proposal": Decoder(
        Proposal.decode,
        Proposal.encode,
        lambda c: [t.to_bytes(2, "big") + _h(c, f) for t, f in PROPOSAL_FIELDS.items()],
    ),
    "ratchet_tree": Decoder(
        decode_ratchet_tree, encode_ratchet_tree, lambda c: [_h(c, "ratchet_tree")]
    ),
    "LeafNode": Decoder(LeafNode.decode, LeafNode.encode, lambda c: [_h(c, "update_proposal")]),
    "GroupSecrets": Decoder(
        GroupSecrets.decode, GroupSecrets.encode, lambda c: [_h(c, "group_secrets")]
    ),
    "AuthenticatedContent": Decoder(
        AuthenticatedContent.decode,
        AuthenticatedContent.encode,
        # wire_format mls_public_message, then the PublicMessage minus its membership tag.
        lambda c: [
            b"\x00\x01" + _public_without_tag(_h(c, k))
            for k in ("public_message_proposal", "public_message_commit")
        ],
    ),
    "GroupContext": Decoder(
        GroupContext.decode,
        GroupContext.encode,
        lambda c: [GroupInfo.decode(_h(c, "mls_group_info")[4:]).group_context.encode()],
    ),
    "RatchetTree": Decoder(
        lambda b: RatchetTree.decode(get_crypto(1), b),
        RatchetTree.encode,
        lambda c: [_h(c, "ratchet_tree")],
    ),
    "SenderData": Decoder(
        SenderData.decode, SenderData.encode, lambda c: [bytes(range(12)), b"\xff" * 12]
    ),
    "external_senders": Decoder(
        lambda b: parse_external_senders(Extension(ExtensionType.external_senders, b)),
        lambda v: external_senders_extension(v).extension_data,
        lambda c: [
            external_senders_extension(
                [ExternalSender(b"key", Credential.basic(b"ds")), ExternalSender(b"k2", X509)]
            ).extension_data
        ],
    ),
    "RequiredCapabilities": Decoder(
        RequiredCapabilities.decode,
        RequiredCapabilities.encode,
        lambda c: [RequiredCapabilities([0x0A0A, 7], [0xFF00], [1, 2]).encode()],
    ),
    "PrivateMessageContent[application]": _private_content_decoder(ContentType.application),
    "PrivateMessageContent[proposal]": _private_content_decoder(ContentType.proposal),
    "PrivateMessageContent[commit]": _private_content_decoder(ContentType.commit),
}


def _public_without_tag(message: bytes) -> bytes:
    public = MLSMessage.decode(message).public_message
    ac = public.authenticated_content()
    return ac.encode()[2:]


@cache
def _messages() -> list[dict[str, Any]]:
    path = vector_path("mls/messages.json")
    if not path.exists():
        pytest.skip(f"test vectors not found at {path}; set CONCLAVE_VECTORS")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def seeds_for(name: str) -> list[bytes]:
    return [s for case in _messages()[:SEED_CASES] for s in DECODERS[name].seeds(case)]


def check_canonical(decoder: Decoder, data: bytes) -> None:
    """Decoding either fails with DecodeError or re-encodes byte-identically."""
    try:
        value = decoder.decode(data)
    except DecodeError:
        return
    assert decoder.encode(value) == data


@st.composite
def mutations(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        pos = draw(st.integers(min_value=0, max_value=len(data)))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(
                st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x3F, 0x40, 0x80, 0xC0, 0xFF])
            )
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(min_value=1, max_value=8))]
    return bytes(data)


@pytest.mark.parametrize("name", list(DECODERS))
def test_vector_inputs_round_trip(name: str) -> None:
    decoder = DECODERS[name]
    seeds = seeds_for(name)
    assert seeds
    for data in seeds:
        value = decoder.decode(data)
        assert decoder.encode(value) == data
        assert decoder.decode(decoder.encode(value)) == value


@pytest.mark.parametrize("name", list(DECODERS))
@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_decode_error(name: str, data: bytes) -> None:
    check_canonical(DECODERS[name], data)


@pytest.mark.parametrize("name", list(DECODERS))
@FUZZ
@given(data=st.data())
def test_mutated_vectors_raise_only_decode_error(name: str, data: st.DataObject) -> None:
    check_canonical(DECODERS[name], data.draw(mutations(seeds_for(name))))


def test_every_decoder_rejects_each_truncation_of_a_vector_input() -> None:
    # Exhaustive where it is cheap: every proper prefix of one valid encoding is incomplete.
    for name, decoder in DECODERS.items():
        data = seeds_for(name)[0]
        for end in range(len(data)):
            with pytest.raises(DecodeError):
                decoder.decode(data[:end])
