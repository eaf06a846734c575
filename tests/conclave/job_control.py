"""A terminal session for `conclave join`'s command reader, run as a script by the tests.

A pty stands for the terminal and a forked session leader for the shell. The job (the reader
in a child process) starts in the foreground; then either it is stopped and continued in the
background (Ctrl-Z, `bg`), or it just loses the terminal. A line typed meanwhile is the shell's:
the job must neither take it nor be stopped (SIGTTIN). Brought back to the foreground (`fg`),
it must read the next line. The log gets one line per fact: `job read: ...`, `job state: ...`.

Usage: python job_control.py (ctrl-z-bg | loses-terminal) LOG
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import sys
import termios
import time

JOB = r"""
import asyncio, sys
from conclave.commands import read_lines

async def main() -> None:
    lines = read_lines(asyncio.get_running_loop())
    with open(sys.argv[1], "a", buffering=1) as log:
        log.write("job started\n")
        while (line := await lines.get()) is not None:
            log.write(f"job read: {line!r}\n")

asyncio.run(main())
"""
PATIENCE = 20.0  # seconds: a step that should take far less on a loaded machine


def _wait_for(log: str, text: str) -> None:
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        with open(log) as f:
            if text in f.read():
                return
        time.sleep(0.05)


def _shell(how: str, log: str, slave: int, to_parent: int, from_parent: int) -> None:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # the shell sets the foreground job
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        os.dup2(slave, 0)
        os.execv(sys.executable, [sys.executable, "-c", JOB, log])
    try:
        _drive(how, log, slave, job, to_parent, from_parent)
    finally:
        os.kill(job, signal.SIGKILL)  # whatever happened: no job left behind
        os.waitpid(job, 0)


def _drive(how: str, log: str, slave: int, job: int, to_parent: int, from_parent: int) -> None:
    with contextlib.suppress(OSError):  # as shells do; the job set it itself (or exec'd first)
        os.setpgid(job, job)
    os.tcsetpgrp(slave, job)  # started in the foreground
    _wait_for(log, "job started")
    time.sleep(0.3)  # its read is under way
    if how == "ctrl-z-bg":
        os.kill(job, signal.SIGTSTP)
        os.waitpid(job, os.WUNTRACED)
        os.tcsetpgrp(slave, os.getpgrp())
        os.kill(job, signal.SIGCONT)
    else:
        os.tcsetpgrp(slave, os.getpgrp())
    os.write(to_parent, b"b")  # type the shell's line now
    os.read(from_parent, 1)
    time.sleep(1.0)  # time for the job to take it, or be stopped, if it would
    pid, status = os.waitpid(job, os.WNOHANG | os.WUNTRACED)
    state = ("running" if pid == 0 else f"stopped by {signal.Signals(os.WSTOPSIG(status)).name}"
             if os.WIFSTOPPED(status) else "ended")
    with open(log, "a") as f:
        f.write(f"job state: {state}\n")
    termios.tcflush(slave, termios.TCIFLUSH)  # the shell took its line
    os.tcsetpgrp(slave, job)  # fg
    os.kill(job, signal.SIGCONT)
    os.write(to_parent, b"f")  # type the job's line now
    _wait_for(log, "job read: 'members")


def main() -> None:
    how, log = sys.argv[1], sys.argv[2]
    open(log, "w").close()
    master, slave = pty.openpty()
    up_read, up_write = os.pipe()
    down_read, down_write = os.pipe()
    shell = os.fork()
    if shell == 0:
        try:
            for fd in (master, up_read, down_write):
                os.close(fd)
            _shell(how, log, slave, up_write, down_read)
        finally:
            os._exit(0)
    # Only the shell holds these ends now: if it dies, the reads below end (EOF) at once.
    for fd in (slave, up_write, down_read):
        os.close(fd)
    os.read(up_read, 1)
    os.write(master, b"ls -l\n")  # at the shell's prompt
    os.write(down_write, b"t")
    os.read(up_read, 1)
    os.write(master, b"members\n")  # to the job, in the foreground again
    os.waitpid(shell, 0)


if __name__ == "__main__":
    main()
