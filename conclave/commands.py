"""The commands a member types during `conclave join`, one per line on standard input:
membership changes (invite, remove, leave) and key rotation, without leaving the call."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from .errors import ConclaveError, ServiceUnavailable

if TYPE_CHECKING:
    from .participant import Participant

HELP = """\
commands, one per line (quote a name that holds spaces: remove 'mallory x'):
  members          the epoch, its members and its safety code, and who of them is in the
                   media session now (as the SFU says)
  invite NAME...   add members now; each needs KeyPackages on the delivery service (one
                   `conclave join` of that name, or any run of it, uploads them)
  remove NAME...   remove members now: no key of the next epoch reaches them (a name as
                   `members` shows it, escapes included, will do)
  rotate           fresh keys for everyone now
  leave            leave the call's group for good (another member commits it; the only
                   member leaves at once, by itself), then end
  quit             end the call and stay a member, as Ctrl-C does
  help             this list"""

# verb: (fewest names, most names or None)
VERBS: dict[str, tuple[int, int | None]] = {
    "members": (0, 0), "invite": (1, None), "remove": (1, None), "rotate": (0, 0),
    "leave": (0, 0), "quit": (0, 0), "help": (0, 0),
}
MAX_NAMES = 32  # per command, which is one commit
MAX_LINE = 16384  # bytes: room for MAX_NAMES names of the longest (255 bytes), quoted
FINISH_TIMEOUT = 10.0  # seconds the end of the call waits for a command under way

log = logging.getLogger(__name__)


class CommandError(ConclaveError):
    """A line that is no command, or a command that cannot be carried out now."""


@dataclass(frozen=True)
class Command:
    verb: str
    names: tuple[str, ...] = ()


def _words(line: str) -> list[str]:
    """The line's words, split at whitespace as a shell does, with quotes ('...' or "...")
    keeping a name's spaces. A backslash is an ordinary character: the escapes that
    `printable` shows (`\\xa0`) are typed as they are shown."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError:  # "No closing quotation"
        raise CommandError("a quote is not closed") from None


def parse_command(line: str) -> Command | None:
    """The command on `line`; None for a blank line. Raises `CommandError` saying what is
    wrong, before anything is done."""
    from .participant import check_name

    if len(line.rstrip("\r\n").encode("utf-8", "replace")) > MAX_LINE:
        raise CommandError(f"a line of more than {MAX_LINE} bytes: ignored")
    words = _words(line)
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
        try:
            check_name(name)
        except ConclaveError as exc:
            raise CommandError(str(exc)) from None
    return Command(verb, tuple(dict.fromkeys(names)))


def shown_name(name: str) -> str:
    """`name` as the commands show it, and as `remove` takes it back: hidden characters as
    escapes, and quoted if it has spaces, quotes or commas (a list's separator)."""
    from .cli import printable

    text = printable(name)
    if any(c in text for c in " '\","):
        return "'" + text.replace("'", "'\"'\"'") + "'"  # as a shell quotes: 'o'"'"'brien'
    return text


def listed(names: Iterable[str]) -> str:
    return ", ".join(shown_name(n) for n in names)


def _member_named(members: list[str], typed: str) -> str | None:
    """The member `typed` names: the one shown so (no two are: `printable` is one-to-one),
    else the one of that very name."""
    from .cli import printable

    return next((m for m in members if printable(m) == typed),
                typed if typed in members else None)


def _backslash_hint(typed: tuple[str, ...], strangers: list[str]) -> str:
    """For a name typed as a shell would take it, `a\\ b` (here two words, "a\\" and "b": a
    backslash is an ordinary character, so that names are typed as `members` shows them): how
    to type it, quoted. Empty if no word that names no member ends with a backslash."""
    for start, word in enumerate(typed):
        if word in strangers and word.endswith("\\"):
            # the words the backslashes would have joined: `a\\ b\\ c` is 'a b c'
            end = start
            while end + 1 < len(typed) and typed[end].endswith("\\"):
                end += 1
            joined = " ".join(w.removesuffix("\\") for w in typed[start:end + 1]).strip()
            example = shown_name(joined) if " " in joined else "'a b'"
            return (f" (a backslash does not escape a space here: quote a name with spaces, "
                    f"remove {example})")
    return ""


