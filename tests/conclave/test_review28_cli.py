"""Review of the stop's CLI changes: the delivery service's refusals in words (no HTTP status
and error code), keeping when to try again for a refusal that passes (429, 503)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conclave.cli import describe_error, fetch_log_as
from conclave.errors import ConclaveError
from conclave.participant import Participant, _reason
from conclave.services import Services
from delivery_service.errors import RequestFailed


def test_too_many_requests_names_the_seconds_to_wait() -> None:
    # Before: "the delivery service said: too many challenges requested from your address:
    # retry after the given seconds", the seconds given to no one.
    exc = RequestFailed(429, "too_many_requests", "too many challenges requested from your "
                        "address: retry after the given seconds", retry_after=30)
    assert describe_error(exc) == (
        "the delivery service said: too many challenges requested from your address: retry "
        "after 30 s"
    )
    # Another reason with seconds to wait: they follow it.
    other = RequestFailed(429, "too_many_requests", "close one first", retry_after=5)
    assert describe_error(other) == "the delivery service said: close one first (try again in 5 s)"


def test_a_proxys_unavailable_answer_says_to_try_again() -> None:
    # A proxy's 503 (not CBOR): its reason is the status alone, which said no more.
    exc = RequestFailed(503, "http_error", "HTTP 503")
    assert describe_error(exc) == "the delivery service said: HTTP 503: try again later"
    # The service's own 503 says when already: not said twice.
    own = RequestFailed(503, "unavailable", "the database is unreachable: retry shortly")
    assert describe_error(own) == (
        "the delivery service said: the database is unreachable: retry shortly"
    )
    # A refusal that does not pass gets no such advice.
    assert describe_error(RequestFailed(403, "forbidden", "not a member")) == (
        "the delivery service said: not a member"
    )


def test_a_refusal_as_a_reason_has_no_status_and_code() -> None:
    # `_reason` words the warnings of a call-in and a commit's lost answer.
    exc = RequestFailed(503, "unavailable", "the database is unreachable")
    assert _reason(exc) == "the database is unreachable: try again later"


async def test_a_refused_registration_is_in_words(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: object) -> None:
        raise RequestFailed(429, "too_many_requests", "too many challenges outstanding on "
                            "this service: retry after the given seconds", retry_after=60)

    monkeypatch.setattr("delivery_service.client.DeliveryClient.register", refuse)
    carol = Participant("carol", services.ds_url, state_dir=tmp_path)
    with pytest.raises(ConclaveError) as info:
        await carol.start()
    await carol.close()
    text = str(info.value)
    assert text.startswith(
        f"the delivery service at {services.ds_url} refused to register carol: too many "
        "challenges outstanding on this service: retry after 60 s; the new key of carol is kept"
    )
    assert "429" not in text and "too_many_requests" not in text


async def test_a_refused_proposal_is_in_words(trio: list[Participant]) -> None:
    _, bob, _ = trio

    async def refuse(group_id: bytes, message: bytes, **kwargs: Any) -> Any:
        raise RequestFailed(503, "unavailable", "the database is unreachable")

    bob.ds.send = refuse  # type: ignore[method-assign]
    with pytest.raises(ConclaveError) as info:
        await bob.request_removal("carol")
    assert str(info.value) == (
        "the delivery service refused the proposal: the database is unreachable: try again "
        "later: nothing was proposed"
    )


async def test_a_refused_audit_log_is_in_words(tmp_path: Path) -> None:
    async def fetch(*args: Any, **kwargs: Any) -> Any:
        raise RequestFailed(503, "unavailable", "the database cannot answer it now: disk full")

    ds = "http://127.0.0.1:1"
    with pytest.raises(ConclaveError) as info:
        await fetch_log_as(ds, b"\x01" * 16, tmp_path, "auditor", fetch, label="room 'r'")
    assert str(info.value) == (
        f"the delivery service {ds} refused the audit log of room 'r': the database cannot "
        "answer it now: disk full: try again later"
    )
