"""RFC 9420 §8.2 transcript hashes and the confirmation tag against transcript-hashes.json."""

from __future__ import annotations

from typing import Any

import pytest

from mls.crypto import CipherSuite, get_crypto
from mls.framing import (
    AuthenticatedContent,
    ConfirmedTranscriptHashInput,
    ContentType,
    InterimTranscriptHashInput,
)
from mls.transcript import (
    TranscriptHashes,
    confirmation_tag,
    confirmed_transcript_hash,
    interim_transcript_hash,
    verify_confirmation_tag,
)
from tests.vectors import vector_cases

h = bytes.fromhex


@pytest.mark.parametrize("case", vector_cases("mls/transcript-hashes.json"))
def test_transcript_hashes_vector(case: dict[str, Any]) -> None:
    crypto = get_crypto(case["cipher_suite"])
    encoded = h(case["authenticated_content"])
    ac = AuthenticatedContent.decode(encoded)
    assert ac.content.content_type == ContentType.commit
    tag = ac.auth.confirmation_tag
    assert tag is not None

    confirmed_input = ConfirmedTranscriptHashInput.from_authenticated_content(ac).encode()
    # A commit's AuthenticatedContent is ConfirmedTranscriptHashInput || opaque confirmation_tag.
    assert encoded == confirmed_input + InterimTranscriptHashInput(tag).encode()

    before = h(case["interim_transcript_hash_before"])
    confirmed = confirmed_transcript_hash(crypto, before, confirmed_input)
    assert confirmed == h(case["confirmed_transcript_hash_after"])
    interim = interim_transcript_hash(crypto, confirmed, tag)
    assert interim == h(case["interim_transcript_hash_after"])

    key = h(case["confirmation_key"])
    assert confirmation_tag(crypto, key, confirmed) == tag
    assert verify_confirmation_tag(crypto, key, confirmed, tag)
    assert not verify_confirmation_tag(crypto, key, before, tag)

    after = TranscriptHashes(b"", before).next(crypto, confirmed_input, tag)
    assert after == TranscriptHashes(confirmed, interim)
    assert TranscriptHashes.from_group_info(crypto, confirmed, tag) == after


def test_first_epoch_starts_from_empty_hashes() -> None:
    crypto = get_crypto(CipherSuite.MLS_128_DHKEMP256_AES128GCM_SHA256_P256)
    start = TranscriptHashes()
    assert start.confirmed_transcript_hash == b"" == start.interim_transcript_hash
    nxt = start.next(crypto, b"input", b"\x07" * 32)
    assert nxt.confirmed_transcript_hash == crypto.hash(b"input")
    assert nxt.interim_transcript_hash == crypto.hash(crypto.hash(b"input") + b"\x20" + b"\x07" * 32)
