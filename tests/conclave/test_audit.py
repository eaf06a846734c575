"""The auditor over logs built with real MLS groups (no services): what passes, what breaks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conclave.audit import LogEntry, audit, format_report, load_log, read_log, save_log
from conclave.errors import AuditFailure, ConclaveError
from mls import Client, Group
from mls.proposals import Proposal, Remove

GID = b"audited-group"
# A commit ends with signature (64 B), confirmation_tag (32 B) and membership_tag (32 B), each
# with a one-byte length: this offset from the end falls inside the signature.
SIGNATURE_FROM_END = 100


class LogBuilder:
    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.seq = 0

    def add(self, kind: str, epoch: int, sender: str, time_ms: int, message: bytes) -> LogEntry:
        self.seq += 1
        entry = LogEntry(self.seq, kind, epoch, sender, time_ms, message)
        self.entries.append(entry)
        return entry


def build_log() -> tuple[list[LogEntry], dict[str, int]]:
    """alice creates; adds bob and carol; bob asks to remove carol and alice commits it; bob
    rotates; dave joins externally; bob's Update proposal is committed by alice."""
    alice, bob, carol, dave = (Client(n) for n in (b"alice", b"bob", b"carol", b"dave"))
    log = LogBuilder()
    seqs: dict[str, int] = {}
    ga = Group.create(alice, GID)
    log.add("group_info", ga.epoch, "alice", 1000, ga.group_info())

    r = ga.add([bob.key_package(), carol.key_package()])
    seqs["add"] = log.add("commit", ga.epoch, "alice", 1100, r.commit).seq
    ga.merge_pending_commit()
    assert r.welcome is not None
    log.add("welcome", ga.epoch, "alice", 1101, r.welcome)
    log.add("group_info", ga.epoch, "alice", 1102, r.group_info)
    gb = Group.join(bob, r.welcome)

    carol_leaf = next(m.leaf_index for m in gb.members if m.identity == b"carol")
    proposal = gb.propose_remove(carol_leaf)
    seqs["remove_request"] = log.add("proposal", gb.epoch, "bob", 2000, proposal).seq
    ga.process(proposal)
    r = ga.commit([], include_pending=True)
    seqs["remove"] = log.add("commit", ga.epoch, "alice", 2500, r.commit).seq
    ga.merge_pending_commit()
    gb.process(r.commit)

    r = gb.update()
    seqs["periodic"] = log.add("commit", gb.epoch, "bob", 6500, r.commit).seq
    gb.merge_pending_commit()
    ga.process(r.commit)
    log.add("group_info", gb.epoch, "bob", 6501, r.group_info)

    gd, commit = Group.join_external(dave, ga.group_info())
    seqs["external"] = log.add("commit", ga.epoch, "dave", 7000, commit).seq
    ga.process(commit)
    gb.process(commit)

    proposal = gb.propose_update()
    log.add("proposal", gb.epoch, "bob", 8000, proposal)
    ga.process(proposal)
    r = ga.commit([], include_pending=True)
    seqs["update"] = log.add("commit", ga.epoch, "alice", 8200, r.commit).seq
    ga.merge_pending_commit()
    log.add("group_info", ga.epoch, "alice", 8201, r.group_info)
    return log.entries, seqs


@pytest.fixture(scope="module")
def built() -> tuple[list[LogEntry], dict[str, int]]:
    return build_log()


