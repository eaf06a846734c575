"""`conclave audit` stopped by Ctrl-C or SIGTERM while it waits on the delivery service."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conclave.participant import Participant

PATIENCE = 20.0  # seconds: far more than any step here takes on a loaded machine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_audit_stops_with_130_and_no_traceback(sig: signal.Signals, tmp_path: Path) -> None:
    # A "delivery service" that takes the connection and never answers: the audit waits on it.
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(PATIENCE)
        ds = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "conclave", "audit", "--group", "room", "--ds", ds,
             "--state", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            conn, _ = server.accept()  # the audit's request is under way
            with conn:
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=PATIENCE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    # the auditor's lock was let go: a later audit or join may take it
    again = Participant("auditor", ds, state_dir=tmp_path)
    again._lock_state()
    again._unlock_state()
