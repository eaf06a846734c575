"""The safety code: equal for the members of one epoch, different across epochs and groups."""

from __future__ import annotations

import hashlib
import re

import pytest

from conclave.safety import SAFETY_LABEL, safety_code
from mls import Client, Group


def test_format_and_derivation() -> None:
    code = safety_code(b"\x01" * 32)
    assert re.fullmatch(r"\d{5} \d{5} \d{5} \d{5}", code)
    digest = hashlib.sha256(SAFETY_LABEL + b"\x01" * 32).digest()
    expected = " ".join(
        f"{int.from_bytes(digest[5 * i : 5 * i + 5], 'big') % 100000:05d}" for i in range(4)
    )
    assert code == expected


def test_empty_authenticator_is_refused() -> None:
    with pytest.raises(ValueError):
        safety_code(b"")


def test_members_of_an_epoch_agree_and_epochs_differ() -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, b"g")
    r = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    assert r.welcome is not None
    gb = Group.join(bob, r.welcome)
    first = safety_code(ga.epoch_authenticator)
    assert safety_code(gb.epoch_authenticator) == first
    r = gb.update()
    gb.merge_pending_commit()
    ga.process(r.commit)
    second = safety_code(ga.epoch_authenticator)
    assert safety_code(gb.epoch_authenticator) == second
    assert second != first
    # Another group (same members, fresh secrets) has another code.
    other = Group.create(alice, b"g")
    assert safety_code(other.epoch_authenticator) not in (first, second)
