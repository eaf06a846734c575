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
    swapped = [entries[0], entries[2], entries[1], *entries[3:]]
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
