"""A second Ctrl-C once a call has ended exits 0 at once, also while `asyncio.run` winds down
(its wait for a worker thread that may never end: a getaddrinfo on a network gone away)."""

import subprocess
import sys
import textwrap
from pathlib import Path


def test_a_second_ctrl_c_while_asyncio_run_winds_down_exits_0_at_once(tmp_path: Path) -> None:
    # The call ends at once; an async generator left suspended is finalized by asyncio.run's
    # teardown, after the command returned: there it sends the second Ctrl-C and leaves a
    # worker thread that never ends, which asyncio.run then waits for (no timing involved).
    script = textwrap.dedent("""
        import asyncio, os, signal, sys, threading
        from conclave import cli

        never = threading.Event()

        async def winding_down():
            try:
                yield
            finally:
                os.kill(os.getpid(), signal.SIGINT)
                asyncio.get_running_loop().run_in_executor(None, never.wait)

        async def ended(args):
            cli.stop_on_signals()
            cli.call_ended(args)
            left = winding_down()
            await left.__anext__()
            print("frames: sent nothing", flush=True)
            return 0

        cli.COMMANDS["join"] = ended
        sys.argv = ["conclave", "join", "--room", "r", "--name", "n", "--no-commands"]
        sys.exit(cli.main())
    """)
    # (the timeout only ends a run that would hang: without the fix, the Ctrl-C is ignored)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        raise AssertionError("the second Ctrl-C was ignored while asyncio.run wound down") from None
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "frames: sent nothing\n" and proc.stderr == ""
