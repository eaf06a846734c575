"""Secret lifetimes in a group (RFC 9420 §9.2): each secret is gone from the group as soon as the
RFC allows. Every secret a step derives is recorded (by wrapping the functions that derive it) and
then looked for among every byte string the group object can still reach."""

from __future__ import annotations

from typing import Any

import pytest

import mls.group_commit
import mls.group_receive
import mls.secret_tree
from mls.client import Client
from mls.crypto import Crypto
from mls.errors import SecretReuseError, ValidationError
from mls.group import Group
from mls.key_package import LeafNodeSource
from mls.key_schedule import EpochSecrets
from mls.leaf_validation import resign_leaf_node, verify_leaf_signature
from mls.treekem import ProcessedUpdatePath, UpdatePathResult

from .test_group import make_group, same_epoch

# Kept on purpose beyond their epoch: resumption PSKs of the last epochs (§8.6).
_KEPT = {"resumption_psk"}


def reachable_bytes(root: object) -> set[bytes]:
    """Every bytes value reachable from `root` through attributes, slots, containers and the
    closures of functions (a lazily built value must not keep a superseded epoch alive)."""
    seen: set[int] = set()
    found: set[bytes] = set()
    stack: list[Any] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, Crypto | type):
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | bytearray):
            found.add(bytes(obj))
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif isinstance(obj, str | int | float | bool) or obj is None:
            continue
        elif callable(obj) and hasattr(obj, "__code__"):
            stack.extend(c.cell_contents for c in obj.__closure__ or ())
            stack.append(getattr(obj, "__self__", None))
        elif hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # bound method
            stack.append(obj.__self__)
            stack.append(obj.__func__)
        else:
            for cls in type(obj).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(obj, name):
                        stack.append(getattr(obj, name))
            stack.extend(getattr(obj, "__dict__", {}).values())
    return found


class Recorder:
    """Records the secrets derived while it is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.epoch_secrets: list[dict[str, bytes]] = []
        self.path_secrets: list[bytes] = []
        original = EpochSecrets.__init__

        def init(obj: EpochSecrets, crypto: Crypto, secrets: dict[str, bytes]) -> None:
            original(obj, crypto, secrets)
            self.epoch_secrets.append(dict(secrets))

        monkeypatch.setattr(EpochSecrets, "__init__", init)
        create = mls.group_commit.create_update_path
        process = mls.group_receive.process_update_path

        def created(*args: Any, **kwargs: Any) -> UpdatePathResult:
            out = create(*args, **kwargs)
            self.path_secrets += [out.commit_secret, *out.path_secrets.values()]
            return out

        def processed(*args: Any, **kwargs: Any) -> ProcessedUpdatePath:
            out = process(*args, **kwargs)
            self.path_secrets += [out.commit_secret, out.path_secret]
            return out

        monkeypatch.setattr(mls.group_commit, "create_update_path", created)
        monkeypatch.setattr(mls.group_receive, "process_update_path", processed)

    def derived(self, *names: str) -> set[bytes]:
        return {v for s in self.epoch_secrets for n, v in s.items() if n in names}


def assert_gone(group: Group, secrets: set[bytes]) -> None:
    assert secrets
    leaked = secrets & reachable_bytes(group)
    assert not leaked, f"{len(leaked)} secret(s) still held"


def epoch_secrets_of(group: Group) -> set[bytes]:
    return {v for n, v in group._state.secrets._secrets.items() if n not in _KEPT}


def test_one_time_secrets_are_gone_after_create_join_commit_and_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rec = Recorder(monkeypatch)
    alice, bob, carol = Client(b"alice"), Client(b"bob"), Client(b"carol")
    ga = Group.create(alice)
    result = ga.add([bob.key_package(), carol.key_package()])
    ga.merge_pending_commit()
    assert result.welcome is not None
    gb, gc = Group.join(bob, result.welcome), Group.join(carol, result.welcome)
    update = gb.update()
    gb.merge_pending_commit()
    ga.process(update.commit)
    gc.process(update.commit)
    same_epoch(ga, gb, gc)
    one_time = rec.derived("joiner_secret", "welcome_secret", "encryption_secret")
    assert len(one_time) >= 9  # three epochs, each with its joiner, welcome and encryption
    for g in (ga, gb, gc):
        # The current epoch's encryption_secret is its secret tree's root secret (§9), kept
        # there until a first message expands the root.
        root = set(g._state.secret_tree._nodes.values())
        assert_gone(g, (one_time | set(rec.path_secrets)) - root)
        for name in ("encryption_secret", "joiner_secret", "welcome_secret"):
            with pytest.raises(SecretReuseError):
                getattr(g._state.secrets, name)
    # The groups still work: the secret tree holds what encryption_secret derived.
    assert gc.process(ga.encrypt_application(b"hi")).data == b"hi"


@pytest.mark.parametrize("how", ["merge", "process", "echo"])
def test_superseded_epoch_secrets_are_deleted(how: str) -> None:
    ga, gb = make_group(2)
    gb.process(ga.encrypt_application(b"a key in the secret tree"))
    old_a, old_b = epoch_secrets_of(ga), epoch_secrets_of(gb)
    assert ga._state.secrets.init_secret in old_a
    result = ga.update()
    if how == "echo":
        ga.process(result.commit)
    else:
        ga.merge_pending_commit()
    gb.process(result.commit)
    same_epoch(ga, gb)
    assert_gone(ga, old_a)
    assert_gone(gb, old_b)


def test_superseded_state_objects_are_emptied() -> None:
    """Whoever still holds the old epoch's state finds no secret in it."""
    ga, gb = make_group(2)
    old = gb._state
    gb.process(ga.encrypt_application(b"m"))
    ga.process(gb.encrypt_application(b"n"))
    result = ga.update()
    ga.merge_pending_commit()
    gb.process(result.commit)
    assert not any(old.secrets.has(n) for n in ("init_secret", "exporter_secret"))
    assert old.secret_tree.retained_nodes == []
    with pytest.raises(SecretReuseError):
        old.secret_tree.next_key(0, mls.secret_tree.RatchetType.APPLICATION)


