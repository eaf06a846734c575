"""`python -m mls selftest`: one line per step and suite, exit status says whether all passed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mls.__main__ as selftest_module
from mls.crypto import CipherSuite


def test_selftest_passes_every_suite() -> None:
    lines: list[str] = []
    assert selftest_module.selftest(lines.append) == 0
    steps = [line for line in lines if line.startswith("ok ")]
    assert len(steps) == 5 * len(CipherSuite)
    for suite in CipherSuite:
        assert sum(suite.name in line for line in steps) == 5
    assert lines[-1] == "selftest: all 7 cipher suites passed"


def test_selftest_reports_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    real = selftest_module.Group.export_secret
    calls = {"n": 0}

    def flaky(self, label: bytes, context: bytes, length: int) -> bytes:  # type: ignore[no-untyped-def]
        calls["n"] += 1
        out = real(self, label, context, length)
        # Every member but the first of each comparison sees a different secret.
        return out if calls["n"] % 2 else bytes(length)

    monkeypatch.setattr(selftest_module.Group, "export_secret", flaky)
    lines: list[str] = []
    assert selftest_module.selftest(lines.append) == 1
    assert any(line.startswith("FAIL") and "add two members" in line for line in lines)
    assert "FAILED" in lines[-1]


def test_selftest_command_line() -> None:
    usage = subprocess.run(
        [sys.executable, "-m", "mls"], capture_output=True, text=True, check=False
    )
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_help_is_not_an_error() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "mls", "--help"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0 and "selftest" in shown.stdout and not shown.stderr
