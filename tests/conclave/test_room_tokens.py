"""Room tokens in the media session: members renew theirs, a removed member's session ends."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from conclave.demo import create_and_invite, until
from conclave.media import MediaSpec
from conclave.participant import Participant
from conclave.services import Services


async def test_members_keep_their_session_past_the_token_lifetime_and_the_removed_leave(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    services = Services(db=str(tmp_path / "ds.sqlite3"), room_token_ttl=3)
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
            await asyncio.sleep(7.5)  # two and a half token lifetimes
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
            assert carol.sfu is None
            await asyncio.sleep(4)
            assert sfu.metrics.participants() == 2
            assert sorted(sfu.rooms[alice.group_id.hex()].participants) == ["alice", "bob"]
        assert alice.errors == [] and bob.errors == [] and carol.errors == []
    finally:
        for p in people:
            await p.close()
        await services.stop()
