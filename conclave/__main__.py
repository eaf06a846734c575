"""The `conclave` command's entry point (the console script, and `python -m conclave`).

Kept free of imports: importing `conclave.cli` takes tens of milliseconds, and a Ctrl-C in
them, before `cli.main` is there to catch it, would print a KeyboardInterrupt traceback.
"""

import sys


def main() -> int:
    """`conclave.cli.main`, imported here so that Ctrl-C while it loads exits 130 quietly (as
    Ctrl-C later does: the README's Exit statuses)."""
    loaded = False
    try:
        from .cli import main as cli_main

        loaded = True
        return cli_main()
    except KeyboardInterrupt:
        if not loaded:
            stopped_starting(sys.argv[1:])
        return 130
    finally:
        _forget_interrupts()


def stopped_starting(argv: list[str]) -> None:
    """For a `join` stopped by Ctrl-C or SIGTERM before its command line was read (modules
    still loading): the line README promises a stopped join, saying where it leaves the user."""
    command = next((word for word in argv if not word.startswith("-")), None)
    if command == "join":
        print("conclave join: stopped while starting: nothing was joined; the same "
              "`conclave join` again joins", file=sys.stderr, flush=True)


def _forget_interrupts() -> None:
    """Keep a KeyboardInterrupt handled here or in `cli.main` from ending the process by SIGINT.

    CPython marks a KeyboardInterrupt that leaves code run by `exec`/`eval` of a *string* as
    unhandled, even if it is caught later, and then ends the process by SIGINT (-2 to a
    parent, with no traceback) instead of with its exit status. Such code runs while
    `conclave.cli` and the modules it reads load (the methods of a dataclass or namedtuple):
    Ctrl-C there made 130 into -2. The next such run that ends normally clears the mark: this
    one. A copy of `sfu.__main__._forget_interrupts`, whose module this one must not import
    (aiohttp and the SFU's server: a wide window for a traceback)."""
    exec("")  # noqa: S102 - a string on purpose: see above


if __name__ == "__main__":
    sys.exit(main())
