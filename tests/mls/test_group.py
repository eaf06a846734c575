"""The Group state machine end to end: several members, every cipher suite, all-or-nothing."""

from __future__ import annotations

import pytest

from mls import CipherSuite
from mls.client import Client
from mls.errors import MLSError, SecretReuseError, ValidationError
from mls.framing import MLSMessage, PublicMessage
from mls.group import Group
from mls.proposals import PreSharedKeyID, ResumptionPSKUsage
from mls.secret_tree import RatchetWindow

SUITES = [int(s) for s in CipherSuite]


def snapshot(g: Group) -> tuple[object, ...]:
    """Everything observable about a group's state, to check that a failure changed nothing."""
    st = g._state
    return (
        g.epoch,
        g.epoch_authenticator,
        g.ratchet_tree(),
        g.group_context.encode(),
        st.private_state.leaf if st.private_state else None,
        sorted(st.private_state.path.items()) if st.private_state else None,
        sorted(st.proposals),
        st.interim_transcript_hash,
        g.export_secret(b"snap", b"", 16),
        g.has_pending_commit,
        ratchet_positions(g),
    )


def ratchet_positions(g: Group) -> list[tuple[int, int, tuple[int, ...], int, tuple[int, ...]]]:
    """Each sender ratchet's next generation and kept keys (a ratchet derived but never used
    is the same as one not derived yet)."""
    out = []
    for leaf, (hs, app) in sorted(g._state.secret_tree._ratchets.items()):
        entry = (
            leaf,
            hs.next_generation,
            tuple(hs.retained_generations),
            app.next_generation,
            tuple(app.retained_generations),
        )
        if entry[1:] != (0, (), 0, ()):
            out.append(entry)
    return out


def same_epoch(*groups: Group) -> None:
    first = groups[0]
    for g in groups[1:]:
        assert g.epoch == first.epoch
        assert g.epoch_authenticator == first.epoch_authenticator
        assert g.group_context == first.group_context
        assert g.export_secret(b"label", b"ctx", 32) == first.export_secret(b"label", b"ctx", 32)
        assert g.ratchet_tree() == first.ratchet_tree()
    for g in groups:
        # The cached node encodings give exactly the tree's own encoding.
        assert g.ratchet_tree() == g.tree.encode()


def make_group(n: int, suite: int = 1, **kwargs: object) -> list[Group]:
    """A group of `n` members built by the first one, all at the same epoch."""
    clients = [Client(f"member-{i}".encode(), suite) for i in range(n)]
    creator = Group.create(clients[0], **kwargs)  # type: ignore[arg-type]
    if n == 1:
        return [creator]
    result = creator.add([c.key_package() for c in clients[1:]])
    creator.merge_pending_commit()
    assert result.welcome is not None
    handshake = kwargs.get("handshake", "public")
    joined = [Group.join(c, result.welcome, handshake=handshake) for c in clients[1:]]  # type: ignore[arg-type]
    groups = [creator, *joined]
    same_epoch(*groups)
    return groups


def deliver(message: bytes, groups: list[Group]) -> None:
    for g in groups:
        g.process(message)


