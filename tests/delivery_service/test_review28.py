"""Review of the delivery service's start-up and shutdown signals (stop 28): what the first
review left."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .test_startup_signals import _env, late_signal_script


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_once_aiohttp_removed_its_handlers_is_no_death_by_the_signal(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # aiohttp removes its signal handlers at the end of the stop; the loop then finalises what
    # is left (an async generator here) and closes. Before: that removal put back the default
    # action, and a SIGTERM there (a second one while "stopping") ended the service by the
    # signal (-15), without "stopped". Now held, as once run_app returned: status 0.
    (tmp_path / "late.py").write_text(late_signal_script(sig) + "print('returned')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "late", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.rstrip().endswith("INFO delivery_service stopped"), proc.stderr
    assert proc.stdout == "returned\n"  # main returned: the library caller goes on


def test_main_leaves_the_callers_signal_handlers_as_they_were(tmp_path: Path) -> None:
    # A library caller's own handlers are its again once main returns, after a stop by a
    # signal too: neither `_hold` nor the default action left behind.
    (tmp_path / "caller.py").write_text(
        "import signal, sys\n"
        "import delivery_service.__main__ as m\n"
        "def mine(signum, frame):\n"
        "    pass\n"
        "for s in (signal.SIGINT, signal.SIGTERM):\n"
        "    signal.signal(s, mine)\n"
        "real = m.web.run_app\n"
        "async def stop(app):\n"
        "    signal.raise_signal(signal.SIGTERM)\n"
        "def run_app(app, **kwargs):\n"
        "    app.on_startup.append(stop)\n"
        "    real(app, **kwargs)\n"
        "m.web.run_app = run_app\n"
        "m.main(['--db', sys.argv[1], '--port', '0', '--log-level', 'INFO'])\n"
        "print(signal.getsignal(signal.SIGINT) is mine, signal.getsignal(signal.SIGTERM) is mine,\n"
        "      m._signalled)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "caller", str(tmp_path / "ds.sqlite3")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stderr, proc.stderr
    assert proc.stdout == "True True []\n", proc.stderr
