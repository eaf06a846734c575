"""External senders (§12.1.8), new-member proposals, required_capabilities (§11.1)."""

from __future__ import annotations

import pytest

from mls.client import Client
from mls.credential import Credential
from mls.errors import MLSError, ValidationError
from mls.extensions import ExternalSender, RequiredCapabilities, external_senders_extension
from mls.framing import MLSMessage
from mls.group import Group, external_proposal
from mls.proposals import Add, Proposal, Remove, Update

from .test_group import same_epoch, snapshot


def group_with_external_sender() -> tuple[list[Group], Client]:
    server = Client(b"server")
    ext = external_senders_extension([ExternalSender(server.signature_key, Credential.basic(b"ds"))])
    alice, bob = Client(b"alice"), Client(b"bob")
    ga = Group.create(alice, extensions=[ext])
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    return [ga, Group.join(bob, welcome)], server


def test_external_sender_remove_and_add() -> None:
    (ga, gb), server = group_with_external_sender()
    carol = Client(b"carol")
    kp = MLSMessage.decode(carol.key_package()).key_package
    for proposal in (Proposal(Add(kp)), Proposal(Remove(1))):
        message = external_proposal(1, server.signature_priv, 0, ga.group_id, ga.epoch, proposal)
        assert ga.process(message).sender_type.name == "external"
        gb.process(message)
    result = ga.commit()
    ga.merge_pending_commit()
    assert gb.process(result.commit).removed
    assert result.welcome is not None
    gc = Group.join(carol, result.welcome)
    same_epoch(ga, gc)


def test_external_proposal_with_wrong_key_or_index_rejected() -> None:
    (ga, _), server = group_with_external_sender()
    proposal = Proposal(Remove(1))
    before = snapshot(ga)
    with pytest.raises(MLSError, match="signature"):
        ga.process(external_proposal(1, Client(b"x").signature_priv, 0, ga.group_id, ga.epoch, proposal))
    with pytest.raises(ValidationError, match="external sender index"):
        ga.process(external_proposal(1, server.signature_priv, 3, ga.group_id, ga.epoch, proposal))
    assert snapshot(ga) == before
    with pytest.raises(ValidationError):
        external_proposal(1, server.signature_priv, 0, ga.group_id, ga.epoch, Proposal(Update(ga.tree.leaf_node(0))))  # type: ignore[arg-type]


def test_new_member_add_proposal() -> None:
    alice, bob, carol = Client(b"alice"), Client(b"bob"), Client(b"carol")
    ga = Group.create(alice)
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    message = Group.new_member_add_proposal(carol, ga.group_info())
    assert ga.process(message).sender_type.name == "new_member_proposal"
    gb.process(message)
    result = gb.commit()
    gb.merge_pending_commit()
    ga.process(result.commit)
    assert result.welcome is not None
    gc = Group.join(carol, result.welcome)
    same_epoch(ga, gb, gc)


def test_required_capabilities() -> None:
    required = RequiredCapabilities(extension_types=[0x7F01]).to_extension()
    alice = Client(b"alice")
    with pytest.raises(ValidationError, match="required extension"):
        Group.create(alice, extensions=[required])
    ga = Group.create(alice)
    bob = Client(b"bob")
    welcome = ga.add([bob.key_package()]).welcome
    ga.merge_pending_commit()
    assert welcome is not None
    gb = Group.join(bob, welcome)
    # A GroupContextExtensions proposal requiring what members lack is refused by its proposer's
    # committer and by receivers alike.
    gb.process(ga.propose_group_context_extensions([required]))
    before = snapshot(gb)
    with pytest.raises(ValidationError, match="required extension"):
        gb.commit()
    assert snapshot(gb) == before
    gb.discard_pending_commit()
    # A supported requirement (credential type basic) passes and is enforced on later Adds.
    basic = RequiredCapabilities(credential_types=[1]).to_extension()
    gb2 = Group.create(bob)
    result = gb2.commit([], force_path=True)
    gb2.merge_pending_commit()
    assert result.welcome is None
    p = gb2.propose_group_context_extensions([basic])
    r2 = gb2.commit()
    gb2.merge_pending_commit()
    assert gb2.group_context.extensions == [basic]
    assert p and r2.commit