@pytest.mark.parametrize("suite", SUITES, ids=[f"suite{s}" for s in SUITES])
def test_lifecycle_every_suite(suite: int) -> None:
    alice, bob, carol = (Client(name, suite) for name in (b"alice", b"bob", b"carol"))
    ga = Group.create(alice, b"group-" + bytes([suite]))
    assert ga.epoch == 0 and ga.leaf_index == 0 and ga.group_id == b"group-" + bytes([suite])
    result = ga.add([bob.key_package(), carol.key_package()])
    assert ga.epoch == 0  # pending until merged
    ga.merge_pending_commit()
    assert ga.epoch == 1
    assert result.welcome is not None
    gb = Group.join(bob, result.welcome)
    gc = Group.join(carol, result.welcome)
    assert [m.identity for m in ga.members] == [b"alice", b"bob", b"carol"]
    assert (gb.leaf_index, gc.leaf_index) == (1, 2)
    same_epoch(ga, gb, gc)

    update = gb.update()
    processed = ga.process(update.commit)
    assert processed.kind == "commit" and processed.sender == 1
    gc.process(update.commit)
    own = gb.process(update.commit)  # the DS echoes bob's own commit back
    assert own.own
    same_epoch(ga, gb, gc)
    assert ga.epoch == 2

    removal = gc.remove([1])
    gc.merge_pending_commit()
    ga.process(removal.commit)
    assert gb.process(removal.commit).removed
    assert not gb.active
    same_epoch(ga, gc)
    assert [m.leaf_index for m in ga.members] == [0, 2]

    message = ga.encrypt_application(b"hello", b"aad")
    received = gc.process(message)
    assert (received.kind, received.data, received.sender) == ("application", b"hello", 0)
    assert received.authenticated_data == b"aad"
    reply = gc.encrypt_application(b"hi alice")
    assert ga.process(reply).data == b"hi alice"


def test_removed_member_cannot_follow_or_send() -> None:
    ga, gb, gc = make_group(3)
    removal = ga.remove([2])
    ga.merge_pending_commit()
    gb.process(removal.commit)
    assert gc.process(removal.commit).removed
    with pytest.raises(ValidationError):
        gc.encrypt_application(b"x")
    # Messages of the new epoch are not for the removed member.
    with pytest.raises(MLSError):
        gc.process(ga.encrypt_application(b"secret"))


def test_exporter_differs_per_epoch_and_label() -> None:
    ga, gb = make_group(2)
    first = ga.export_secret(b"sframe", b"", 32)
    assert ga.export_secret(b"other", b"", 32) != first
    assert len(ga.export_secret(b"sframe", b"", 16)) == 16
    update = ga.update()
    ga.merge_pending_commit()
    gb.process(update.commit)
    assert ga.export_secret(b"sframe", b"", 32) != first
    same_epoch(ga, gb)


def test_proposals_by_reference_then_commit() -> None:
    ga, gb, gc = make_group(3)
    dave = Client(b"dave", 1)
    p_update = gb.propose_update()
    p_add = gc.propose_add(dave.key_package())
    p_remove = ga.propose_remove(2)
    for p in (p_update, p_add, p_remove):
        for g in (ga, gb, gc):
            assert g.process(p).kind == "proposal"
    result = ga.commit()
    assert result.welcome is not None
    ga.merge_pending_commit()
    gb.process(result.commit)
    assert gc.process(result.commit).removed
    gd = Group.join(dave, result.welcome)
    same_epoch(ga, gb, gd)
    assert sorted(m.identity for m in ga.members) == [b"dave", b"member-0", b"member-1"]


def test_discarded_commit_leaves_epoch_and_allows_processing_the_winner() -> None:
    ga, gb = make_group(2)
    before = snapshot(ga)
    ga.update()
    ga.discard_pending_commit()
    assert snapshot(ga) == before
    winner = gb.update()
    gb.merge_pending_commit()
    ga.update()  # a competing commit, refused by the DS
    ga.discard_pending_commit()
    ga.process(winner.commit)
    same_epoch(ga, gb)


def test_processing_another_commit_drops_the_pending_one() -> None:
    ga, gb = make_group(2)
    ga.update()
    winner = gb.update()
    gb.merge_pending_commit()
    ga.process(winner.commit)
    assert not ga.has_pending_commit
    same_epoch(ga, gb)


def test_application_data_refused_while_commit_pending() -> None:
    ga, _ = make_group(2)
    ga.update()
    with pytest.raises(ValidationError):
        ga.encrypt_application(b"x")


def test_private_handshake_messages() -> None:
    ga, gb, gc = make_group(3, handshake="private")
    commit = gb.update().commit
    assert MLSMessage.decode(commit).wire_format.name == "mls_private_message"
    gb.merge_pending_commit()
    deliver(commit, [ga, gc])
    same_epoch(ga, gb, gc)
    proposal = gc.propose_remove(0)
    deliver(proposal, [ga, gb])
    result = gb.commit()
    gb.merge_pending_commit()
    gc.process(result.commit)
    assert ga.process(result.commit).removed
    same_epoch(gb, gc)


