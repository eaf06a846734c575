"""`python -m mls selftest`: builds a small group in every cipher suite and checks it agrees.

For each suite: create, add two members, one update, remove one, exchange an application message.
One line per step and suite; exit status 0 on success, 1 with the failing step named otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .client import Client
from .crypto import CipherSuite
from .errors import MLSError
from .group import Group


class SelftestFailure(Exception):
    pass


def _agree(groups: list[Group], what: str) -> None:
    first = groups[0]
    for g in groups[1:]:
        if g.epoch != first.epoch or g.epoch_authenticator != first.epoch_authenticator:
            raise SelftestFailure(
                f"{what}: member at leaf {g.leaf_index} disagrees on epoch {first.epoch}"
            )
        if g.export_secret(b"selftest", b"", 32) != first.export_secret(b"selftest", b"", 32):
            raise SelftestFailure(f"{what}: member at leaf {g.leaf_index} exports another secret")


def run_suite(suite: CipherSuite, out: Callable[[str], None]) -> None:
    name = suite.name
    state: dict[str, Group] = {}
    alice, bob, carol = (Client(n, suite) for n in (b"alice", b"bob", b"carol"))

    def step(label: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except (MLSError, SelftestFailure) as exc:
            out(f"FAIL {name:<52} {label:<22} {exc}")
            raise SelftestFailure(f"{name}: {label}: {exc}") from exc
        out(f"ok   {name:<52} {label:<22} {1000 * (time.perf_counter() - start):7.1f} ms")

    def create() -> None:
        state["a"] = Group.create(alice)

    def add() -> None:
        ga = state["a"]
        result = ga.add([bob.key_package(), carol.key_package()])
        ga.merge_pending_commit()
        if result.welcome is None:
            raise SelftestFailure("the add commit produced no Welcome")
        state["b"] = Group.join(bob, result.welcome)
        state["c"] = Group.join(carol, result.welcome)
        _agree([state["a"], state["b"], state["c"]], "add")

    def update() -> None:
        gb = state["b"]
        result = gb.update()
        gb.merge_pending_commit()
        state["a"].process(result.commit)
        state["c"].process(result.commit)
        _agree([state["a"], state["b"], state["c"]], "update")

    def remove() -> None:
        ga = state["a"]
        result = ga.remove([state["c"].leaf_index])
        ga.merge_pending_commit()
        state["b"].process(result.commit)
        if not state["c"].process(result.commit).removed:
            raise SelftestFailure("the removed member did not notice its removal")
        _agree([state["a"], state["b"]], "remove")

    def application() -> None:
        message = state["a"].encrypt_application(b"selftest")
        got = state["b"].process(message)
        if got.data != b"selftest" or got.sender != state["a"].leaf_index:
            raise SelftestFailure("the application message did not round-trip")

    for label, fn in (
        ("create", create),
        ("add two members", add),
        ("update", update),
        ("remove one member", remove),
        ("application message", application),
    ):
        step(label, fn)


def selftest(out: Callable[[str], None] = print) -> int:
    failures = 0
    for suite in CipherSuite:
        try:
            run_suite(suite, out)
        except SelftestFailure as exc:
            failures += 1
            out(f"selftest failed: {exc}")
    if failures:
        out(f"selftest: {failures} of {len(CipherSuite)} cipher suites FAILED")
        return 1
    out(f"selftest: all {len(CipherSuite)} cipher suites passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print("usage: python -m mls selftest\n\n" + (__doc__ or "").strip())
        return 0
    if args != ["selftest"]:
        print("usage: python -m mls selftest", file=sys.stderr)
        return 2
    return selftest()


if __name__ == "__main__":
    sys.exit(main())
