"""`Group.forget`: leaving a group without a Commit (its only member, whom no one can remove),
as a removed member does (RFC 9420 §12.4.2): inactive, and no secret kept but the epoch
authenticator, in memory and in the saved group."""

from __future__ import annotations

import pytest

from mls.client import Client
from mls.errors import MLSError, ValidationError
from mls.group import Group


def test_a_forgotten_group_keeps_no_secret_and_can_do_nothing() -> None:
    alice = Client(b"alice", 1)
    group = Group.create(alice, b"room")
    authenticator = group.epoch_authenticator
    saved = group.to_bytes()
    group.forget()
    assert not group.active
    assert group.epoch_authenticator == authenticator  # no key: compared out of band
    with pytest.raises(ValidationError, match="removed"):
        group.encrypt_application(b"hello")
    with pytest.raises(MLSError):  # the exporter secret is gone (§9.2)
        group.export_secret(b"label", b"", 32)
    after = Group.from_bytes(group.to_bytes(), alice)  # so saved, and so loaded
    assert not after.active
    assert len(group.to_bytes()) < len(saved)