def test_join_with_ratchet_tree_out_of_band() -> None:
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, ratchet_tree_extension=False)
    result = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    assert result.welcome is not None
    with pytest.raises(ValidationError):
        Group.join(bob, result.welcome)
    gb = Group.join(bob, result.welcome, ga.ratchet_tree())
    same_epoch(ga, gb)


def test_external_join_and_resync() -> None:
    ga, gb = make_group(2)
    carol = Client(b"carol")
    gc, commit = Group.join_external(carol, ga.group_info())
    processed = ga.process(commit)
    assert processed.sender is None and processed.sender_type.name == "new_member_commit"
    gb.process(commit)
    same_epoch(ga, gb, gc)
    assert gc.leaf_index == 2
    # Carol lost her state: she rejoins, removing her old leaf in the same commit.
    gc2, commit2 = Group.join_external(carol, gb.group_info(), remove_leaf=2)
    deliver(commit2, [ga, gb])
    same_epoch(ga, gb, gc2)
    assert [m.identity for m in ga.members] == [b"member-0", b"member-1", b"carol"]


def test_external_join_with_tree_out_of_band() -> None:
    ga, gb = make_group(2)
    info = ga.group_info(with_ratchet_tree=False)
    with pytest.raises(ValidationError):
        Group.join_external(Client(b"carol"), info)
    gc, commit = Group.join_external(Client(b"carol"), info, ga.ratchet_tree())
    deliver(commit, [ga, gb])
    same_epoch(ga, gb, gc)


def test_external_psk_proposal() -> None:
    ga, gb, gc = make_group(3)
    for g in (ga, gb, gc):
        g.add_external_psk(b"psk-1", b"\x07" * 32)
    proposal = gb.propose_psk(b"psk-1")
    deliver(proposal, [ga, gc])
    result = gc.commit()
    gc.merge_pending_commit()
    deliver(result.commit, [ga, gb])
    same_epoch(ga, gb, gc)


def test_missing_psk_refused_and_state_unchanged() -> None:
    ga, gb = make_group(2)
    ga.add_external_psk(b"psk-1", b"\x07" * 32)
    gb.add_external_psk(b"psk-1", b"\x07" * 32)
    proposal = ga.propose_psk(b"psk-1")
    gb.process(proposal)
    result = ga.commit()
    ga.merge_pending_commit()
    del gb._external_psks[b"psk-1"]
    before = snapshot(gb)
    with pytest.raises(ValidationError, match="PSK"):
        gb.process(result.commit)
    assert snapshot(gb) == before
    gb.add_external_psk(b"psk-1", b"\x07" * 32)
    gb.process(result.commit)
    same_epoch(ga, gb)


def test_resumption_psk_of_an_earlier_epoch() -> None:
    from mls.proposals import PreSharedKey, PreSharedKeyID, Proposal, ResumptionPSKUsage

    ga, gb = make_group(2)
    epoch = ga.epoch
    update = ga.update()
    ga.merge_pending_commit()
    gb.process(update.commit)
    pid = PreSharedKeyID.resumption(
        ResumptionPSKUsage.application, ga.group_id, epoch, ga.crypto.random_secret()
    )
    result = ga.commit([Proposal(PreSharedKey(pid))])
    ga.merge_pending_commit()
    gb.process(result.commit)
    same_epoch(ga, gb)


