"""The `conclave` command's entry point (the console script, and `python -m conclave`).

Kept free of imports: importing `conclave.cli` takes tens of milliseconds, and a Ctrl-C in
them, before `cli.main` is there to catch it, would print a KeyboardInterrupt traceback.
"""

import sys


def main() -> int:
    """`conclave.cli.main`, imported here so that Ctrl-C while it loads exits 130 quietly (as
    Ctrl-C later does: the README's Exit statuses)."""
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
