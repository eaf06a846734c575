"""Room tokens in the media session: members renew theirs, a removed member's session ends."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from conclave.demo import create_and_invite, until
from conclave.media import MediaSpec
from conclave.participant import MIN_RENEWAL_WAIT, Participant, _renewal_delay
from conclave.services import Services
from delivery_service.client import RoomToken

TTL = 6  # seconds: a renewal (at 4.5 s after the token arrived) has 1.5 s to reach the SFU


def _decodes(p: Participant, publisher: str, not_this: object = None) -> bool:
    remote = p.remote.get((publisher, "video"))
    return remote is not None and remote is not not_this and remote.decoded > 0


def test_renewals_are_timed_by_the_tokens_lifetime_not_the_wall_clock() -> None:
    far_past = int(time.time()) - 10_000  # as a client clock far ahead would see it
    assert _renewal_delay(RoomToken("r", "t", far_past, 1, ttl=600)) == 450
    assert _renewal_delay(RoomToken("r", "t", int(time.time()) + 600, 1)) == pytest.approx(450, abs=2)
    # an old service without ttl, and a clock that makes the token look expired: not a spin
    assert _renewal_delay(RoomToken("r", "t", far_past, 1)) == MIN_RENEWAL_WAIT


async def test_members_keep_their_session_past_the_token_lifetime_and_the_removed_leave(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    services = Services(db=str(tmp_path / "ds.sqlite3"), room_token_ttl=TTL)
    await services.start()
    people = [
        Participant(name, services.ds_url, services.sfu_url, state_dir=tmp_path / "state",
                    media=MediaSpec(width=96, height=64, fps=10, seed=i))
        for i, name in enumerate(("alice", "bob", "carol"))
    ]
    alice, bob, carol = people
    try:
        for p in people:
            await p.start()
        await create_and_invite("room", alice, [bob, carol])
        for p in people:
            await p.connect_media()
        assert services.sfu is not None
        sfu = services.sfu
        assert await until(lambda: sfu.metrics.participants() == 3, 15)
        sessions = {p.name: p.sfu for p in people}
        with caplog.at_level(logging.WARNING, logger="conclave.participant"):
            await asyncio.sleep(2.2 * TTL)  # renewed twice (each at 3/4 of the lifetime)
            # renewed in time: the same sessions, nobody had to call in again
            assert {p.name: p.sfu for p in people} == sessions
            assert sfu.metrics.participants() == 3
            assert "the media session ended" not in caplog.text
            before = bob.remote[("alice", "video")].decoded
            assert await until(lambda: bob.remote[("alice", "video")].decoded > before, 5)

            assert await alice.remove(["carol"])
            assert await until(lambda: carol.removed, 10)
            # carol left the room as soon as she learnt of her removal, and stays out
            assert await until(lambda: sfu.metrics.participants() == 2, 5)
            assert carol.sfu is None and carol._token_renewal is None
            await asyncio.sleep(1)
            assert sfu.metrics.participants() == 2
            assert sorted(sfu.rooms[alice.group_id.hex()].participants) == ["alice", "bob"]

            # added back, she calls in again by herself and sees alice's video again
            before_removal = carol.remote.get(("alice", "video"))
            assert await alice.invite(["carol"])
            await carol.wait_for_welcome(10)
            assert await until(lambda: sfu.metrics.participants() == 3, 15)
            assert await until(lambda: carol.sfu is not None and _decodes(carol, "alice", before_removal), 15)
        assert alice.errors == [] and bob.errors == [] and carol.errors == []
    finally:
        for p in people:
            await p.close()
        await services.stop()
