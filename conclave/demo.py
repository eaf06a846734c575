"""`conclave demo`: the services plus four headless participants, and the checks that matter.

Script: alice creates the call and invites bob and carol (one Add commit and a Welcome); all three
publish synthetic audio and video through the SFU; dave asks to join (an Add proposal of his own
that the first member to see it commits); alice asks for bob's removal (a Remove proposal that the first member to see it commits); keys rotate on a
timer. Then the auditor checks the delivery service's log. The demo succeeds when every member
decoded every other member's audio and video, all members show the same safety code, bob decrypts
nothing once the others have moved past his removal, and the audit passes.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from delivery_service.errors import RequestFailed

from .audit import MAX_LOG_BYTES, AuditReport, LogEntry, audit, read_log
from .errors import ConclaveError, StateInUse
from .media import MediaSpec
from .participant import Participant
from .services import DEFAULT_AUDITOR, Services

ROOM = "demo"
# Frames of the old epoch still in flight when the removal commit lands may decrypt at the
# removed member; after this long nothing of the old epoch is sent any more.
DRAIN = 1.0


@dataclass
class DemoResult:
    ok: bool
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    report: AuditReport | None = None
    log: list[LogEntry] = field(default_factory=list)
    group_id: bytes = b""
    elapsed: float = 0.0

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append((name, passed, detail))
        if not passed:
            self.ok = False


@dataclass
class DemoConfig:
    rotation_period: float = 4.0
    phase: float = 2.5  # seconds of media between steps
    width: int = 128
    height: int = 96
    fps: float = 10.0
    state_dir: Path | None = None
    db: str | None = field(default=None, repr=False)  # a DSN may hold a password
    pg_schema: str | None = None


async def fetch_log(
    ds_url: str, group_id: bytes, state_dir: Path, identity: str = DEFAULT_AUDITOR,
    max_bytes: int = MAX_LOG_BYTES,
) -> list[LogEntry]:
    """The group's audit log, read as an auditor identity of the service (registered if new,
    its key kept in `state_dir`)."""
    path = state_dir / f"{identity}.state"
    auditor = Participant(identity, ds_url, state_dir=state_dir)
    # New: no state file when the Participant read it (not a look before: a state saved in
    # between, by another audit, may be registered, and a refusal would delete it). The lock
    # then refuses one saved after.
    new = auditor._read_state is None
    try:
        # Locked whether new or not, as `conclave join` locks it. New: another audit starting
        # at once would make a key of its own too, save it over ours and, refused, delete the
        # file: the name registered to a key no one holds (locked, the second one is refused:
        # the file changed since it looked). Saved: a running join under this name would have
        # its state, a later epoch, overwritten by the one read here.
        try:
            auditor._lock_state()
        except StateInUse:
            raise ConclaveError(
                f"{identity} is running with the state directory {state_dir} (a `conclave "
                "join` under this name?): reading the log as it would save its state over the "
                "running one's; stop it first, or audit with another --as"
            ) from None
        # The key on disk before it is registered for good (as `Participant.start` does).
        auditor.save()
        try:
            await auditor.ds.register()
        except RequestFailed as exc:
            if new and exc.code in ("conflict", "reserved_name"):
                # The name is another key's (registered, or pinned by the service): the new
                # key was never registered, and a state file of it would only stand in the way
                # of the right one (a typo in --state would leave a key no one uses).
                path.unlink(missing_ok=True)
                (state_dir / f"{identity}.lock").unlink(missing_ok=True)
            raise
        if new:  # (locked: ours to save) confirmed, as `Participant.register` records it
            auditor._registered = True
            auditor.save()
        return await read_log(auditor.ds, group_id, max_bytes)
    finally:
        auditor._unlock_state()
        await auditor.ds.close()


async def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def create_and_invite(room: str, creator: Participant, invitees: list[Participant]) -> None:
    """`creator` creates `room` and adds `invitees` in one commit; returns once each of them has
    joined from its Welcome."""
    await creator.create(room)
    waits = [asyncio.ensure_future(p.wait_for_welcome()) for p in invitees]
    await creator.invite([p.name for p in invitees])
    await asyncio.gather(*waits)


async def run_demo(
    config: DemoConfig | None = None,
    on_update: Callable[[str, list[Participant]], None] | None = None,
) -> DemoResult:
    """Run the whole demo; `on_update(step, participants)` is called as it goes (for the table)."""
    config = config or DemoConfig()
    started = time.monotonic()
    result = DemoResult(ok=True)
    with tempfile.TemporaryDirectory(prefix="conclave-demo-") as tmp:
        state_dir = config.state_dir or Path(tmp)
        services = Services(
            db=config.db or str(Path(tmp) / "ds.sqlite3"), pg_schema=config.pg_schema
        )
        try:
            await services.start()
        except BaseException:  # cancelled half-way (SIGTERM): stop what did start
            await services.stop()
            raise
        names = ["alice", "bob", "carol", "dave"]
        people = [
            Participant(
                name, services.ds_url, services.sfu_url, state_dir=state_dir,
                rotation_period=config.rotation_period,
                media=MediaSpec(width=config.width, height=config.height, fps=config.fps, seed=i),
            )
            for i, name in enumerate(names)
        ]
        alice, bob, carol, dave = people
        shown: list[Participant] = []

        def update(step: str) -> None:
            if on_update is not None:
                on_update(step, shown)

        ticker: asyncio.Task[None] | None = None
        try:
            for p in people:
                await p.start()
            await create_and_invite(ROOM, alice, [bob, carol])
            shown += [alice, bob, carol]
            update("alice invited bob and carol")
            for p in (alice, bob, carol):
                await p.connect_media()

            async def tick() -> None:
                while True:
                    update(current_step)
                    await asyncio.sleep(0.25)

            current_step = "three in the call"
            ticker = asyncio.ensure_future(tick())
            await asyncio.sleep(config.phase)

            current_step = "dave asks to join; the first member to see it commits"
            await dave.knock(ROOM)
            shown.append(dave)
            await dave.connect_media()
            for p in (alice, bob, carol):
                await p.wait_epoch(dave.epoch or 0)
            await asyncio.sleep(config.phase)

            current_step = "alice asks to remove bob"
            before = dave.epoch or 0
            await alice.request_removal("bob")
            await until(lambda: bob.removed and all(
                (p.epoch or 0) > before for p in (alice, carol, dave)), 10.0)
            removal_epoch = min(p.epoch or 0 for p in (alice, carol, dave))
            result.check("bob removed", bob.removed, f"epoch {removal_epoch}")
            await asyncio.sleep(DRAIN)
            bob_before = sum(r.stats.frames_decrypted for r in bob.remote.values())
            others_before = {p.name: p.stats().decoded for p in (alice, carol, dave)}
            current_step = "keys rotate; bob hears nothing"
            epoch_now = max(p.epoch or 0 for p in (alice, carol, dave))
            rotated = await until(
                lambda: min(p.epoch or 0 for p in (alice, carol, dave)) > epoch_now,
                config.rotation_period * 1.5 + 2,
            )
            await asyncio.sleep(max(config.phase - 1, 0.5))
            ticker.cancel()
            update("done")

            # -- checks
            present = [alice, carol, dave]
            for p in present:
                for q in present:
                    if p is q:
                        continue
                    for kind in ("audio", "video"):
                        r = p.remote.get((q.name, kind))
                        decoded = 0 if r is None else r.decoded
                        result.check(f"{p.name} decodes {q.name}'s {kind}", decoded > 0,
                                     f"{decoded} frames")
            codes = {p.safety_code for p in present}
            result.check("same safety code for all members", len(codes) == 1, codes.pop())
            bob_after = sum(r.stats.frames_decrypted for r in bob.remote.values())
            bob_epochs = set().union(*(r.epochs for r in bob.remote.values()))
            result.check(
                "bob decrypts nothing after his removal",
                bob_after == bob_before and not any(e >= removal_epoch for e in bob_epochs),
                f"{bob_after - bob_before} frames after, epochs seen {sorted(bob_epochs)}",
            )
            grew = all(p.stats().decoded > others_before[p.name] for p in present)
            result.check("the others keep decoding", grew)
            result.check("keys rotated on the timer", rotated)
            group_id = alice.group_id
            result.group_id = group_id
            result.log = await fetch_log(services.ds_url, group_id, state_dir)
            try:
                result.report = audit(group_id, result.log)
                result.check("audit of the delivery service's log", True,
                             f"{len(result.report.rotations)} epochs verified")
            except Exception as exc:  # AuditFailure, reported as a failed check
                result.check("audit of the delivery service's log", False, str(exc))
            errors = [e for p in people for e in p.errors]
            result.check("no participant errors", not errors, "; ".join(errors[:3]))
        finally:
            if ticker is not None:
                ticker.cancel()
            for p in people:
                await p.close()
            await services.stop()
    result.elapsed = time.monotonic() - started
    return result
