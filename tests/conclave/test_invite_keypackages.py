"""An invite that fails does not use up its invitees' KeyPackages: one claimed but in no commit
that may have gone in is used by the next invite of that name (RFC 9420 §16.8 forbids only
using an init key for two Welcomes); a KeyPackage that the clocks make unusable is said plainly;
and no message shows the password of a URL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

import conclave.participant as participant_module
from conclave.errors import ConclaveError, ServiceUnavailable
from conclave.participant import Participant, _reason
from conclave.services import Services
from delivery_service.errors import RequestFailed
from tests.conclave.conftest import until
from tests.conclave.test_lost_commit_answer import LosingPosts

DAY = 24 * 3600


@pytest.fixture
async def pair(services: Services, tmp_path: Path) -> AsyncIterator[tuple[Participant, Participant]]:
    """alice alone in a call, and dave, who is not in it yet (KeyPackages uploaded)."""
    alice = Participant("alice", services.ds_url, state_dir=tmp_path / "state")
    dave = Participant("dave", services.ds_url, state_dir=tmp_path / "state")
    try:
        await alice.start()
        await dave.start()
        await alice.create("room")
        yield alice, dave
    finally:
        await dave.close()
        await alice.close()


class CountingClaims:
    """Wraps `p.ds.claim_key_package`: counts the KeyPackages claimed, by name."""

    def __init__(self, p: Participant) -> None:
        self.real = p.ds.claim_key_package
        self.claimed: dict[str, int] = {}
        p.ds.claim_key_package = self.claim  # type: ignore[method-assign]

    async def claim(self, name: str) -> bytes:
        kp = await self.real(name)
        self.claimed[name] = self.claimed.get(name, 0) + 1
        return kp


async def test_a_kept_key_package_is_used_after_another_name_fails(
    pair: tuple[Participant, Participant],
) -> None:
    alice, dave = pair
    claims = CountingClaims(alice)
    with pytest.raises(ConclaveError, match="no KeyPackage of 'nobody'"):
        await alice.invite(["dave", "nobody"])
    assert alice.member_names == ["alice"]
    assert await alice.invite(["dave"])
    assert claims.claimed == {"dave": 1}  # the one claimed by the failed invite
    await dave.wait_for_welcome(5)  # and the Welcome made with it works
    await until(lambda: dave.epoch == alice.epoch)


async def test_a_kept_key_package_is_used_after_the_commit_was_refused(
    pair: tuple[Participant, Participant],
) -> None:
    alice, dave = pair
    claims = CountingClaims(alice)
    real = alice.ds.send

    async def refuse(group_id: bytes, message: bytes, **kw: Any) -> Any:
        raise RequestFailed(403, "forbidden", "not now")  # an answer: nothing was stored

    alice.ds.send = refuse  # type: ignore[method-assign]
    with pytest.raises(RequestFailed, match="not now"):
        await alice.invite(["dave"])
    alice.ds.send = real  # type: ignore[method-assign]
    assert await alice.invite(["dave"])
    assert claims.claimed == {"dave": 1}
    await dave.wait_for_welcome(5)
    await until(lambda: dave.epoch == alice.epoch)


async def test_a_key_package_in_a_commit_that_may_be_in_is_not_used_again(
    pair: tuple[Participant, Participant],
) -> None:
    alice, dave = pair
    claims = CountingClaims(alice)
    # Lost answers to the post and the post again: the commit may be in, so its KeyPackage
    # counts as used (it was not, and the next invite drops the commit first).
    LosingPosts(alice, stored=False, lose=2)
    with pytest.raises(ServiceUnavailable):
        await alice.invite(["dave"])
    assert await alice.invite(["dave"])
    assert claims.claimed == {"dave": 2}
    await dave.wait_for_welcome(5)


async def test_a_kept_key_package_that_expired_is_dropped_for_a_fresh_one(
    pair: tuple[Participant, Participant], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, dave = pair
    claims = CountingClaims(alice)
    with pytest.raises(ConclaveError, match="no KeyPackage of 'nobody'"):
        await alice.invite(["dave", "nobody"])
    # The kept one is past its lifetime by now (this machine's clock, moved on by 91 days);
    # fresh ones are not: dave's replacements are made on the same clock.
    later = time.time() + 91 * DAY
    monkeypatch.setattr(participant_module, "_wall_clock", lambda: int(later))
    kept = alice._spare_key_packages["dave"][0]
    fresh = dave.client.key_package(lifetime=200 * DAY // 2)  # 100 days
    await dave.ds.upload_key_packages([fresh])
    real_claim = claims.real

    async def claim_fresh(name: str) -> bytes:
        kp = await real_claim(name)
        while kp != fresh:  # the older ones (uploaded at start) would be expired too
            kp = await real_claim(name)
        return kp

    claims.real = claim_fresh  # type: ignore[assignment]
    monkeypatch.setattr(participant_module.Group, "add", _recording_add(kept))
    assert await alice.invite(["dave"])
    assert claims.claimed == {"dave": 2}


def _recording_add(kept: bytes) -> Any:
    real = participant_module.Group.add

    def add(self: Any, key_packages: list[bytes], *args: Any, **kw: Any) -> Any:
        assert kept not in key_packages  # expired: never added
        return real(self, key_packages, *args, **kw)

    return add


# -- KeyPackages the clocks make unusable


async def test_an_expired_key_package_of_an_invitee_says_so(
    pair: tuple[Participant, Participant], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, dave = pair
    ahead = time.time() + 100 * DAY  # this machine's clock, 100 days ahead of the service's
    monkeypatch.setattr(participant_module, "_wall_clock", lambda: int(ahead), raising=False)
    # (the MLS library's own check, on the same wrong clock)
    import mls.proposal_validation

    monkeypatch.setattr(mls.proposal_validation, "time", SimpleNamespace(time=lambda: ahead))
    with pytest.raises(ConclaveError) as caught:
        await alice.invite(["dave"])
    text = str(caught.value)
    assert "dave" in text and "expired" in text and "clock" in text
    assert alice.member_names == ["alice"] and alice.epoch == 0


async def test_own_key_packages_refused_as_expired_say_what_to_do(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mls.client

    behind = time.time() - 100 * DAY  # this machine's clock, 100 days behind the service's
    monkeypatch.setattr(mls.client, "time", SimpleNamespace(time=lambda: behind))
    erin = Participant("erin", services.ds_url, state_dir=tmp_path / "state")
    try:
        with pytest.raises(ConclaveError) as caught:
            await erin.start()
    finally:
        await erin.close()
    text = str(caught.value)
    assert "erin" in text and "expired" in text and "clock" in text


# -- URLs with a password


def test_a_library_error_quoting_a_url_shows_no_password() -> None:
    exc = aiohttp.InvalidUrlClientError("http://user:hunter2@127.0.0.1:99999/v1/challenges")
    text = _reason(exc)
    assert "hunter2" not in text and "user:***@127.0.0.1:99999" in text


async def test_an_unusable_ds_url_with_a_password_is_not_shown(tmp_path: Path) -> None:
    p = Participant("frank", "http://user:hunter2@127.0.0.1:99999", state_dir=tmp_path)
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await p.start()
    finally:
        await p.close()
    assert "hunter2" not in str(caught.value)