def test_reinit_then_new_group() -> None:
    ga, gb, gc = make_group(3)
    result = gb.reinit(group_id=b"reinit-group")
    gb.merge_pending_commit()
    deliver(result.commit, [ga, gc])
    same_epoch(ga, gb, gc)
    for g in (ga, gb, gc):
        assert not g.active and g.pending_reinit is not None
    with pytest.raises(ValidationError):
        ga.encrypt_application(b"x")
    psk = {(ga.group_id, ga.epoch): ga.resumption_psk()}
    new_b, created = gb.reinit_group(None, [ga._client.key_package(), gc._client.key_package()])
    assert new_b.group_id == b"reinit-group" and new_b.epoch == 1
    assert created.welcome is not None
    with pytest.raises(ValidationError, match="PSK"):
        Group.join(ga._client, created.welcome)
    # §12.4.3.1: the PSK alone does not do, the checks against the old group need it.
    with pytest.raises(ValidationError, match="pass the group it continues as `previous`"):
        Group.join(ga._client, created.welcome, resumption_psks=psk)
    new_a = Group.join(ga._client, created.welcome, previous=ga)
    new_c = Group.join(gc._client, created.welcome, previous=gc)  # with §12.4.3.1's checks
    same_epoch(new_a, new_b, new_c)


def test_branch() -> None:
    ga, gb, gc = make_group(3)
    sub, created = ga.branch([gb._client.key_package()], group_id=b"side")
    assert created.welcome is not None
    with pytest.raises(ValidationError, match="PSK"):
        Group.join(gb._client, created.welcome)
    sub_b = Group.join(gb._client, created.welcome, previous=gb)
    same_epoch(sub, sub_b)
    assert sub.group_id == b"side" and len(sub.members) == 2


def test_reinit_welcome_checked_against_previous_group() -> None:
    ga, gb = make_group(2)
    result = ga.reinit(group_id=b"planned")
    ga.merge_pending_commit()
    gb.process(result.commit)
    # A Welcome for a group other than the ReInit announced is refused.
    rogue = Group.create(ga.client, b"not-planned")
    rogue.add_resumption_psk(ga.group_id, ga.epoch, ga.resumption_psk())
    pid = PreSharedKeyID.resumption(
        ResumptionPSKUsage.reinit, ga.group_id, ga.epoch, ga.crypto.random_secret()
    )
    kp = MLSMessage.decode(gb.client.key_package()).key_package
    created = rogue._commit_with_special_psk(pid, [kp])
    assert created.welcome is not None
    with pytest.raises(ValidationError, match="ReInit"):
        Group.join(gb.client, created.welcome, previous=gb)


def test_group_info_and_tree_are_mls_structures() -> None:
    ga, gb = make_group(2)
    result = gb.update()
    gb.merge_pending_commit()
    ga.process(result.commit)
    # Ed25519 signatures are deterministic: the lazily built GroupInfo is the epoch's.
    assert result.group_info == gb.group_info()
    assert MLSMessage.decode(result.group_info).group_info.group_context == ga.group_context
    info = MLSMessage.decode(ga.group_info())
    assert info.group_info.group_context == ga.group_context
    from mls.tree_nodes import decode_ratchet_tree

    assert len([n for n in decode_ratchet_tree(ga.ratchet_tree()) if n is not None]) == 3


def test_application_replay_refused() -> None:
    ga, gb = make_group(2)
    message = ga.encrypt_application(b"once")
    gb.process(message)
    before = snapshot(gb)
    with pytest.raises(SecretReuseError):
        gb.process(message)
    assert snapshot(gb) == before


def test_wrong_epoch_and_group_refused() -> None:
    ga, gb = make_group(2)
    old = ga.encrypt_application(b"old epoch")
    update = ga.update()
    ga.merge_pending_commit()
    gb.process(update.commit)
    before = snapshot(gb)
    with pytest.raises(ValidationError, match="epoch"):
        gb.process(old)
    other = make_group(2)
    with pytest.raises(ValidationError, match="another group"):
        gb.process(other[0].encrypt_application(b"x"))
    assert snapshot(gb) == before


