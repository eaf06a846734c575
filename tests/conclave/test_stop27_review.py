"""A review of test_stop27_small's four changes: the media session's lost line, delayed, must
not come once the session is over for good (a removal, a service that says not a member);
showing the URLs of a text takes time in proportion to its length, and shows a zone's `%25`
once even in a message of ours that shows it already; `audit --log` still reads a log through a
link or a redirection of standard input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from conclave import participant as participant_module
from conclave.audit import load_log, save_log
from conclave.errors import NotInGroup, ServiceUnavailable
from conclave.participant import Participant, _reason
from conclave.urls import shown_url, shown_urls

from .test_media_outage_notice import _answers, _session
from .test_media_outage_notice import _participant as _outage_participant

ZONED_SFU = "http://[fe80::1%zz9]:8443/v1/signal"  # as Conclave holds it: the zone decoded
NOT_A_MEMBER = "alice is no longer a member of the call (removed while away?)"

# -- the media session's lost line, once the session is over for good


def _participant(lines: list[str]) -> Participant:
    return _outage_participant(lines, ZONED_SFU)


async def _settled(p: Participant) -> None:
    """Every task of `p` ended: a lost line still waiting for its grace period (an hour here)
    fails the test instead."""
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*p._tasks, return_exceptions=True)
    except TimeoutError:
        for task in list(p._tasks):
            task.cancel()
        pytest.fail("a line is still to come once the media session is over for good")


async def test_a_removal_within_the_grace_period_tells_no_lost_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: the lost line, due after MEDIA_LOST_AFTER, still came after the removal ("calling
    # in again ... a line will say so"), which the call tells itself ("you were removed").
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines)
    calling, removed = asyncio.Event(), asyncio.Event()

    async def connect_media(*, e2ee: bool = True) -> None:
        calling.set()
        await removed.wait()
        raise NotInGroup(f"{NOT_A_MEMBER}: a member must add alice again")

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    follow = asyncio.ensure_future(p._follow_media_session(first, _answers()))
    async with asyncio.timeout(30):
        await calling.wait()
        await p._mark_removed()  # the commit that removed us, within the grace period
        removed.set()
        await follow
    await _settled(p)
    assert lines == []


async def test_not_a_member_any_more_within_the_grace_period_is_told_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The delivery service refuses a room token (403) before the removal's commit arrives:
    # before, the lost line came after the grace period saying "calling in again", which had
    # stopped already.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 3600.0)
    lines: list[str] = []
    p = _participant(lines)

    async def connect_media(*, e2ee: bool = True) -> None:
        raise NotInGroup(f"{NOT_A_MEMBER}: a member must add alice again")

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    async with asyncio.timeout(30):
        await p._follow_media_session(first, _answers())
    await _settled(p)
    [line] = lines
    assert line.startswith("lost the media session at http://[fe80::1%25zz9]:8443/v1/signal, "
                           "and not calling in again: ")
    assert NOT_A_MEMBER in line and "calling in again)" not in line


async def test_a_lost_line_told_is_followed_by_why_the_session_is_not_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: "lost ... (calling in again) ... until it is back (a line will say so)", and no
    # line after it, ever.
    monkeypatch.setattr(participant_module, "MEDIA_LOST_AFTER", 0.0)
    lines: list[str] = []
    p = _participant(lines)

    async def connect_media(*, e2ee: bool = True) -> None:
        if not lines:  # not back before the lost line is told
            raise ServiceUnavailable("cannot reach the SFU")
        raise NotInGroup(f"{NOT_A_MEMBER}: a member must add alice again")

    monkeypatch.setattr(p, "connect_media", connect_media)
    first = _session()
    p.sfu = first
    await first.events.put({"type": "closed"})
    async with asyncio.timeout(30):
        await p._follow_media_session(first, _answers())
    await _settled(p)
    lost, why = lines
    assert "lost the media session" in lost and "a line will say so" in lost
    assert "not calling in again" in why and NOT_A_MEMBER in why


# -- URLs in a text


def test_a_zone_in_a_message_of_ours_is_shown_once() -> None:
    # Before: `_reason` showed the URLs of our own messages again: `%2525zz9`, a zone of its
    # own (`25zz9`), in every note and log line about such an error.
    said = f"cannot reach the SFU at {shown_url(ZONED_SFU)}: refused"
    assert _reason(ServiceUnavailable(said)) == said
    assert "[fe80::1%25zz9]" in said


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("1http://u:p@h/x", "1http://u:***@h/x"),  # a scheme after a digit, as before
        ("(see http://u:p@[fe80::1%eth0]:1)", "(see http://u:***@[fe80::1%25eth0]:1)"),
        ("see.http://u:p@h", "see.http://u:***@h"),
        ("123://u:p@h", "123://u:p@h"),  # no letter: no scheme
        ("a [1%2] range, http://h/[a%b]", "a [1%2] range, http://h/[a%b]"),  # no host's
        ("http://h/?password=x", "http://h/?password=x"),  # (a query is no user information)
    ],
)
def test_what_shown_urls_finds(text: str, shown: str) -> None:
    assert shown_urls(text) == shown


@pytest.mark.parametrize(
    "text", ["'a' * 1_000_000", "'http://' + '[' * 1_000_000", "'http://' + '[a' * 500_000"]
)
def test_a_long_text_is_shown_in_time_in_proportion_to_its_length(text: str) -> None:
    # Before: tried at each letter of a run (or each "["), a 1 MB error text took hours. A
    # process of its own, stopped after a minute: linear, it takes milliseconds.
    code = f"from conclave.urls import shown_urls; shown_urls({text})"
    try:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"shown_urls({text}) took over a minute")


# -- audit --log: what still works


def _saved_log(path: Path) -> bytes:
    group_id = bytes(range(16))
    save_log(path, group_id, [])
    return group_id


def test_a_log_through_a_link_is_read(tmp_path: Path) -> None:
    group_id = _saved_log(tmp_path / "saved.log")
    (tmp_path / "link.log").symlink_to("saved.log")
    assert load_log(tmp_path / "link.log") == (group_id, [])


def test_a_log_redirected_to_standard_input_is_read(tmp_path: Path) -> None:
    # `conclave audit --log /dev/stdin < saved.log`: /dev/stdin names the file itself.
    if not Path("/dev/stdin").exists():
        pytest.skip("no /dev/stdin here")
    group_id = _saved_log(tmp_path / "saved.log")
    code = ("from pathlib import Path; from conclave.audit import load_log; "
            "print(load_log(Path('/dev/stdin'))[0].hex())")
    with (tmp_path / "saved.log").open("rb") as stdin:
        run = subprocess.run([sys.executable, "-c", code], stdin=stdin, capture_output=True,
                             text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == group_id.hex()
