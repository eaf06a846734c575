"""The interop-passive vectors (same format as the passive-client files): join, then follow."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vectors import vector_cases

from .test_passive_client import run_passive_case

INTEROP_PASSIVE_FILES = [
    f"mls/interop-passive/{name}.json"
    for name in (
        "application",
        "branch",
        "commit",
        "external_join",
        "external_proposals",
        "reinit",
        "welcome_join",
    )
]


@pytest.mark.parametrize("case", [c for f in INTEROP_PASSIVE_FILES for c in vector_cases(f)])
def test_interop_passive(case: dict[str, Any]) -> None:
    run_passive_case(case)
