"""Deletion in practice (RFC 9420 §9.2, §7.5, §12.4.2): what a group, the objects it hands out and
its saved state (`Group.to_bytes`) still hold once the RFC says a secret is gone.
"""

from __future__ import annotations

import pytest

from mls.client import Client
from mls.errors import MLSError, SecretReuseError, ValidationError
from mls.group import Group

from .test_group import make_group, same_epoch
from .test_secret_lifetime import reachable_bytes


def private_keys(group: Group) -> set[bytes]:
    """The HPKE private keys of the member's leaf and of the parent nodes it knows."""
    private = group._state.private_state
    assert private is not None
    return {private.leaf.private, *(pair.private for pair in private.path.values())}


def epoch_secrets(group: Group, *, but: tuple[str, ...] = ("resumption_psk",)) -> set[bytes]:
    """The secrets of the member's current epoch but `but` (by default the resumption PSK,
    which §8.6 lets a group keep for some epochs)."""
    return {v for n, v in group._state.secrets._secrets.items() if n not in but}


def test_the_walk_follows_closures() -> None:
    secret = b"\x42" * 32
    assert secret in reachable_bytes(lambda: secret)


# --- §12.4.2: a removed member "SHOULD promptly delete its group state and secret tree" -------


def test_removed_member_deletes_its_secrets_and_keys() -> None:
    ga, gb, gc = make_group(3)
    gc.process(ga.encrypt_application(b"a key in the secret tree"))
    late = gb.encrypt_application(b"sent before the removal")
    secrets = epoch_secrets(gc, but=("epoch_authenticator",))
    keys = private_keys(gc)
    assert "init_secret" in gc._state.secrets._secrets and keys
    removal = ga.remove([gc.leaf_index])
    ga.merge_pending_commit()
    gb.process(removal.commit)
    assert gc.process(removal.commit).removed
    assert not gc.active
    for where in (reachable_bytes(gc), {gc.to_bytes()}):
        leaked = {s for s in secrets | keys if any(s in b for b in where)}
        assert not leaked, f"{len(leaked)} secret(s) kept by the removed member"
    assert gc._state.secret_tree.retained_nodes == []
    assert gc._state.private_state is None
    # It can do nothing with the group, not even open a message of its last epoch.
    with pytest.raises(MLSError):
        gc.process(late)
    with pytest.raises(SecretReuseError):
        gc.export_secret(b"label", b"", 16)
    with pytest.raises(ValidationError):
        gc.resumption_psk()
    # What it kept is not a key: the epoch authenticator to compare out of band, and the
    # public state. Its saved state still loads.
    restored = Group.from_bytes(gc.to_bytes())
    assert not restored.active and restored.epoch == gc.epoch
    assert restored.epoch_authenticator == gc.epoch_authenticator
    same_epoch(ga, gb)


# --- §7.5 / §9.2: a CommitResult must not keep its epoch's keys once the epoch is over ---------


@pytest.mark.parametrize("how", ["update", "add"])
def test_commit_result_keeps_no_keys_of_its_epoch(how: str) -> None:
    ga, gb = make_group(2)
    if how == "add":
        result = ga.add([Client(b"late").key_package()])
    else:
        result = ga.update()
    ga.merge_pending_commit()
    gb.process(result.commit)
    keys, secrets = private_keys(ga), epoch_secrets(ga)
    nxt = ga.update()
    ga.merge_pending_commit()
    gb.process(nxt.commit)
    assert not keys & reachable_bytes(ga)
    # The result outlives its epoch: it holds none of its keys, GroupInfo read or not.
    assert not (keys | secrets) & reachable_bytes(result)
    assert result.group_info
    assert not (keys | secrets) & reachable_bytes(result)


def test_group_info_built_late_equals_the_one_built_at_once() -> None:
    """The lazily built GroupInfo of a CommitResult and the pending Commit's are one value."""
    ga, gb = make_group(2)
    result = ga.update()
    pending = ga._pending
    assert pending is not None
    assert pending.group_info == result.group_info
    ga.merge_pending_commit()
    gb.process(result.commit)
    joiner, commit = Group.join_external(Client(b"x"), result.group_info)
    ga.process(commit)
    gb.process(commit)
    same_epoch(ga, gb, joiner)


def test_superseded_state_holds_no_private_keys() -> None:
    """Whoever still holds a superseded epoch's state finds none of its tree keys in it."""
    ga, gb = make_group(2)
    old = ga._state
    gb.process(ga.propose_update())
    keys = private_keys(ga) | set(old.own_update_privs.values())
    assert len(keys) == 2
    result = gb.commit()
    gb.merge_pending_commit()
    ga.process(result.commit)
    assert old.private_state is None and old.own_update_privs == {}
    assert old.resumption_psks == {}
    assert not keys & reachable_bytes(old)
    # The new leaf key came from the committed Update; the old one is gone everywhere.
    assert not (keys - private_keys(ga)) & reachable_bytes(ga)