def test_discarded_and_overtaken_commits_leave_no_secrets() -> None:
    ga, gb = make_group(2)
    mine = ga.update()
    pending = ga._pending
    assert pending is not None
    pending_secrets = {v for n, v in pending.state.secrets._secrets.items() if n not in _KEPT}
    ga.discard_pending_commit()
    assert_gone(ga, pending_secrets)
    # An own Commit overtaken by another member's: the pending epoch's secrets go with it.
    ga.update()
    pending = ga._pending
    assert pending is not None
    pending_secrets = {v for n, v in pending.state.secrets._secrets.items() if n not in _KEPT}
    theirs = gb.update()
    gb.merge_pending_commit()
    ga.process(theirs.commit)
    assert_gone(ga, pending_secrets)
    same_epoch(ga, gb)
    assert mine.commit != theirs.commit


def test_group_info_of_an_old_commit_result_is_still_readable() -> None:
    """A CommitResult builds its GroupInfo lazily: it must not rely on epoch secrets that are
    deleted once the epoch is over."""
    ga, gb = make_group(2)
    first = ga.update()
    ga.merge_pending_commit()
    gb.process(first.commit)
    second = ga.update()
    ga.merge_pending_commit()
    gb.process(second.commit)
    joiner, commit = Group.join_external(Client(b"late"), first.group_info)
    assert joiner.epoch == 3  # joined from epoch 2's GroupInfo; that group moved on
    with pytest.raises(ValidationError):
        ga.process(commit)  # a commit for an old epoch is refused, and nothing else broke
    joiner, commit = Group.join_external(Client(b"late2"), second.group_info)
    ga.process(commit)
    gb.process(commit)
    same_epoch(ga, gb, joiner)


def test_group_signs_with_a_key_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client parses its signature key once; sending never re-parses it."""
    ga, gb = make_group(2)
    parsed: list[object] = []
    original = Crypto._signature_private_key

    def counting(self: Crypto, private: Any) -> Any:
        if isinstance(private, bytes):
            parsed.append(private)
        return original(self, private)

    monkeypatch.setattr(Crypto, "_signature_private_key", counting)
    for i in range(3):
        gb.process(ga.encrypt_application(b"%d" % i))
    gb.process(ga.propose_update())
    result = ga.commit()
    ga.merge_pending_commit()
    gb.process(result.commit)
    ga.group_info()
    assert parsed == []


def test_resigned_leaf_nodes() -> None:
    """One function re-signs a member's leaf for Update proposals and UpdatePaths."""
    (ga,) = make_group(1)
    crypto = ga.client.crypto
    leaf = ga._state.tree.leaf_node(0)
    assert leaf is not None
    _, enc_pub = crypto.hpke_key_pair()
    signer = ga.client.signing_key
    update = resign_leaf_node(
        crypto, leaf, encryption_key=enc_pub, source=LeafNodeSource.update,
        parent_hash=b"ignored", signature_priv=signer, group_id=ga.group_id, leaf_index=0,
    )
    assert update.lifetime is None and update.parent_hash is None
    assert update.encryption_key == enc_pub
    verify_leaf_signature(crypto, update, ga.group_id, 0, "update")
    with pytest.raises(ValidationError):
        verify_leaf_signature(crypto, update, ga.group_id, 1, "wrong leaf")
    commit = resign_leaf_node(
        crypto, leaf, encryption_key=enc_pub, source=LeafNodeSource.commit,
        parent_hash=b"\x01" * 32, signature_priv=signer, group_id=ga.group_id, leaf_index=0,
    )
    assert commit.parent_hash == b"\x01" * 32
    verify_leaf_signature(crypto, commit, ga.group_id, 0, "commit")
    with pytest.raises(ValidationError):
        resign_leaf_node(
            crypto, leaf, encryption_key=enc_pub, source=LeafNodeSource.key_package,
            parent_hash=None, signature_priv=signer, group_id=ga.group_id, leaf_index=0,
        )
