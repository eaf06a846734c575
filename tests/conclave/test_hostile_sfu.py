"""A participant against an SFU that is not trusted: no file outside --record, no call storm."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from conclave import participant as participant_module
from conclave.participant import Participant


@pytest.mark.parametrize(
    "publisher", ["../../escaped", "/tmp/abs", "..", "", "a/b\\c", "bob\x00", "é" * 100]
)
def test_recordings_stay_in_the_record_dir_whatever_the_sfu_calls_a_publisher(
    tmp_path: Path, publisher: str
) -> None:
    record = tmp_path / "rec"
    record.mkdir()
    p = Participant("alice", "http://127.0.0.1:9", record_dir=record)
    for kind in ("audio", "video", "../x"):
        path = p._recording_path(publisher, kind)
        assert path.parent == record and not path.name.startswith(".")
        path.write_bytes(b"")  # the next one must not replace it
        assert p._recording_path(publisher, kind) != path


async def test_an_sfu_that_hangs_up_after_each_join_is_called_with_a_growing_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(participant_module, "MEDIA_RETRY_FIRST", 0.05)
    monkeypatch.setattr(participant_module, "MEDIA_RETRY_MAX", 0.4)
    p = Participant("alice", "http://127.0.0.1:9")
    p._media_backoff = 0.05
    calls: list[float] = []

    class _HungUp:
        def __init__(self) -> None:
            self.events: asyncio.Queue[dict] = asyncio.Queue()
            self.events.put_nowait({"type": "closed"})  # joined, then the SFU hung up

        async def close(self) -> None:
            pass

    async def connect_media(e2ee: bool = True) -> None:
        calls.append(asyncio.get_running_loop().time())
        client = _HungUp()
        p.sfu = client  # type: ignore[assignment]
        p._spawn(p._follow_media_session(client))  # type: ignore[arg-type]

    monkeypatch.setattr(p, "connect_media", connect_media)
    await connect_media()
    await asyncio.sleep(1.5)
    for task in list(p._tasks):
        task.cancel()
    # 0.05, 0.1, 0.2, 0.4, 0.4, ... s apart: a handful, not hundreds
    assert 4 <= len(calls) <= 8, len(calls)
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[-1] >= 0.35
