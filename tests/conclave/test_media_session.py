"""The media session to the SFU: a participant calls in again when it ends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conclave.demo import create_and_invite, until
from conclave.media import MediaSpec
from conclave.participant import Participant, RemoteTrack
from conclave.services import Services


def _decodes(p: Participant, publisher: str, not_this: RemoteTrack | None = None) -> bool:
    remote = p.remote.get((publisher, "video"))
    return remote is not None and remote is not not_this and remote.decoded > 0


@pytest.mark.parametrize("down_for", [0.0, 2.5], ids=["at-once", "after-2.5s"])
async def test_participants_call_in_again_after_the_sfu_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, down_for: float
) -> None:
    services = Services(db=str(tmp_path / "ds.sqlite3"))
    await services.start()
    people = [
        Participant(name, services.ds_url, services.sfu_url, state_dir=tmp_path / "state",
                    media=MediaSpec(width=96, height=64, fps=10, seed=i))
        for i, name in enumerate(("alice", "bob"))
    ]
    alice, bob = people
    try:
        for p in people:
            await p.start()
        await create_and_invite("room", alice, [bob])
        for p in people:
            await p.connect_media()
        assert await until(lambda: _decodes(alice, "bob") and _decodes(bob, "alice"), 15)
        before = {p.name: (p.sfu, p.remote[("bob" if p is alice else "alice", "video")])
                  for p in people}

        with caplog.at_level(logging.WARNING, logger="conclave.participant"):
            await services.restart_sfu(down_for)  # every media session ends
            assert await until(
                lambda: _decodes(alice, "bob", before["alice"][1])
                and _decodes(bob, "alice", before["bob"][1]),
                20,
            )
        assert alice.sfu is not before["alice"][0] and bob.sfu is not before["bob"][0]
        assert "the media session ended" in caplog.text
        if down_for:  # the first tries found no SFU: they were retried
            assert "cannot call in again" in caplog.text
        assert alice.errors == [] and bob.errors == []
        assert services.sfu is not None and services.sfu.metrics.participants() == 2
    finally:
        for p in people:
            await p.close()
        await services.stop()
