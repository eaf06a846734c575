"""The `conclave` entry point: Ctrl-C while `conclave.cli` is still being imported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PATIENCE = 20.0  # seconds: far more than any step here takes on a loaded machine

# Put on PYTHONPATH: the import of asyncio (which `conclave.cli` imports, Python's startup does
# not) blocks, after saying so in a file, so that the test's SIGINT lands inside that import.
SHIM = """
import os, sys, time

class _BlockAsyncio:
    def find_spec(self, name, path=None, target=None):
        if name == "asyncio":
            sys.meta_path.remove(self)
            open(os.environ["CONCLAVE_TEST_IMPORTING"], "w").close()
            time.sleep(60)  # interrupted by the test's SIGINT
        return None

sys.meta_path.insert(0, _BlockAsyncio())
"""

COMMANDS = {
    "console-script": [str(Path(sys.executable).parent / "conclave")],
    "python-m": [sys.executable, "-m", "conclave"],
}


@pytest.mark.parametrize("how", sorted(COMMANDS))
def test_ctrl_c_while_importing_exits_130_quietly(how: str, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SHIM)
    mark = tmp_path / "importing"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CONCLAVE_TEST_IMPORTING=str(mark))
    proc = subprocess.Popen([*COMMANDS[how], "--help"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + PATIENCE
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mark.exists(), "the import of asyncio never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert out == ""  # stopped before the help


@pytest.mark.parametrize("how", sorted(COMMANDS))
def test_entry_point_runs_the_cli(how: str) -> None:
    proc = subprocess.run([*COMMANDS[how], "--help"], capture_output=True, text=True,
                          timeout=PATIENCE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: conclave ")


def test_entry_module_imports_nothing_heavy() -> None:
    # Whatever it imports before its try is a window where Ctrl-C prints a traceback.
    code = "import sys, conclave.__main__; print(sorted({'asyncio', 'conclave.cli'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=PATIENCE)
    assert proc.stdout.strip() == "[]", proc.stderr
