"""What the service reads of posted MLS messages, and the BasicTracker's ordering rules."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from delivery_service.errors import BadRequest, DeliveryServiceError, Forbidden, StaleEpoch
from delivery_service.tracker import BasicTracker, GroupState, MembershipHints
from delivery_service.wire import (
    ContentType,
    SenderType,
    WireFormat,
    parse_framed,
    parse_group_info,
    parse_key_package,
    parse_welcome,
)
from mls.client import Client
from mls.framing import MLSMessage

from . import mlsmsg

GID = b"group-1"


def test_public_and_private_headers() -> None:
    c = parse_framed(mlsmsg.commit(GID, 7, leaf_index=3))
    assert (c.wire_format, c.group_id, c.epoch, c.content_type, c.sender_type, c.sender_index) == (
        WireFormat.mls_public_message, GID, 7, ContentType.commit, SenderType.member, 3)
    e = parse_framed(mlsmsg.commit(GID, 2, external=True))
    assert (e.sender_type, e.sender_index) == (SenderType.new_member_commit, None)
    a = parse_framed(mlsmsg.application(GID, 4))
    assert (a.wire_format, a.epoch, a.content_type, a.sender_type) == (
        WireFormat.mls_private_message, 4, ContentType.application, None)


@pytest.mark.parametrize("cut", [1, 3, 10, -1])
def test_truncated_or_extended_messages_are_refused(cut: int) -> None:
    data = mlsmsg.commit(GID, 1)
    bad = data + b"\x00" if cut == -1 else data[:cut]
    with pytest.raises(BadRequest, match="malformed"):
        parse_framed(bad)


def test_wrong_kind_for_the_endpoint() -> None:
    with pytest.raises(BadRequest, match="Welcome"):
        parse_framed(mlsmsg.welcome([b"r" * 32]))
    with pytest.raises(BadRequest):
        parse_welcome(mlsmsg.commit(GID, 0))
    with pytest.raises(BadRequest):
        parse_group_info(mlsmsg.welcome([b"r" * 32]))
    with pytest.raises(BadRequest):
        parse_welcome(mlsmsg.welcome([]))


def test_welcome_group_info_and_key_package() -> None:
    refs = [os.urandom(32), os.urandom(32)]
    assert parse_welcome(mlsmsg.welcome(refs, suite=3)) == (3, refs)
    gi = parse_group_info(mlsmsg.group_info(GID, 9))
    assert (gi.cipher_suite, gi.group_id, gi.epoch) == (1, GID, 9)
    client = Client(b"alice", 2)
    data = client.key_package()
    info = parse_key_package(data)
    assert (info.cipher_suite, info.identity, info.signature_key) == (2, b"alice",
                                                                       client.signature_key)
    # The ref is the one the MLS client itself recorded for the package (RFC 9420 §5.2).
    assert client.key_package_refs() == [info.ref]
    kp = MLSMessage.decode(data).key_package
    kp.signature = bytes(len(kp.signature))
    with pytest.raises(BadRequest, match="signature"):
        parse_key_package(MLSMessage(kp).encode())


STATE = GroupState(GID, 1, 5, frozenset({"alice", "bob"}))
TRACKER = BasicTracker()
NONE = MembershipHints()


def accept(data: bytes, poster: str = "alice", hints: MembershipHints = NONE) -> GroupState:
    return TRACKER.accept(STATE, parse_framed(data), data, poster, hints)


def test_tracker_commit_advances_epoch_and_membership() -> None:
    new = accept(mlsmsg.commit(GID, 1), hints=MembershipHints(frozenset({"carol"}),
                                                              frozenset({"bob"})))
    assert (new.epoch, new.members, new.last_seq) == (2, frozenset({"alice", "carol"}), 5)
    joined = accept(mlsmsg.commit(GID, 1, external=True), poster="dave")
    assert joined.members == frozenset({"alice", "bob", "dave"})
    assert accept(mlsmsg.proposal(GID, 1)) == STATE
    assert accept(mlsmsg.application(GID, 0)) == STATE  # previous epoch: frames in flight


@pytest.mark.parametrize(
    ("data", "poster", "error"),
    [
        (mlsmsg.commit(GID, 0), "alice", StaleEpoch),
        (mlsmsg.commit(GID, 2), "alice", StaleEpoch),
        (mlsmsg.proposal(GID, 0), "alice", StaleEpoch),
        (mlsmsg.application(GID, 2), "alice", StaleEpoch),
        (mlsmsg.commit(GID, 1), "eve", Forbidden),
        (mlsmsg.commit(b"other", 1), "alice", BadRequest),
        (mlsmsg.private_commit(GID, 1), "alice", BadRequest),
    ],
)
def test_tracker_refusals(data: bytes, poster: str, error: type[DeliveryServiceError]) -> None:
    with pytest.raises(error):
        accept(data, poster)


def test_tracker_stale_epoch_names_the_current_one() -> None:
    with pytest.raises(StaleEpoch) as info:
        accept(mlsmsg.commit(GID, 0))
    assert info.value.body()["current_epoch"] == 1 and info.value.status == 409
    with pytest.raises(BadRequest):
        TRACKER.accept(replace(STATE), parse_framed(mlsmsg.commit(GID, 1)), b"", "alice",
                       MembershipHints(frozenset({"alice"})))
