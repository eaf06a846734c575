"""Loading the RFC test vectors from $CONCLAVE_VECTORS (default ../shared/vectors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(os.environ.get("CONCLAVE_VECTORS", ROOT.parent / "shared" / "vectors"))


def vector_path(relative: str) -> Path:
    return VECTORS / relative


def vector_cases(relative: str, key: str | None = None) -> list[Any]:
    """One `pytest.param` per case of a vector file, id `<file stem>[<index>]`.

    When the folder is absent, a single skipped param says why (the only skip allowed: no vectors).
    `key` selects a list inside a JSON object (e.g. the SFrame file's sections); the id is then
    `<stem>-<key>[<index>]`.
    """
    path = VECTORS / relative
    stem = Path(relative).stem if key is None else f"{Path(relative).stem}-{key}"
    if not path.exists():
        return [
            pytest.param(
                None,
                id=f"{stem}-missing",
                marks=pytest.mark.skip(reason=f"test vectors not found at {path}; set CONCLAVE_VECTORS"),
            )
        ]
    data = json.loads(path.read_text())
    if key is not None:
        data = data[key]
    return [pytest.param(case, id=f"{stem}[{i}]") for i, case in enumerate(data)]