def test_tampered_commits_rejected_state_unchanged() -> None:
    ga, gb, gc = make_group(3)
    result = ga.update()
    commit = result.commit
    before = snapshot(gb)
    # Flip one byte at many positions: signature, membership tag, path keys, ciphertexts.
    for pos in range(4, len(commit), max(1, len(commit) // 97)):
        tampered = bytearray(commit)
        tampered[pos] ^= 0x01
        with pytest.raises(MLSError):
            gb.process(bytes(tampered))
        assert snapshot(gb) == before
    ga.merge_pending_commit()
    gb.process(commit)
    gc.process(commit)
    same_epoch(ga, gb, gc)


def test_tampered_application_rejected_state_unchanged() -> None:
    ga, gb = make_group(2)
    message = ga.encrypt_application(b"payload")
    before = snapshot(gb)
    for pos in range(4, len(message)):
        tampered = bytearray(message)
        tampered[pos] ^= 0x80
        with pytest.raises(MLSError):
            gb.process(bytes(tampered))
    assert snapshot(gb) == before
    assert gb.process(message).data == b"payload"


def test_application_data_as_public_message_refused() -> None:
    from mls.framing import ContentType, FramedContent, Sender, WireFormat
    from mls.group_framing import membership_tag, sign_content

    ga, gb = make_group(2)
    st = ga._state
    content = FramedContent(
        ga.group_id, ga.epoch, Sender.member(0), b"", ContentType.application,
        application_data=b"x",
    )
    ac = sign_content(
        ga.crypto, ga._client.signature_priv, WireFormat.mls_public_message, content, st.context
    )
    tag = membership_tag(ga.crypto, st.secrets.membership_key, ac, st.context)
    message = MLSMessage(PublicMessage(content, ac.auth, tag)).encode()
    with pytest.raises(ValidationError, match="PrivateMessage"):
        gb.process(message)


def test_unknown_welcome_refused() -> None:
    (ga,) = make_group(1)
    bob = Client(b"bob")
    result = ga.add([bob.key_package()])
    assert result.welcome is not None
    with pytest.raises(ValidationError, match="not addressed"):
        Group.join(Client(b"eve"), result.welcome)
    with pytest.raises(MLSError):
        Group.join(Client(b"p256", 2), result.welcome)


def test_leave_by_self_remove_proposal() -> None:
    ga, gb, gc = make_group(3)
    proposal = gc.leave()
    ga.process(proposal)
    gb.process(proposal)
    assert [p.proposal.proposal_type.name for p in ga.pending_proposals] == ["remove"]
    # The leaver cannot commit its own removal: its commit leaves the proposal out.
    own = gc.commit()
    gc.discard_pending_commit()
    assert MLSMessage.decode(own.commit).public_message.content.commit.proposals == []  # type: ignore[union-attr]
    result = ga.commit()
    ga.merge_pending_commit()
    gb.process(result.commit)
    assert gc.process(result.commit).removed
    same_epoch(ga, gb)
    assert [m.leaf_index for m in ga.members] == [0, 1]


def test_ratchet_window_is_a_group_setting() -> None:
    """The out-of-order window (§15.3) is chosen per group, kept across epochs and restarts."""
    window = RatchetWindow(out_of_order_tolerance=2, maximum_forward_distance=2)
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, ratchet_window=window)
    result = ga.add([bob.key_package()])
    ga.merge_pending_commit()
    assert result.welcome is not None
    gb = Group.join(bob, result.welcome, ratchet_window=window)
    messages = [ga.encrypt_application(b"%d" % i) for i in range(4)]
    before = snapshot(gb)
    with pytest.raises(ValidationError, match="ahead"):
        gb.process(messages[3])  # 3 generations ahead of the next expected; the limit is 2
    assert snapshot(gb) == before
    assert gb.process(messages[2]).data == b"2"
    with pytest.raises(SecretReuseError):
        gb.process(messages[0])  # more than 2 generations behind: its key is gone
    assert gb.process(messages[1]).data == b"1"
    update = ga.update()
    ga.merge_pending_commit()
    gb.process(update.commit)
    restored = Group.from_bytes(gb.to_bytes())
    assert restored.ratchet_window == window
    later = [ga.encrypt_application(b"x") for _ in range(4)]
    with pytest.raises(ValidationError, match="ahead"):
        restored.process(later[3])
