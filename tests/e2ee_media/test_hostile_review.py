"""Defects found in a hostile review of `e2ee_media`, each pinned by a test that failed before
its fix."""

from __future__ import annotations

import pytest

from e2ee_media.errors import KeyScheduleError
from e2ee_media.header import decode_header
from e2ee_media.mls_keys import MLSKeyManager
from e2ee_media.transform import FrameEncryptor
from tests.e2ee_media.fake_mls import FakeGroup, FakeWorld


def test_a_restored_epoch_is_never_sent_in_so_no_ctr_repeats_after_a_restart() -> None:
    # Before a restart this member sent in epoch 0; the state saved then holds the epoch but
    # not the send CTRs. A fresh key manager restoring that epoch must not count from CTR 0
    # again under the same key: that repeats AES-GCM nonces (keystream and GHASH key exposed).
    world = FakeWorld(members={0, 1})
    before_restart = MLSKeyManager()
    before_restart.update(FakeGroup(world, 0))
    sent = before_restart.encrypt(b"", b"frame sent before the restart")
    assert decode_header(sent)[1] == 0

    after_restart = MLSKeyManager()
    group = FakeGroup(world, 0)
    after_restart.update(group, restored=True)
    with pytest.raises(KeyScheduleError, match="restored"):
        after_restart.encrypt(b"", b"frame sent after the restart")
    out = bytearray()
    with pytest.raises(KeyScheduleError, match="restored"):
        after_restart.encrypt_at(b"", b"frame sent after the restart", out)
    assert after_restart.sframe.send_keys == {}  # no send key was made for the epoch

    # Through a track: the frame is refused (counted), never sealed under the old key.
    encryptor = FrameEncryptor(after_restart, "audio/opus")
    with pytest.raises(KeyScheduleError):
        encryptor.encrypt_frame(b"\x78voice")
    assert encryptor.stats.encrypt_failures == 1

    # A newer epoch (a commit) gives fresh keys: sending works again, and peers open it.
    world.commit()
    group.sync()
    after_restart.update(group)
    bob_group = FakeGroup(world, 1)
    bob = MLSKeyManager()
    bob.update(bob_group)
    assert bob.decrypt(b"", after_restart.encrypt(b"", b"after the commit")) == b"after the commit"
