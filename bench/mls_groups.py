"""Benchmark of the MLS group operations (not a test): `python bench/mls_groups.py [--quick]`.

Cipher suite 1. For each group size N: the batched build of the group (one Commit adding N-1
members), then create/process times of add-one, remove-one, update with path on a fresh tree
(right after the batched build: the committer's copath is mostly unmerged leaves) and on a filled
copath (after every member has committed once, only log N encryptions), join by Welcome; median
of >= 5 runs; Commit and Welcome sizes. A reference row (a native Rust implementation on this
class of machine, from the issue) is printed beside the N=1024 results.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _env import at_least, environment  # noqa: E402

from mls.client import Client  # noqa: E402
from mls.group import Group  # noqa: E402

# Reference figures at N=1024 (ms), from the issue: native Rust implementation.
REFERENCE_1024 = {
    "update (process)": "3-6",
    "update filled (process)": "3-6",
    "update filled (create)": "9-11",
    "add-one (create)": "15",
    "add-one (process)": "11",
    "join by Welcome": "110-220",
    "batched build": "500-800",
}


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def process_on_copies(
    author: Group, receiver: Group, make: Callable[[], bytes], runs: int
) -> float:
    """Median time for a restored copy of `receiver` to process a fresh commit from `make` (the
    commit's author discards it): processing moves a group to the next epoch and deletes the
    old epoch's secrets, so each run starts from the same saved state."""
    saved = receiver.to_bytes()
    times = []
    for _ in range(runs):
        msg = make()
        author.discard_pending_commit()
        copy = Group.from_bytes(saved)
        copy._state.tree.tree_hash()  # warm the tree-hash cache, as a running client has it
        start = time.perf_counter()
        copy.process(msg)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def build(n: int, suite: int = 1) -> tuple[list[Client], Group, bytes, float]:
    clients = [Client(b"member-%d" % i, suite) for i in range(n)]
    kps = [c.key_package() for c in clients[1:]]
    creator = Group.create(clients[0])
    start = time.perf_counter()
    result = creator.add(kps) if kps else None
    build_ms = 1000 * (time.perf_counter() - start)
    creator.merge_pending_commit()
    return clients, creator, (result.welcome or b"") if result else b"", build_ms


def bench_size(n: int, runs: int) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    clients, creator, welcome, build_ms = build(n)
    # The median of `runs` builds (each from fresh clients; only the first group is kept).
    out["batched build"] = statistics.median(
        [build_ms] + [build(n)[3] for _ in range(runs - 1)]
    )
    out["welcome bytes"] = len(welcome)
    # A receiver: the last member joins (its join time is "join by Welcome").
    joiners: list[Group] = []
    if n > 1:
        # Each run joins from a fresh copy of the last member's client (a KeyPackage is
        # consumed by a join), decoded outside the clock.
        state = clients[-1].to_bytes()
        copies = iter([Client.from_bytes(state) for _ in range(runs)])
        out["join by Welcome"] = median_ms(lambda: Group.join(next(copies), welcome), runs)
        joiners.append(Group.join(clients[-1], welcome))
    receiver = joiners[0] if joiners else None

    def create_then_discard(make: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            r = make()
            creator.discard_pending_commit()
            return r

        return run

    def process_each(make: Callable[[], bytes]) -> float:
        """Median time for `receiver` to process a fresh commit, without changing it."""
        assert receiver is not None
        return process_on_copies(creator, receiver, make, runs)

    if receiver is not None:
        # Update on the fresh tree.
        out["update (create)"] = median_ms(create_then_discard(creator.update), runs)
        sample = creator.update()
        out["commit bytes (update)"] = len(sample.commit)
        creator.discard_pending_commit()
        out["update (process)"] = process_each(lambda: creator.update().commit)
        extra = [Client(b"extra-%d" % i) for i in range(2 * runs + 1)]
        kps = iter([c.key_package() for c in extra])
        out["add-one (create)"] = median_ms(create_then_discard(lambda: creator.add([next(kps)])), runs)
        out["add-one (process)"] = process_each(lambda: creator.add([next(kps)]).commit)
        victim = 1 if n > 2 else n - 1
        out["remove-one (create)"] = median_ms(
            create_then_discard(lambda: creator.remove([victim])), runs
        )
        out["remove-one (process)"] = process_each(lambda: creator.remove([victim]).commit)
    return out


def filled_copath(n: int, runs: int) -> dict[str, float]:
    """Update cost once the tree is full of parent keys (members committed in turn)."""
    if n < 2:
        return {}
    clients, creator, welcome, _ = build(n)
    # The members at leaves 1, 2, 4, ... each commit once: that fills the root of every
    # subtree on member 0's copath, so its next update encrypts to log N nodes only.
    leaves = [1 << k for k in range((n - 1).bit_length()) if 1 << k < n]
    groups = [creator] + [Group.join(clients[i], welcome) for i in leaves]
    for g in groups[1:]:
        r = g.update()
        g.merge_pending_commit()
        for other in groups:
            if other is not g:
                other.process(r.commit)
    receiver = groups[1]
    out = {"update filled (create)": median_ms(
        lambda: (creator.update(), creator.discard_pending_commit()), runs
    )}
    out["update filled (process)"] = process_on_copies(
        creator, receiver, lambda: creator.update().commit, runs
    )
    return out


def primitive_costs(runs: int = 200) -> dict[str, float]:
    """Cost (ms) of the primitives the operations are made of, measured in this run."""
    from mls.crypto import get_crypto

    c = get_crypto(1)
    sig_priv, sig_pub = c.signature_key_pair()
    hpke_priv, hpke_pub = c.hpke_key_pair()
    msg = bytes(200)
    signature = c.sign_with_label(sig_priv, b"x", msg)
    kem, ct = c.encrypt_with_label(hpke_pub, b"x", msg, bytes(32))
    secret = bytes(32)
    return {
        "sign": median_ms(lambda: c.sign_with_label(sig_priv, b"x", msg), runs),
        "verify": median_ms(lambda: c.verify_with_label(sig_pub, b"x", msg, signature), runs),
        "hpke encrypt": median_ms(lambda: c.encrypt_with_label(hpke_pub, b"x", msg, secret), runs),
        "hpke decrypt": median_ms(lambda: c.decrypt_with_label(hpke_priv, b"x", msg, kem, ct), runs),
        "derive key pair": median_ms(lambda: c.derive_key_pair(secret), runs),
    }


def crypto_floor(op: str, n: int, p: dict[str, float]) -> float | None:
    """The public-key crypto an operation cannot avoid (suite 1), from the primitive costs: the
    rest of the measured time is this implementation's overhead."""
    d = max(1, (n - 1).bit_length())
    if op == "update filled (create)":
        return d * (p["derive key pair"] + p["hpke encrypt"]) + 2 * p["sign"]
    if op == "update filled (process)":
        return p["hpke decrypt"] + d * p["derive key pair"] + 2 * p["verify"]
    if op == "join by Welcome":
        return p["hpke decrypt"] + (n + 1) * p["verify"]
    if op == "batched build":
        return (n - 1) * (2 * p["verify"] + p["hpke encrypt"]) + 2 * p["sign"]
    return None


def group_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated group sizes, each at least 2."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 2,8,32, got {text!r}") from None
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError(f"every group size must be at least 2, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=group_sizes, default=[2, 8, 32, 128, 512, 1024],
                        help="comma-separated group sizes, each >= 2 (default 2,8,32,128,512,1024)")
    parser.add_argument("--runs", type=at_least(1), default=5, help="runs per median (default 5)")
    parser.add_argument("--quick", action="store_true", help="N in 2, 8, 32 and 3 runs (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.runs = [2, 8, 32], 3
    sizes: list[int] = args.sizes
    print(environment())
    print(f"cipher suite 1, sizes {','.join(map(str, sizes))}, {args.runs} runs per median")
    rows: dict[int, dict[str, float | int]] = {}
    for n in sizes:
        row = bench_size(n, args.runs)
        row.update(filled_copath(n, args.runs))
        rows[n] = row
        print(f"N={n} done", file=sys.stderr, flush=True)
    keys = [
        "batched build",
        "join by Welcome",
        "update (create)",
        "update (process)",
        "update filled (create)",
        "update filled (process)",
        "add-one (create)",
        "add-one (process)",
        "remove-one (create)",
        "remove-one (process)",
        "commit bytes (update)",
        "welcome bytes",
    ]
    header = f"{'operation (ms, median of ' + str(args.runs) + ')':<34}" + "".join(
        f"{'N=' + str(n):>11}" for n in sizes
    ) + f"{'ref N=1024':>14}"
    print(header)
    print("-" * len(header))
    for key in keys:
        cells = []
        for n in sizes:
            v = rows[n].get(key)
            cells.append(f"{'-':>11}" if v is None else (
                f"{v:>11d}" if isinstance(v, int) else f"{v:>11.1f}"
            ))
        print(f"{key:<34}" + "".join(cells) + f"{REFERENCE_1024.get(key, ''):>14}")
    print("(ref N=1024: a native Rust implementation's figures from the issue, not measured in"
          " this run nor on this machine; the in-run reference is the primitive costs below)")
    prims = primitive_costs()
    print()
    print("primitive costs in this run (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in prims.items()))
    print("measured / unavoidable public-key crypto (1.0 = no overhead beyond the primitives):")
    for key in ("batched build", "join by Welcome", "update filled (create)",
                "update filled (process)"):
        ratios = []
        for n in sizes:
            floor = crypto_floor(key, n, prims)
            v = rows[n].get(key)
            ratios.append(f"{'-':>11}" if floor is None or v is None else f"{v / floor:>11.2f}")
        print(f"{key:<34}" + "".join(ratios))


if __name__ == "__main__":
    main()
