"""MLS messages for delivery-service tests, built with `mls`'s wire structs.

The service reads only public fields and (for now) does not verify commit signatures, so the
signatures, tags and ciphertexts here are placeholders; headers and structure are real.
"""

from __future__ import annotations

import os

from mls.commit import Commit, HPKECiphertext
from mls.framing import (
    ContentType,
    FramedContent,
    FramedContentAuthData,
    MLSMessage,
    PrivateMessage,
    PublicMessage,
    Sender,
)
from mls.group_context import GroupContext
from mls.proposals import Proposal, Remove
from mls.welcome import EncryptedGroupSecrets, GroupInfo, Welcome


def commit(group_id: bytes, epoch: int, leaf_index: int = 0, external: bool = False) -> bytes:
    sender = Sender.new_member_commit() if external else Sender.member(leaf_index)
    content = FramedContent(group_id, epoch, sender, b"", ContentType.commit, commit=Commit())
    auth = FramedContentAuthData(os.urandom(64), os.urandom(32))
    tag = None if external else os.urandom(32)
    return MLSMessage(PublicMessage(content, auth, tag)).encode()


def proposal(group_id: bytes, epoch: int, leaf_index: int = 0, removed: int = 1) -> bytes:
    content = FramedContent(
        group_id, epoch, Sender.member(leaf_index), b"", ContentType.proposal,
        proposal=Proposal(Remove(removed)),
    )
    auth = FramedContentAuthData(os.urandom(64))
    return MLSMessage(PublicMessage(content, auth, os.urandom(32))).encode()


def application(group_id: bytes, epoch: int, size: int = 64) -> bytes:
    return MLSMessage(
        PrivateMessage(group_id, epoch, ContentType.application, b"", os.urandom(32),
                       os.urandom(size))
    ).encode()


def private_commit(group_id: bytes, epoch: int) -> bytes:
    return MLSMessage(
        PrivateMessage(group_id, epoch, ContentType.commit, b"", os.urandom(32), os.urandom(64))
    ).encode()


def welcome(refs: list[bytes], suite: int = 1) -> bytes:
    secrets = [EncryptedGroupSecrets(r, HPKECiphertext(os.urandom(32), os.urandom(48)))
               for r in refs]
    return MLSMessage(Welcome(suite, secrets, os.urandom(100))).encode()


def group_info(group_id: bytes, epoch: int, suite: int = 1) -> bytes:
    ctx = GroupContext(suite, group_id, epoch, os.urandom(32), os.urandom(32))
    return MLSMessage(GroupInfo(ctx, [], os.urandom(32), 0, os.urandom(64))).encode()