def presence_line(p: Participant) -> str:
    """Which members are in the media session now, as the SFU says (it may lie: it is not
    authenticated for this, though it cannot inject media that decrypts), or that this is
    unknown while the session is lost: never an ended session's word."""
    presence = p.media_presence()
    if presence is None:
        if p.media_lost:
            return "in the media session: unknown while it is lost (calling in again)"
        return "in the media session: unknown, as you are not in it now"
    shown = [shown_name(n) + (" (you)" if n == p.name else "") for n in presence.present]
    line = f"in the media session, as the SFU says: {', '.join(shown)}"
    if presence.absent:
        line += f"; not in it: {listed(presence.absent)}"
    if presence.strangers:
        # (a removed member whose room token has not run out yet, say: it gets no keys)
        line += (f"; and {presence.strangers} the SFU lists who "
                 f"{'is not a member' if presence.strangers == 1 else 'are not members'}")
    return line


class InCall:
    """Carries out commands for one participant in its call, one at a time. `quit` is set by
    the `quit` command; `left` says the member asked to leave (so its removal is no
    surprise)."""

    def __init__(self, participant: Participant, out: Callable[[str], None]) -> None:
        self.participant = participant
        self.out = out
        # The participant's notices (the delivery service lost, back) are lines of the call
        # like the others; `join` makes this object once it is in the call.
        participant.on_notice = out
        self.quit = asyncio.Event()
        self.left = False
        self._running: asyncio.Task[None] | None = None
        self._running_verb = ""

    async def run(self, command: Command) -> None:
        """Carry out `command`; a delivery service that cannot be reached makes a
        `CommandError` that says whether it was done and what to do."""
        import aiohttp

        from .participant import CommitUnconfirmed, _reason
        from .urls import shown_url

        verb = command.verb
        again = f"type {verb} again once the delivery service is back"
        try:
            await self._run(command)
        except CommitUnconfirmed as exc:
            raise CommandError(
                f"{verb} may have been done: {exc}; if no new epoch line shows once the "
                f"delivery service is back, {again}"
            ) from None
        except ServiceUnavailable as exc:
            raise CommandError(f"{verb} was not done: {exc}; {again}") from None
        except aiohttp.ClientConnectorError as exc:  # no connection: nothing was sent
            raise CommandError(
                f"{verb} was not done: cannot reach the delivery service at "
                f"{shown_url(self.participant.ds_url)} ({_reason(exc)}); {again}"
            ) from None
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
            raise CommandError(
                f"{verb} may not have reached the delivery service at "
                f"{shown_url(self.participant.ds_url)} ({_reason(exc)}); {again}"
            ) from None

    async def _run(self, command: Command) -> None:
        p = self.participant
        if command.verb == "help":
            self.out(HELP)
        elif command.verb == "quit":
            self.quit.set()
        elif p.group is None or p.removed:
            raise CommandError("you are not a member of the call now")
        elif command.verb == "members":
            self.out(f"epoch {p.epoch}: members {listed(p.member_names)}; safety code "
                     f"{p.safety_code}")
            if p.media_wanted:  # (a run with no media session has nothing to say of it)
                self.out(presence_line(p))
        elif command.verb == "rotate":
            if await p.rotate():
                self.out(f"rotated the keys: epoch {p.epoch}, safety code {p.safety_code}")
        elif command.verb == "remove":
            await self._remove(command.names)
        elif command.verb == "invite":
            await self._invite(command.names)
        elif command.verb == "leave":
            await self._leave()

    async def _remove(self, typed: tuple[str, ...]) -> None:
        p = self.participant
        members = p.member_names
        found = {t: _member_named(members, t) for t in typed}
        strangers = [t for t, name in found.items() if name is None]
        if strangers:
            raise CommandError(f"not members of the call: {listed(strangers)}"
                               + _backslash_hint(typed, strangers))
        names = list(dict.fromkeys(n for n in found.values() if n is not None))
        if p.name in names:
            raise CommandError("to remove yourself, use leave")
        if await p.remove(names):
            self.out(f"removed {listed(names)}: epoch {p.epoch}, safety code {p.safety_code}")
        else:  # they left, or were removed, meanwhile
            self.out(f"{listed(names)}: no longer members")

    async def _invite(self, names: tuple[str, ...]) -> None:
        p = self.participant
        members = [n for n in names if n in p.member_names]
        if members:
            raise CommandError(f"members of the call already: {listed(members)}")
        if await p.invite(list(names)):
            self.out(f"added {listed(names)}: epoch {p.epoch}, safety code {p.safety_code}; "
                     "they are in the call when they run `conclave join` for this room "
                     "(one in another room's call must leave it first)")
        else:
            self.out(f"{listed(names)}: members already")

    async def _leave(self) -> None:
        p = self.participant
        if p.alone:
            # A member cannot commit its own removal (RFC 9420 §12.2), and no one else would:
            # the group ends here, as for a removed member. (No confirmation, as for `leave`
            # with others: no command asks for one.)
            room = p.group_id.decode("utf-8", "replace")
            await p.leave_alone()
            self.left = True
            self.out(f"left room {room!r} for good: you were its only member, so you left it "
                     f"by yourself (its keys and its saved group are erased here, and {p.name} "
                     "may join another room); the room stays on the delivery service with no "
                     "one in its call and no member who can invite anyone, but "
                     f"`conclave join --room {shlex.quote(room)}` still enters it by itself "
                     "(an external commit), and finds your old leaf there")
            return
        await p.leave()
        self.left = True
        # The request stays with the service: a member may commit it after we quit, too.
        self.out("asked to leave: the call ends when another member commits it (if you quit "
                 "first, a member may still commit it later)")

    async def serve(
        self,
        lines: asyncio.Queue[str | None],
        err: Callable[[str], None],
        *,
        at_end: str | None = None,
    ) -> None:
        """Carry out each line of `lines` (None: no more, then `at_end` is said, if given), one
        command at a time; `quit` and `help` at once, even while a command is under way.
        Errors are printed with `err` and the call goes on."""
        from .cli import describe_error

        def report(exc: Exception) -> None:
            log.debug("in-call command failed", exc_info=exc)  # the details, with --debug
            with contextlib.suppress(OSError, ValueError):  # stderr gone: nothing to tell
                err(describe_error(exc))

        todo: asyncio.Queue[Command | None] = asyncio.Queue()

        async def work() -> None:
            while (command := await todo.get()) is not None:
                self._running_verb = command.verb
                self._running = asyncio.ensure_future(self.run(command))
                try:
                    # Shielded: the end of the call waits for it (`finish`), not cancels it.
                    await asyncio.shield(self._running)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    report(exc)

        worker = asyncio.ensure_future(work())
        try:
            while (line := await lines.get()) is not None:
                try:
                    command = parse_command(line)
                except CommandError as exc:
                    report(exc)
                    continue
                if command is None:
                    continue
                if command.verb in ("quit", "help"):
                    await self.run(command)
                else:
                    todo.put_nowait(command)
            todo.put_nowait(None)
            if at_end is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.out(at_end)
            await worker  # the input ended: what it asked for is still done
        finally:
            worker.cancel()

    async def finish(self, timeout: float = FINISH_TIMEOUT) -> None:
        """Let the command under way end, for at most `timeout` seconds, then cancel it: cut
        short after its commit, an invite would leave its invitee in the group without the
        Welcome to join it."""
        running = self._running
        if running is None or running.done():
            return
        with contextlib.suppress(OSError, ValueError):
            self.out(f"finishing {self._running_verb} first (at most {timeout:.0f} s)")
        await asyncio.wait({running}, timeout=timeout)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running  # its error, if any, was the worker's to report