def test_a_consistent_log_passes_with_reasons_and_timings(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, _ = built
    report = audit(GID, entries)
    assert [r.reasons for r in report.rotations] == [
        ["add"], ["remove"], ["periodic"], ["external-join"], ["update"],
    ]
    assert [r.committer for r in report.rotations] == ["alice", "alice", "bob", "dave", "alice"]
    assert [r.epoch for r in report.rotations] == [1, 2, 3, 4, 5]
    assert report.rotations[0].added == ["bob", "carol"]
    assert report.rotations[1].removed == ["carol"]
    assert report.rotations[1].removal_latency_ms == {"carol": 500}
    assert [r.since_last_ms for r in report.rotations] == [100, 1400, 4000, 500, 1200]
    assert report.members == ["alice", "bob", "dave"]
    assert report.group_infos_checked == 4 and report.welcomes_seen == 1
    assert report.first_epoch == 0 and report.last_epoch == 5
    rows = format_report(report)
    assert rows[1][3] == "remove" and rows[1][7] == "carol: 0.50s"


def _replace(entries: list[LogEntry], seq: int, **changes: object) -> list[LogEntry]:
    return [replace(e, **changes) if e.seq == seq else e for e in entries]  # type: ignore[arg-type]


def _flip(message: bytes, offset: int) -> bytes:
    data = bytearray(message)
    data[offset] ^= 0x01
    return bytes(data)


@pytest.mark.parametrize("which", ["add", "remove", "periodic", "external", "update"])
def test_a_commit_with_a_flipped_bit_is_named(
    built: tuple[list[LogEntry], dict[str, int]], which: str
) -> None:
    entries, seqs = built
    seq = seqs[which]
    victim = next(e for e in entries if e.seq == seq)
    tampered = _replace(entries, seq, message=_flip(victim.message, len(victim.message) - SIGNATURE_FROM_END))
    with pytest.raises(AuditFailure) as info:
        audit(GID, tampered)
    assert info.value.seq == seq


def test_a_changed_confirmation_tag_breaks_the_transcript(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    # Not signed, and its MAC needs the epoch's secrets; but it feeds the interim transcript
    # hash, so the next GroupInfo (or the next commit's signature) no longer matches.
    entries, seqs = built
    seq = seqs["periodic"]
    victim = next(e for e in entries if e.seq == seq)
    with pytest.raises(AuditFailure) as info:
        audit(GID, _replace(entries, seq, message=_flip(victim.message, len(victim.message) - 50)))
    assert info.value.seq is not None and info.value.seq > seq


def test_a_tampered_removal_request_is_named(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, seqs = built
    seq = seqs["remove_request"]
    victim = next(e for e in entries if e.seq == seq)
    with pytest.raises(AuditFailure) as info:
        audit(GID, _replace(entries, seq, message=_flip(victim.message, len(victim.message) - 40)))
    assert info.value.seq == seq


def test_a_missing_commit_breaks_the_epoch_chain(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, seqs = built
    pruned = [e for e in entries if e.seq != seqs["periodic"]]
    with pytest.raises(AuditFailure, match="chain is at epoch") as info:
        audit(GID, pruned)
    assert info.value.seq == seqs["periodic"] + 1  # the GroupInfo of the missing epoch


def test_a_replayed_commit_is_refused(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, seqs = built
    commit = next(e for e in entries if e.seq == seqs["remove"])
    replayed = [*entries, replace(commit, seq=entries[-1].seq + 1)]
    with pytest.raises(AuditFailure) as info:
        audit(GID, replayed)
    assert info.value.seq == entries[-1].seq + 1


def test_reordered_messages_are_refused(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, _ = built
    # The Welcome and the GroupInfo of epoch 1 swapped: only their order is wrong.
    swapped = [*entries[:2], entries[3], entries[2], *entries[4:]]
    with pytest.raises(AuditFailure, match="out of order"):
        audit(GID, swapped)


def test_a_groupinfo_of_a_fork_is_detected(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, seqs = built
    # A GroupInfo of the same epoch from another branch: alice's own commit that never made it.
    alice = Client(b"alice")
    ga = Group.create(alice, GID)
    for _ in range(3):
        ga.update()
        ga.merge_pending_commit()
    fork_info = ga.group_info()
    last_gi = max(e.seq for e in entries if e.kind == "group_info" and e.seq < seqs["external"])
    with pytest.raises(AuditFailure) as info:
        audit(GID, _replace(entries, last_gi, message=fork_info))
    assert info.value.seq == last_gi


def test_a_log_without_a_groupinfo_has_no_start(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, _ = built
    with pytest.raises(AuditFailure, match="before any GroupInfo"):
        audit(GID, [e for e in entries if e.kind != "group_info"])
    with pytest.raises(AuditFailure, match="no GroupInfo"):
        audit(GID, [])


def test_a_log_without_commits_reports_the_first_groupinfos_members(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    entries, seqs = built
    report = audit(GID, [e for e in entries if e.seq > seqs["add"] and e.kind == "group_info"][:1])
    assert report.rotations == [] and report.members == ["alice", "bob", "carol"]


def test_the_log_of_another_group_is_refused(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    entries, _ = built
    with pytest.raises(AuditFailure, match="another group"):
        audit(b"other", entries)


def test_log_files_round_trip(built: tuple[list[LogEntry], dict[str, int]], tmp_path: Path) -> None:
    entries, _ = built
    path = tmp_path / "log.cbor"
    save_log(path, GID, entries)
    assert load_log(path) == (GID, entries)


@pytest.mark.parametrize("content", [b"", b"\xff\x00garbage", b"\xa1\x61a\x01"])
def test_unreadable_log_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.cbor"
    path.write_bytes(content)
    with pytest.raises(AuditFailure):
        load_log(path)


@pytest.mark.parametrize("where", ["missing.cbor", "."])
def test_a_log_file_that_cannot_be_read_is_a_usage_error(tmp_path: Path, where: str) -> None:
    # Not an AuditFailure (exit status 1: "the log is inconsistent"): the CLI exits 2.
    with pytest.raises(ConclaveError, match="cannot read the log file") as info:
        load_log(tmp_path / where)
    assert not isinstance(info.value, AuditFailure)


class PagedService:
    """Answers like the delivery service: at most `page` entries after a sequence number."""

    def __init__(self, count: int, page: int) -> None:
        self.entries = [LogEntry(i, "commit", i, "x", i, b"m") for i in range(1, count + 1)]
        self.page = page

    async def audit_log(self, group_id: bytes, after: int = 0) -> list[LogEntry]:
        return [e for e in self.entries if e.seq > after][: self.page]


@pytest.mark.parametrize("count", [0, 999, 1000, 2500])
async def test_the_whole_log_is_read_page_by_page(count: int) -> None:
    service = PagedService(count, page=1000)
    entries = await read_log(service, b"g")
    assert [e.seq for e in entries] == list(range(1, count + 1))


def test_a_member_who_asked_to_go_left_and_one_removed_by_another_did_not() -> None:
    alice, bob, carol = (Client(n) for n in (b"alice", b"bob", b"carol"))
    log = LogBuilder()
    ga = Group.create(alice, GID)
    log.add("group_info", ga.epoch, "alice", 1000, ga.group_info())
    r = ga.add([bob.key_package(), carol.key_package()])
    log.add("commit", ga.epoch, "alice", 1100, r.commit)
    ga.merge_pending_commit()
    assert r.welcome is not None
    gc = Group.join(carol, r.welcome)
    bob_leaf = next(m.leaf_index for m in ga.members if m.identity == b"bob")
    # carol asks to leave; alice commits her request together with her own Remove of bob.
    bye = gc.leave()
    log.add("proposal", gc.epoch, "carol", 2000, bye)
    ga.process(bye)
    r = ga.commit([Proposal(Remove(bob_leaf))], include_pending=True)
    log.add("commit", ga.epoch, "alice", 2400, r.commit)
    rotation = audit(GID, log.entries).rotations[1]
    assert sorted(rotation.reasons) == ["leave", "remove"]
    assert sorted(rotation.removed) == ["bob", "carol"]
    assert rotation.removal_latency_ms == {"carol": 400, "bob": None}


# -- the service's log is untrusted: kinds, fields, keys, metadata


def test_the_auditor_guards_nothing_with_assert() -> None:
    # `python -O` drops asserts: a check of the input must be an `if`.
    import ast

    import conclave.audit

    tree = ast.parse(Path(conclave.audit.__file__).read_text())
    assert [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Assert)] == []


@pytest.mark.parametrize(
    ("which", "kind", "says"),
    [("remove", "proposal", "a proposal entry holds a commit"),
     ("remove_request", "commit", "a commit entry holds a proposal")],
)
def test_an_entry_whose_kind_is_not_its_content_is_refused(
    built: tuple[list[LogEntry], dict[str, int]], which: str, kind: str, says: str
) -> None:
    entries, seqs = built
    with pytest.raises(AuditFailure, match=says) as info:
        audit(GID, _replace(entries, seqs[which], kind=kind))
    assert info.value.seq == seqs[which]


def _log_file(tmp_path: Path, entries: list[LogEntry], **changes: object) -> Path:
    """A saved log whose third entry's fields are replaced by `changes` (raw CBOR values)."""
    import cbor2

    bodies = [e.to_body() for e in entries]
    bodies[2].update(changes)
    path = tmp_path / "log.cbor"
    path.write_bytes(cbor2.dumps(
        {"format": "conclave-audit-log", "version": 1, "group_id": GID, "entries": bodies}
    ))
    return path


@pytest.mark.parametrize("changes", [
    {"seq": float("inf")}, {"seq": 3.0}, {"seq": True}, {"seq": " 3 "}, {"seq": -3},
    {"time_ms": float("inf")}, {"epoch": 2**64},
    # bytes(2**70) overflows; bytes(5) (or 10**10: 10 GB) makes zeros of an int.
    {"message": 2**70}, {"message": 5}, {"message": [1, 2, 3]}, {"message": {}},
    {"kind": b"welcome"}, {"sender": 7}, {"extra": 1},
])
def test_malformed_fields_are_refused_cleanly(
    built: tuple[list[LogEntry], dict[str, int]], tmp_path: Path, changes: dict[str, object]
) -> None:
    entries, _ = built
    with pytest.raises(AuditFailure, match="malformed log entry #3"):
        load_log(_log_file(tmp_path, entries, **changes))


def test_trailing_data_and_a_bool_version_are_refused(
    built: tuple[list[LogEntry], dict[str, int]], tmp_path: Path
) -> None:
    import cbor2

    entries, _ = built
    path = _log_file(tmp_path, entries)
    data = path.read_bytes()
    path.write_bytes(data + b"\xff\xff")
    with pytest.raises(AuditFailure, match="trailing data"):
        load_log(path)
    body = cbor2.loads(data)
    path.write_bytes(cbor2.dumps({**body, "version": True}))
    with pytest.raises(AuditFailure, match="version True is not supported"):
        load_log(path)


async def test_the_services_answer_is_checked_like_a_file() -> None:
    service = PagedService(3, page=10)
    service.entries[1] = replace(service.entries[1], seq=True)  # type: ignore[arg-type]
    with pytest.raises(AuditFailure, match="seq must be an integer"):
        await read_log(service, b"g")


def _forged_takeover(entries: list[LogEntry]) -> list[LogEntry]:
    """What a delivery service can make from public data: a new key under the name "bob" joins
    by external commit from the last GroupInfo, removing real bob's leaf (as a rejoin does),
    then removes alice and dave."""
    from mls import PublicGroup

    last_gi = entries[-1].message
    leaves = {m.identity: m.leaf_index for m in PublicGroup.from_group_info(last_gi).members}
    fake, commit = Group.join_external(Client(b"bob"), last_gi, remove_leaf=leaves[b"bob"])
    seq, epoch = entries[-1].seq, entries[-1].epoch
    r = fake.remove([leaves[b"alice"], leaves[b"dave"]])
    fake.merge_pending_commit()
    return [
        *entries, LogEntry(seq + 1, "commit", epoch, "bob", 9000, commit),
        LogEntry(seq + 2, "commit", epoch + 1, "bob", 9100, r.commit),
        LogEntry(seq + 3, "group_info", epoch + 2, "bob", 9101, fake.group_info()),
    ]


def test_a_name_with_another_signature_key_is_a_forgery(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    entries, _ = built
    forged = _forged_takeover(entries)
    with pytest.raises(AuditFailure, match="'bob' with another signature key") as info:
        audit(GID, forged)
    assert info.value.seq == entries[-1].seq + 1
    # A second leaf named alice, with a key of its own, while alice is a member.
    _, commit = Group.join_external(Client(b"alice"), entries[-1].message)
    extra = LogEntry(entries[-1].seq + 1, "commit", entries[-1].epoch, "alice", 9000, commit)
    with pytest.raises(AuditFailure, match="'alice' with another signature key") as info:
        audit(GID, [*entries, extra])
    assert info.value.seq == extra.seq


def test_two_leaves_of_one_name_with_different_keys_are_refused_from_the_start() -> None:
    ga = Group.create(Client(b"alice"), GID)
    r = ga.add([Client(b"bob").key_package(), Client(b"bob").key_package()])
    ga.merge_pending_commit()
    log = LogBuilder()
    log.add("group_info", ga.epoch, "alice", 1000, r.group_info)  # a log that starts late
    with pytest.raises(AuditFailure, match="'bob' with another signature key") as info:
        audit(GID, log.entries)
    assert info.value.seq == 1


def build_rejoin_log() -> list[LogEntry]:
    """bob lost his state and rejoins as Participant.join and _resync do (his own key, his old
    leaf removed); carol asks to leave in epoch 2, alice's periodic commit wins that epoch, carol
    asks again in epoch 3 and alice commits it."""
    alice, bob, carol = Client(b"alice"), Client(b"bob"), Client(b"carol")
    log = LogBuilder()
    ga = Group.create(alice, GID)
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    r = ga.add([bob.key_package(), carol.key_package()])
    log.add("commit", 0, "alice", 1100, r.commit)
    ga.merge_pending_commit()
    log.add("group_info", 1, "alice", 1101, r.group_info)
    assert r.welcome is not None
    gb, gc = Group.join(bob, r.welcome), Group.join(carol, r.welcome)
    gb2, commit = Group.join_external(bob, ga.group_info(), remove_leaf=gb.leaf_index)
    log.add("commit", 1, "bob", 5000, commit)
    ga.process(commit)
    gc.process(commit)
    log.add("proposal", 2, "carol", 6000, gc.leave())
    r = ga.update()
    log.add("commit", 2, "alice", 6100, r.commit)
    ga.merge_pending_commit()
    gc.process(r.commit)
    bye = gc.leave()
    log.add("proposal", 3, "carol", 9000, bye)
    ga.process(bye)
    r = ga.commit([], include_pending=True)
    log.add("commit", 3, "alice", 9100, r.commit)
    return log.entries


def test_a_rejoin_is_reported_as_one_and_removes_no_one() -> None:
    rejoin = audit(GID, build_rejoin_log()).rotations[1]
    assert (rejoin.committer, rejoin.reasons) == ("bob", ["rejoin"])
    assert rejoin.added == [] and rejoin.removed == [] and rejoin.removal_latency_ms == {}
    assert rejoin.members == ["alice", "bob", "carol"]


def test_removal_latency_runs_from_the_first_request_across_epochs() -> None:
    leave = audit(GID, build_rejoin_log()).rotations[3]
    assert (leave.reasons, leave.removed) == (["leave"], ["carol"])
    assert leave.removal_latency_ms == {"carol": 9100 - 6000}


def _welcome_seq(entries: list[LogEntry]) -> int:
    return next(e.seq for e in entries if e.kind == "welcome")


@pytest.mark.parametrize("message", ["garbage", "private", "suite"])
def test_a_welcome_entry_must_be_a_welcome_of_the_groups_suite(
    built: tuple[list[LogEntry], dict[str, int]], message: str
) -> None:
    entries, _ = built
    seq = _welcome_seq(entries)
    welcome = next(e for e in entries if e.seq == seq).message
    if message == "garbage":
        data = b"\x00garbage"
    elif message == "private":
        ga = Group.create(Client(b"alice"), GID)
        data = ga.encrypt_application(b"hello")
    else:  # version (2 bytes), wire format (2), then the Welcome's cipher suite (2)
        data = welcome[:4] + b"\x00\x02" + welcome[6:]
    with pytest.raises(AuditFailure, match="Welcome") as info:
        audit(GID, _replace(entries, seq, message=data))
    assert info.value.seq == seq


def test_a_welcome_before_any_groupinfo_is_refused(
    built: tuple[list[LogEntry], dict[str, int]],
) -> None:
    entries, _ = built
    welcome = next(e for e in entries if e.kind == "welcome")
    log = [replace(welcome, seq=1, time_ms=0), *(replace(e, seq=e.seq + 1) for e in entries)]
    with pytest.raises(AuditFailure, match="welcome before any GroupInfo") as info:
        audit(GID, log)
    assert info.value.seq == 1


@pytest.mark.parametrize(("which", "sender"), [
    ("add", "bob"), ("remove_request", "alice"), ("external", "alice"), ("periodic", "dave"),
])
def test_the_logged_sender_must_be_the_mls_sender(
    built: tuple[list[LogEntry], dict[str, int]], which: str, sender: str
) -> None:
    entries, seqs = built
    with pytest.raises(AuditFailure, match=f"the log says '{sender}' sent") as info:
        audit(GID, _replace(entries, seqs[which], sender=sender))
    assert info.value.seq == seqs[which]


def test_the_sender_of_a_join_request_is_its_key_packages_identity() -> None:
    alice, erin = Client(b"alice"), Client(b"erin")
    log = LogBuilder()
    ga = Group.create(alice, GID)
    log.add("group_info", 0, "alice", 1000, ga.group_info())
    knock = Group.new_member_add_proposal(erin, ga.group_info())
    log.add("proposal", 0, "erin", 2000, knock)
    assert audit(GID, log.entries).proposals_seen == 1
    with pytest.raises(AuditFailure, match="the log says 'mallory' sent"):
        audit(GID, _replace(log.entries, 2, sender="mallory"))


@pytest.mark.parametrize("kind", ["group_info", "welcome"])
def test_the_logged_epoch_of_a_groupinfo_or_welcome_must_be_right(
    built: tuple[list[LogEntry], dict[str, int]], kind: str
) -> None:
    entries, _ = built
    seq = next(e.seq for e in entries if e.kind == kind and e.seq > 1)
    with pytest.raises(AuditFailure, match="epoch 99") as info:
        audit(GID, _replace(entries, seq, epoch=99))
    assert info.value.seq == seq


def test_times_must_not_go_backwards(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    from conclave.audit import CLOCK_SKEW_MS

    entries, _ = built
    last = entries[-1]
    latest = max(e.time_ms for e in entries[:-1])
    assert latest > CLOCK_SKEW_MS  # room to go back further than the tolerance
    with pytest.raises(AuditFailure, match="times must not go backwards") as info:
        audit(GID, _replace(entries, last.seq, time_ms=latest - CLOCK_SKEW_MS - 1))
    assert info.value.seq == last.seq
    # within CLOCK_SKEW_MS: instances sharing one database stamp with their own clocks
    audit(GID, _replace(entries, last.seq, time_ms=latest - CLOCK_SKEW_MS + 1))


@pytest.mark.parametrize("kind", ["proposal", "welcome", "group_info"])
def test_a_message_logged_twice_is_a_replay(
    built: tuple[list[LogEntry], dict[str, int]], kind: str
) -> None:
    # Each right after the original, in its epoch: only the repetition is wrong.
    entries, _ = built
    at = next(i for i, e in enumerate(entries) if e.kind == kind)
    again = replace(entries[at], seq=entries[at].seq + 1)
    log = [*entries[: at + 1], again, *(replace(e, seq=e.seq + 1) for e in entries[at + 1 :])]
    with pytest.raises(AuditFailure, match=f"a replay: the same message as seq {again.seq - 1}"):
        audit(GID, log)


def test_sequence_numbers_may_skip(built: tuple[list[LogEntry], dict[str, int]]) -> None:
    # The service numbers application data too, and leaves it out of the audit log.
    entries, _ = built
    assert audit(GID, [replace(e, seq=e.seq * 10) for e in entries]).last_epoch == 5


def test_the_cli_reports_the_members_at_the_end_of_the_log(
    built: tuple[list[LogEntry], dict[str, int]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A log may be cut short or start late: the audit cannot tell, so it says which members.
    from conclave.cli import main

    entries, _ = built
    save_log(tmp_path / "log.cbor", GID, entries)
    assert main(["audit", "--group-id", GID.hex(), "--log", str(tmp_path / "log.cbor")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "members at the end of this log: alice, bob, dave" in out
