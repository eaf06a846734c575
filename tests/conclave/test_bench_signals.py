"""`conclave bench` stopped by Ctrl-C or SIGTERM mid-run: status 130, no traceback, and nothing
left behind (a script's process group, the call's services, its temporary directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conclave.cli import build_parser

PATIENCE = 60.0  # seconds: far more than any step here takes on a loaded machine
README = Path(__file__).resolve().parents[2] / "README.md"

# A bench script that starts a child (which inherits its session), writes the child's pid and
# sleeps: the child is what a delivery service or an SFU started by a script would be.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(f"{child.pid}")
time.sleep(600)
"""

# `conclave bench --only mls` with the spawner as its one script.
DRIVER = """
import sys
from pathlib import Path
from conclave import bench
from conclave.cli import main
bench.BENCH_DIR = Path(sys.argv[1])
bench.SCRIPTS = [("mls_tree", "mls", "spawner.py", [sys.argv[2]], [sys.argv[2]])]
sys.exit(main(["bench", "--only", "mls", "--out", sys.argv[3]]))
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for init to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def processes_naming(text: str) -> list[int]:
    """The live processes whose command line holds `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes() and running(int(cmdline.parent.name)):
                found.append(int(cmdline.parent.name))
        except (OSError, ValueError):
            continue
    return found


def wait_until(ready: object, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not ready():  # type: ignore[operator]
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the benchmark never got under way"
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> str:
    """Send `sig` to the running benchmark; its stderr once it has exited."""
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_bench_kills_the_running_script_with_its_children(
    sig: signal.Signals, tmp_path: Path
) -> None:
    (tmp_path / "spawner.py").write_text(SPAWNER)
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path), str(pid_file), str(tmp_path / "out")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    child = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text(), proc)
        child = int(pid_file.read_text())
        err = stop(proc, sig)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        assert not running(child)
        assert not processes_naming(str(tmp_path / "spawner.py"))
    finally:  # a failed test leaves no sleeper behind either
        for pid in processes_naming(str(tmp_path / "spawner.py")) + (
                [child] if child is not None and running(child) else []):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_call_leaves_no_services_and_no_temporary_directory(
    sig: signal.Signals, tmp_path: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "conclave", "bench", "--quick", "--only", "call",
         "--out", str(tmp_path / "out")],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        # the call's services are running (`conclave serve --state <its temporary directory>`)
        wait_until(lambda: processes_naming(str(tmp)), proc)
        err = stop(proc, sig)
        assert proc.returncode == 130, err
        assert "Traceback" not in err, err
        assert not processes_naming(str(tmp))
        assert not list(tmp.iterdir())
    finally:
        for pid in processes_naming(str(tmp)):
            os.kill(pid, signal.SIGKILL)


def test_the_exit_statuses_name_130_for_a_stopped_bench() -> None:
    text = README.read_text()
    section = text[text.index("## Exit statuses"):]
    section = " ".join(section[: section.index("\n## ")].split())
    bench = section[section.index("- `bench`:"):]
    assert "130 for Ctrl-C or SIGTERM" in bench[: bench.index("- Any command")]
    assert "during demo, audit or bench" in " ".join(build_parser().format_help().split())