def commands_wanted(stdin: TextIO | None = None) -> bool:
    """Whether standard input can bring commands: it exists and has a file descriptor."""
    stdin = sys.stdin if stdin is None else stdin
    if stdin is None or getattr(stdin, "closed", True):
        return False
    try:
        stdin.fileno()
    except (OSError, ValueError):
        return False
    return True


def read_lines(loop: asyncio.AbstractEventLoop, stdin: TextIO | None = None) -> asyncio.Queue[str | None]:
    """A queue of standard input's lines, then None at its end. A daemon thread reads the file
    descriptor itself: a blocked read must not delay the exit, nor hold the lock of
    `sys.stdin`'s buffer at shutdown (a fatal error), and asyncio's pipe reader would make a
    terminal non-blocking, which the shell then inherits. Of an overlong line only its first
    `MAX_LINE` + 1 bytes come, which `parse_command` refuses.

    A terminal is read only while this process is its foreground job: SIGTTIN, which would
    stop the whole call when it reads in the background (`&`, or Ctrl-Z then `bg`), is
    ignored, so such a read fails (EIO) instead, and is tried again a little later. Call from
    the main thread (signal handlers are set there)."""
    fd = (sys.stdin if stdin is None else stdin).fileno()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    tty = os.isatty(fd)
    if tty:
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)

    def put(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the call is over
            loop.call_soon_threadsafe(lines.put_nowait, line)

    def foreground() -> bool:
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:
            return True  # not our controlling terminal: no job control applies

    def read() -> bytes:
        while True:
            if tty:
                # Wait for input first, then read only in the foreground: a read begun in
                # the foreground would otherwise take the shell's next line after the job
                # lost the terminal.
                if not select.select([fd], [], [], 0.2)[0]:
                    continue
                if not foreground():
                    time.sleep(0.2)
                    continue
            try:
                return os.read(fd, 65536)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                time.sleep(0.2)  # a background job's terminal: wait to be in the foreground

    def reader() -> None:
        pending, skipping = b"", False
        try:
            while chunk := read():
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
