"""What a first-time user of `conclave` ran into: each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

import conclave.cli as cli
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services


def test_ctrl_c_while_the_command_line_is_read_is_a_quiet_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C right after Enter lands in parse_args, which imports the participant's modules
    # (a third of a second): a traceback came out, and Python's own exit status.
    def interrupted(argv: list[str] | None = None) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse_args", interrupted)
    try:
        status = cli.main(["join", "--room", "standup", "--name", "carol"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main(): Python prints its traceback")
    assert status == 130
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err


async def test_a_second_run_of_a_name_is_not_told_to_use_another_state(
    services: Services, tmp_path: Path
) -> None:
    # The advice was "stop it first, or use another --state"; a new --state is a new key,
    # which the delivery service refuses for the running one's name.
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "a")
    await alice.start()
    try:
        again = Participant("alice", services.ds_url, state_dir=tmp_path / "a")
        with pytest.raises(ConclaveError, match="alice is running already") as info:
            await again.start()
        await again.close()
        message = str(info.value)
        assert "or use another --state" not in message
        assert "another name" in message
        # What the message now says of another --state is what happens:
        elsewhere = Participant("alice", services.ds_url, state_dir=tmp_path / "b")
        with pytest.raises(ConclaveError, match="registered with another key"):
            await elsewhere.start()
        await elsewhere.close()
    finally:
        await alice.close()


async def test_inviting_a_name_without_key_packages_says_how_to_get_some(
    services: Services, tmp_path: Path
) -> None:
    # The service's "no KeyPackage left for 'dave'" was all: for a name that never joined
    # (or a typo) it neither fits nor says what to do.
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "s")
    await alice.start()
    try:
        await alice.create("standup")
        with pytest.raises(ConclaveError) as info:
            await alice.invite(["dave"])
        message = str(info.value)
        assert message.startswith("cannot invite 'dave': ")
        assert "conclave join" in message and "spelling" in message
        assert alice.epoch == 0  # nothing committed
    finally:
        await alice.close()


async def test_an_sfu_of_another_service_is_named_as_the_wrong_sfu(tmp_path: Path) -> None:
    # A reachable SFU with another room-token secret (the derived port, where another
    # `conclave serve` runs; a --sfu typo) passes the probe, and the room is joined before
    # the SFU can check a token. The error was "the SFU refused n: room token refused: bad
    # signature (not issued for this SFU)": neither what to change nor that n is a member now.
    ours = Services(db=str(tmp_path / "ours.sqlite3"))
    theirs = Services(db=str(tmp_path / "theirs.sqlite3"))
    await ours.start()
    await theirs.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conclave.cli", "join", "--room", "standup", "--name", "zed",
            "--ds", ours.ds_url, "--sfu", theirs.sfu_url, "--state", str(tmp_path / "state"),
            "--no-commands", "--no-audio",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 2, (out, err)
        text = err.decode()
        assert text.count("\n") == 1 and "Traceback" not in text
        assert "bad signature" in text
        assert f"the SFU at {theirs.sfu_url} is not the one this delivery service" in text
        assert "check --sfu" in text and "stays a member of room 'standup'" in text
        # ... and it is: the next join with the right SFU rejoins the saved call.
        zed = Participant("zed", ours.ds_url, state_dir=tmp_path / "state")
        try:
            await zed.start()
            assert await zed.enter("standup") == "rejoined"
        finally:
            await zed.close()
    finally:
        await theirs.stop()
        await ours.stop()
