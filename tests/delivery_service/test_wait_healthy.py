"""`wait_healthy`: the one /healthz poll that tests, benches and the call bench share."""

from __future__ import annotations

import time

from delivery_service.client import wait_healthy

from .conftest import Served
from .procs import free_port


async def test_true_once_the_service_answers(served: Served) -> None:
    assert await wait_healthy(served.url, timeout=5)


async def test_false_after_the_timeout_when_nothing_listens() -> None:
    start = time.monotonic()
    assert not await wait_healthy(f"http://127.0.0.1:{free_port()}", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 5


async def test_false_at_once_when_the_process_is_gone() -> None:
    start = time.monotonic()
    assert not await wait_healthy(f"http://127.0.0.1:{free_port()}", timeout=30, alive=lambda: False)
    assert time.monotonic() - start < 5
