"""What the audit report tells an auditor beyond the chain's validity: which commits the members
are known to have taken, requests left undone, whose keys the names hold, and the limits of what
the service's metadata can show."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from conclave.audit import (
    KnownEpoch,
    LogEntry,
    PendingRemoval,
    audit,
    format_report,
    read_log,
    save_log,
    shown_name,
)
from conclave.errors import AuditFailure
from conclave.safety import key_fingerprint, normalize_fingerprint
from mls import Client, Group
from mls.group_framing import parse_key_package
from mls.proposals import Add, Proposal, Remove
from tests.conclave.test_audit import GID, LogBuilder, _replace, build_log


def started(*members: Client) -> tuple[LogBuilder, Group, Any]:
    """alice's group logged from its first GroupInfo, with `members` added by her first commit."""
    log = LogBuilder()
    ga = Group.create(Client(b"alice"), GID)
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    added = ga.add([m.key_package() for m in members])
    log.add("commit", 0, "alice", 1100, added.commit)
    ga.merge_pending_commit()
    return log, ga, added


@pytest.fixture(scope="module")
def built() -> tuple[list[LogEntry], dict[str, int]]:
    return build_log()


def test_only_commits_a_later_member_message_builds_on_are_confirmed(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    # Epoch 3 (bob's periodic commit) is followed by dave's external commit, which proves
    # nothing (the service chose what dave joined), then by bob's proposal in epoch 4; nothing
    # follows alice's last commit (epoch 5): the service keeps commits that lost their race too.
    entries, seqs = built
    report = audit(GID, entries)
    assert [r.confirmed for r in report.rotations] == [True, True, True, True, False]
    assert format_report(report)[-1][3] == "update (not yet confirmed)"
    # the log cut after dave's external commit: epochs 3 and 4 are then unconfirmed
    cut = [e for e in entries if e.seq <= seqs["external"]]
    assert [r.confirmed for r in audit(GID, cut).rotations] == [True, True, False, False]


def test_a_losing_commit_at_the_end_of_a_log_is_unconfirmed_until_a_member_builds_on_it() -> None:
    bob = Client(b"bob")
    log, ga, r = started(bob)
    assert r.welcome is not None
    gb = Group.join(bob, r.welcome)
    log.add("proposal", 1, "bob", 1200, gb.propose_update())
    # both commit in epoch 1; the service accepted bob's, but logs alice's in its place
    losing = ga.commit([], include_pending=False)
    log.add("commit", 1, "alice", 1300, losing.commit)
    report = audit(GID, log.entries)
    assert [r.confirmed for r in report.rotations] == [True, False]
    # alice building on her own commit shows only that the service told her she won
    ga.merge_pending_commit()
    again = ga.update()
    with_own = [*log.entries, LogEntry(log.seq + 1, "commit", 2, "alice", 1350, again.commit)]
    assert [r.confirmed for r in audit(GID, with_own).rotations] == [True, False, False]
    # another member's message in alice's epoch shows that the others took it
    gb.process(losing.commit)
    log.add("proposal", 2, "bob", 1400, gb.propose_update())
    assert [r.confirmed for r in audit(GID, log.entries).rotations] == [True, True]


def _requested_not_removed() -> tuple[list[LogEntry], int]:
    bob = Client(b"bob")
    log, ga, r = started(bob, Client(b"carol"))
    assert r.welcome is not None
    gb = Group.join(bob, r.welcome)
    carol_leaf = next(m.leaf_index for m in gb.members if m.identity == b"carol")
    request = log.add("proposal", 1, "bob", 2000, gb.propose_remove(carol_leaf)).seq
    for epoch in (1, 2):  # alice rotates, leaving the request out
        r = ga.commit([], include_pending=False)
        log.add("commit", epoch, "alice", 3000 * epoch, r.commit)
        ga.merge_pending_commit()
    return log.entries, request


def test_a_removal_requested_and_never_carried_out_is_reported() -> None:
    entries, request = _requested_not_removed()
    report = audit(GID, entries)
    assert report.members == ["alice", "bob", "carol"]
    assert report.pending_removals == [PendingRemoval("carol", request, "bob")]


def test_removals_carried_out_are_not_pending(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    assert audit(GID, built[0]).pending_removals == []


def test_a_member_removed_by_another_that_comes_back_by_itself_is_noted() -> None:
    carol = Client(b"carol")
    log, ga, _ = started(carol)
    carol_leaf = next(m.leaf_index for m in ga.members if m.identity == b"carol")
    r = ga.remove([carol_leaf])
    log.add("commit", 1, "alice", 1200, r.commit)
    ga.merge_pending_commit()
    _, commit = Group.join_external(carol, ga.group_info())  # her own key: one key per name
    log.add("commit", 2, "carol", 1300, commit)
    rotations = audit(GID, log.entries).rotations
    assert rotations[2].reasons == ["external-join"]
    assert rotations[1].notes == [] and len(rotations[2].notes) == 1
    assert "came back by external commit after a member removed it" in rotations[2].notes[0]


def test_a_member_removed_and_added_anew_in_one_commit_may_rejoin_by_itself() -> None:
    # A resync: a member removes a name's old leaf and adds a fresh KeyPackage of it at once.
    carol = Client(b"carol")
    log, ga, _ = started(carol)
    carol_leaf = next(m.leaf_index for m in ga.members if m.identity == b"carol")
    fresh = parse_key_package(carol.key_package())
    r = ga.commit([Proposal(Remove(carol_leaf)), Proposal(Add(fresh))], include_pending=False)
    log.add("commit", 1, "alice", 1200, r.commit)
    ga.merge_pending_commit()
    new_leaf = next(m.leaf_index for m in ga.members if m.identity == b"carol")
    _, commit = Group.join_external(carol, ga.group_info(), remove_leaf=new_leaf)
    log.add("commit", 2, "carol", 1300, commit)
    rotations = audit(GID, log.entries).rotations
    assert rotations[2].reasons == ["rejoin"] and rotations[2].notes == []


def test_every_name_is_reported_with_its_key_fingerprint(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    report = audit(GID, built[0])
    assert set(report.keys) == {"alice", "bob", "carol", "dave"}
    assert all(normalize_fingerprint(fp) == fp for fp in report.keys.values())
    assert len(set(report.keys.values())) == 4
    alice = Client(b"alice")
    assert key_fingerprint(alice.signature_key) not in report.keys.values()  # another alice


def test_a_welcome_comes_from_the_commit_that_added_its_recipients(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    entries, seqs = built
    welcome = next(e for e in entries if e.kind == "welcome")
    with pytest.raises(AuditFailure, match="'dave' sent the Welcome, not a member") as info:
        audit(GID, _replace(entries, welcome.seq, sender="dave"))
    assert info.value.seq == welcome.seq
    # a member other than the committer: the service takes it from the committer only
    with pytest.raises(AuditFailure, match="which 'alice''s commit added") as info:
        audit(GID, _replace(entries, welcome.seq, sender="bob"))
    assert info.value.seq == welcome.seq
    # a Welcome of another group (to erin), logged after the log's last commit
    other = Group.create(Client(b"alice"), b"another group")
    foreign = other.add([Client(b"erin").key_package()]).welcome
    assert foreign is not None
    last = entries[-1]
    log = [*entries, replace(welcome, seq=last.seq + 1, epoch=5, time_ms=last.time_ms,
                             message=foreign)]
    assert audit(GID, entries).notes == []
    with pytest.raises(AuditFailure, match="which no commit of this log added") as info:
        audit(GID, log)
    assert info.value.seq == last.seq + 1


def test_a_group_created_with_members_has_its_creator_welcome_them() -> None:
    # A branch: the first GroupInfo already holds carol; no commit of the log adds her, and the
    # creator's Welcome for her may come after a commit.
    ga = Group.create(Client(b"alice"), GID)
    founding = ga.add([Client(b"carol").key_package()])
    ga.merge_pending_commit()
    assert founding.welcome is not None
    log = LogBuilder()
    log.add("group_info", 1, "alice", 1000, ga.group_info())
    log.add("commit", 1, "alice", 1100, ga.update().commit)
    ga.merge_pending_commit()
    log.add("welcome", 2, "alice", 1200, founding.welcome)
    assert audit(GID, log.entries).welcomes_seen == 1
    with pytest.raises(AuditFailure, match="which no commit of this log added"):
        audit(GID, _replace(log.entries, log.seq, sender="carol"))


def test_a_group_info_is_logged_as_posted_by_its_signer(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    entries, _ = built
    infos = [e for e in entries if e.kind == "group_info"]
    assert len(infos) >= 2 and infos[0].sender == "alice"
    for entry in (infos[0], infos[-1]):
        other = "bob" if entry.sender != "bob" else "alice"
        with pytest.raises(AuditFailure, match=f"'{other}' posted the GroupInfo") as info:
            audit(GID, _replace(entries, entry.seq, sender=other))
        assert info.value.seq == entry.seq


def test_a_member_auditing_holds_the_log_to_the_epoch_it_lived() -> None:
    bob = Client(b"bob")
    log, ga, r = started(bob)
    assert r.welcome is not None
    gb = Group.join(bob, r.welcome)
    # alice rotates; the service shows bob's view of epoch 1 and a log through it
    log.add("commit", 1, "alice", 1200, ga.update().commit)
    ga.merge_pending_commit()
    lived = KnownEpoch("bob", 1, gb.group_context.encode())
    assert audit(GID, log.entries, lived).last_epoch == 2
    assert audit(GID, log.entries, KnownEpoch("alice", 2, ga.group_context.encode()))
    # the log of a fork: another group of the same id, which bob never was in
    fork = LogBuilder()
    gf = Group.create(Client(b"alice"), GID)
    fork.add("group_info", 0, "alice", 1000, gf.group_info())
    fork.add("commit", 0, "alice", 1100, gf.add([Client(b"bob").key_package()]).commit)
    assert audit(GID, fork.entries).last_epoch == 1  # valid on its own
    with pytest.raises(AuditFailure, match="not the history 'bob' took part in") as info:
        audit(GID, fork.entries, lived)
    assert info.value.seq == fork.entries[-1].seq
    # commits left out: the log ends before bob's epoch, or starts after it
    with pytest.raises(AuditFailure, match="ends at epoch 2, before epoch 3, which 'bob'"):
        audit(GID, log.entries, replace(lived, epoch=3))
    late = log.entries[2:]  # from epoch 1 on
    late[0:0] = [LogEntry(0, "group_info", 1, "bob", 1150, gb.group_info())]
    with pytest.raises(AuditFailure, match="starts at epoch 1, after epoch 0"):
        audit(GID, [replace(e, seq=i + 1) for i, e in enumerate(late)],
              replace(lived, epoch=0))


def test_durations_the_service_stamped_backwards_are_flagged(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    # Within the tolerance for instances' clocks, a commit stamped before the one it follows.
    entries, seqs = built
    periodic = next(e for e in entries if e.seq == seqs["periodic"])
    report = audit(GID, _replace(entries, periodic.seq, time_ms=2000))
    rows = format_report(report)
    assert rows[2][6] == "-0.50s (clock skew)" and rows[1][6] == "1.40s"


def test_non_ascii_names_are_spelled_out() -> None:
    assert shown_name("alice") == "alice"
    assert shown_name("\u0430lice") == "\u0430lice (U+0430 CYRILLIC SMALL LETTER A)"
    # no backslash of its own, which a display escaping invisible characters would double
    assert shown_name("mal\xa0lory\u0430\xa0") == (
        "mal\xa0lory\u0430\xa0 (U+00A0 NO-BREAK SPACE, U+0430 CYRILLIC SMALL LETTER A)"
    )
    many = "".join(chr(0x4E00 + i) for i in range(10))
    assert shown_name(many).endswith("U+4E07 CJK UNIFIED IDEOGRAPH-4E07, 2 more)")
    alice, fake = Client(b"alice"), Client("\u0430lice".encode())
    log = LogBuilder()
    ga = Group.create(alice, GID)
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    _, commit = Group.join_external(fake, ga.group_info())
    log.add("commit", 0, "\u0430lice", 1100, commit)
    [row] = format_report(audit(GID, log.entries))
    shown = "\u0430lice (U+0430 CYRILLIC SMALL LETTER A)"
    assert row[2] == shown and row[4] == shown


# -- the CLI


def _cli(tmp_path: Path, entries: list[LogEntry], *extra: str) -> int:
    from conclave.cli import main

    save_log(tmp_path / "log.cbor", GID, entries)
    return main(["audit", "--group-id", GID.hex(), "--log", str(tmp_path / "log.cbor"), *extra])


def test_the_cli_prints_keys_pending_removals_unconfirmed_commits_and_its_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    entries, request = _requested_not_removed()
    assert _cli(tmp_path, entries) == 0
    printed = capsys.readouterr().out
    out = " ".join(printed.split())
    report = audit(GID, entries)
    # one heading, then each name with its key's fingerprint on a line of its own
    assert printed.count("signature keys:") == 1
    for name, fingerprint in report.keys.items():
        assert f"\n  {name.ljust(5)}  {fingerprint}\n" in printed
    assert f"removal requested, not carried out: carol (first request seq {request}, by bob)" in out
    # alice's two periodic commits: only bob (epoch 1) signed anything besides her
    assert "not yet confirmed (epoch 2, 3): no member but its committer signed anything" in out
    assert "times are the delivery service's, signed by no one" in out
    assert "this log ends at epoch 3 (seq 5)" in out


def test_expected_keys_must_match(
    built: tuple[list[LogEntry], dict[str, int]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries, _ = built
    keys = audit(GID, entries).keys
    typed = keys["bob"].replace(" ", "").upper()  # as someone might type it
    assert _cli(tmp_path, entries, "--expect-key", f"alice={keys['alice']}",
                "--expect-key", f"bob={typed}") == 0
    other = key_fingerprint(Client(b"bob").signature_key)
    assert _cli(tmp_path, entries, "--expect-key", f"bob={other}") == 1
    assert "'bob' signs with the key" in capsys.readouterr().err
    assert _cli(tmp_path, entries, "--expect-key", f"erin={other}") == 1
    assert "'erin' does not show up in this log" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: a usage error
        _cli(tmp_path, entries, "--expect-key", "bob=1234")
    assert info.value.code == 2
    assert "32 hex digits" in capsys.readouterr().err


# -- reading from an untrusted service


class _Answers:
    def __init__(self, pages: list[object]) -> None:
        self.pages = pages

    async def audit_log(self, group_id: bytes, after: int = 0) -> object:
        return self.pages.pop(0) if self.pages else []


@pytest.mark.parametrize("page", [None, "text", [7], [{"seq": 1}]], ids=repr)
async def test_a_service_answer_that_is_no_log_page_is_refused(page: object) -> None:
    with pytest.raises(AuditFailure, match="not a page of the audit log"):
        await read_log(_Answers([page]), GID)  # type: ignore[arg-type]


async def test_a_log_past_the_size_limit_is_refused() -> None:
    pages = [[LogEntry(10 * p + i, "commit", 0, "x", 0, b"m" * 100) for i in range(1, 11)]
             for p in range(5)]
    assert len(await read_log(_Answers(list(pages)), GID, max_bytes=5000)) == 50  # type: ignore[arg-type]
    with pytest.raises(AuditFailure, match="goes on past") as info:
        await read_log(_Answers(list(pages)), GID, max_bytes=4999)  # type: ignore[arg-type]
    assert info.value.seq == 50
