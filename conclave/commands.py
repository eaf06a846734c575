"""The commands a member types during `conclave join`, one per line on standard input:
membership changes (invite, remove, leave) and key rotation, without leaving the call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from .errors import ConclaveError

if TYPE_CHECKING:
    from .participant import Participant

HELP = """\
commands, one per line:
  members          the epoch, its members and its safety code
  invite NAME...   add members now; each needs KeyPackages on the delivery service (one
                   `conclave join` of that name, or any run of it, uploads them)
  remove NAME...   remove members now: no key of the next epoch reaches them
  rotate           fresh keys for everyone now
  leave            leave the call's group for good (another member commits it), then end
  quit             end the call and stay a member, as Ctrl-C does
  help             this list"""

# verb: (fewest names, most names or None)
VERBS: dict[str, tuple[int, int | None]] = {
    "members": (0, 0), "invite": (1, None), "remove": (1, None), "rotate": (0, 0),
    "leave": (0, 0), "quit": (0, 0), "help": (0, 0),
}
MAX_NAMES = 32  # per command, which is one commit
MAX_LINE = 16384  # bytes: room for MAX_NAMES names of the longest (255 bytes)


class CommandError(ConclaveError):
    """A line that is no command, or a command that cannot be carried out now."""


@dataclass(frozen=True)
class Command:
    verb: str
    names: tuple[str, ...] = ()


def parse_command(line: str) -> Command | None:
    """The command on `line`; None for a blank line. Raises `CommandError` saying what is
    wrong, before anything is done."""
    from .participant import check_name

    if len(line.rstrip("\r\n").encode("utf-8", "replace")) > MAX_LINE:
        raise CommandError(f"a line of more than {MAX_LINE} bytes: ignored")
    words = line.split()
    if not words:
        return None
    verb, names = words[0].lower(), words[1:]
    if verb not in VERBS:
        shown = verb if len(verb) <= 40 else verb[:40] + "..."
        raise CommandError(f"unknown command {shown!r} (help lists them)")
    fewest, most = VERBS[verb]
    if most == 0 and names:
        raise CommandError(f"{verb} takes no names")
    if len(names) < fewest:
        raise CommandError(f"{verb} needs at least one name: {verb} NAME...")
    if len(names) > MAX_NAMES:
        raise CommandError(f"{verb}: at most {MAX_NAMES} names at once")
    for name in names:
        check_name(name)
    return Command(verb, tuple(dict.fromkeys(names)))


def _listed(names: list[str] | tuple[str, ...]) -> str:
    from .cli import printable

    return ", ".join(printable(n) for n in names)


class InCall:
    """Carries out commands for one participant in its call. `quit` is set by `quit` and
    `leave`'s end; `left` says the member asked to leave (so its removal is no surprise)."""

    def __init__(self, participant: Participant, out: Callable[[str], None]) -> None:
        self.participant = participant
        self.out = out
        self.quit = asyncio.Event()
        self.left = False

    async def run(self, command: Command) -> None:
        p = self.participant
        if command.verb == "help":
            self.out(HELP)
        elif command.verb == "quit":
            self.quit.set()
        elif p.group is None or p.removed:
            raise CommandError("you are not a member of the call now")
        elif command.verb == "members":
            self.out(f"epoch {p.epoch}: members {_listed(p.member_names)}; safety code "
                     f"{p.safety_code}")
        elif command.verb == "rotate":
            if await p.rotate():
                self.out(f"rotated the keys: epoch {p.epoch}, safety code {p.safety_code}")
        elif command.verb == "remove":
            await self._remove(command.names)
        elif command.verb == "invite":
            await self._invite(command.names)
        elif command.verb == "leave":
            await self._leave()

    async def _remove(self, names: tuple[str, ...]) -> None:
        p = self.participant
        if p.name in names:
            raise CommandError("to remove yourself, use leave")
        strangers = [n for n in names if n not in p.member_names]
        if strangers:
            raise CommandError(f"not members of the call: {_listed(strangers)}")
        if await p.remove(list(names)):
            self.out(f"removed {_listed(names)}: epoch {p.epoch}, safety code {p.safety_code}")
        else:  # they left, or were removed, meanwhile
            self.out(f"{_listed(names)}: no longer members")

    async def _invite(self, names: tuple[str, ...]) -> None:
        p = self.participant
        members = [n for n in names if n in p.member_names]
        if members:
            raise CommandError(f"members of the call already: {_listed(members)}")
        if await p.invite(list(names)):
            self.out(f"added {_listed(names)}: epoch {p.epoch}, safety code {p.safety_code}; "
                     f"they are in the call when they run `conclave join` for this room")
        else:
            self.out(f"{_listed(names)}: members already")

    async def _leave(self) -> None:
        p = self.participant
        if p.member_names == [p.name]:
            # A member cannot commit its own removal (RFC 9420 §12.2): no one else would.
            raise CommandError("you are the only member, so no one can commit your leaving; "
                               "quit ends the call and the group stays yours")
        await p.leave()
        self.left = True
        self.out("asked to leave: the call ends when a member commits it (Ctrl-C stops "
                 "waiting, and you stay a member)")

    async def serve(self, lines: asyncio.Queue[str | None], err: Callable[[str], None]) -> None:
        """Carry out each line of `lines` (None: no more), one at a time; errors are printed
        with `err` and the call goes on."""
        from .cli import describe_error

        while (line := await lines.get()) is not None:
            try:
                command = parse_command(line)
                if command is not None:
                    await self.run(command)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err(describe_error(exc))


def commands_wanted(stdin: TextIO | None = None) -> bool:
    """Whether to read commands from standard input: it exists, and is not the terminal of a
    background job (reading it would stop the whole process, SIGTTIN)."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None or stdin.closed:
        return False
    try:
        fd = stdin.fileno()
        if os.isatty(fd):
            return os.tcgetpgrp(fd) == os.getpgrp()
    except (OSError, ValueError):
        return False
    return True


def read_lines(loop: asyncio.AbstractEventLoop, stdin: TextIO | None = None) -> asyncio.Queue[str | None]:
    """A queue of standard input's lines, then None at its end. A daemon thread reads the file
    descriptor itself: a blocked read must not delay the exit, nor hold the lock of
    `sys.stdin`'s buffer at shutdown (a fatal error), and asyncio's pipe reader would make a
    terminal non-blocking, which the shell then inherits. Of an overlong line only its first
    `MAX_LINE` + 1 bytes come, which `parse_command` refuses."""
    fd = (sys.stdin if stdin is None else stdin).fileno()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the call is over
            loop.call_soon_threadsafe(lines.put_nowait, line)

    def reader() -> None:
        pending, skipping = b"", False
        try:
            while chunk := os.read(fd, 65536):
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line, pending = pending[: end + 1], pending[end + 1 :]
                    if not skipping:
                        put(line[: MAX_LINE + 1].decode("utf-8", "replace"))
                    skipping = False
                if len(pending) > MAX_LINE:
                    if not skipping:
                        put(pending[: MAX_LINE + 1].decode("utf-8", "replace"))
                    pending, skipping = b"", True
        except OSError:
            pass  # closed under us: no more commands
        if pending and not skipping:
            put(pending.decode("utf-8", "replace"))
        put(None)

    threading.Thread(target=reader, name="conclave-commands", daemon=True).start()
    return lines
