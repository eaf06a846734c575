"""Benchmark (not a test): ratchet tree and TreeKEM costs against group size.

Usage: python bench/mls_tree.py [--quick] [--suite N]

For N = 2 .. 1024 members it builds a full tree whose parents were all set by real UpdatePaths
(commits from every even leaf), then measures, each as the best of several repeats:

- copy:     `RatchetTree.copy()`, what the Group pays to apply a Commit all-or-nothing
- add:      copy + `add_leaf` + root tree hash (an Add proposal); N is a power of two, so this is
            the worst case: the tree doubles and N new blank subtree nodes are hashed once
- create:   copy + `create_update_path` from leaf 0 (the committer)
- process:  copy + `process_update_path` at leaf N-1 (a receiver)
- validate: `RatchetTree.decode` + `validate_ratchet_tree`, cold caches (a joiner)

next to references measured in the same run: one HPKE EncryptWithLabel and the cold tree hash of
the whole tree (`RatchetTree.decode` + `tree_hash`, so that validate minus it is roughly the
signature and parent-hash checks). Times are wall clock (perf_counter). Targets: copy well under one HPKE operation at N=1024; create and process grow
with log N (about 2 log N and log N HPKE operations), not with N.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _env import environment  # noqa: E402

from mls.credential import Credential  # noqa: E402
from mls.crypto import Crypto, get_crypto  # noqa: E402
from mls.errors import UnsupportedCipherSuite  # noqa: E402
from mls.group_context import GroupContext  # noqa: E402
from mls.key_package import Capabilities, LeafNode, LeafNodeSource, Lifetime  # noqa: E402
from mls.leaf_validation import sign_leaf_node, validate_ratchet_tree  # noqa: E402
from mls.ratchet_tree import RatchetTree  # noqa: E402
from mls.treekem import (  # noqa: E402
    TreeKEMPrivateState,
    UpdatePathResult,
    create_update_path,
    process_update_path,
)

GROUP_ID = b"bench group"


def best_us(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        run()
        best = min(best, (time.perf_counter_ns() - start) / 1000)
    return best


def context(crypto: Crypto) -> Callable[[bytes], bytes]:
    def provisional(tree_hash: bytes) -> bytes:
        return GroupContext(crypto.suite, GROUP_ID, 1, tree_hash, b"").encode()

    return provisional


def build(crypto: Crypto, n: int) -> tuple[RatchetTree, dict[int, bytes], TreeKEMPrivateState]:
    """A tree of `n` members whose parents were all set by UpdatePaths; returns the tree, the
    signature keys and the private state of leaf n-1."""
    sigs: dict[int, bytes] = {}
    tree = RatchetTree(crypto)
    receiver_priv = b""
    for i in range(n):
        sig_priv, sig_pub = crypto.signature_key_pair()
        enc_priv, enc_pub = crypto.hpke_key_pair()
        leaf = LeafNode(
            enc_pub,
            sig_pub,
            Credential.basic(b"m%d" % i),
            Capabilities(cipher_suites=[crypto.suite], credentials=[1]),
            LeafNodeSource.key_package,
            Lifetime(0, 2**63),
        )
        leaf = sign_leaf_node(crypto, leaf, sig_priv)
        if i == 0:
            tree = RatchetTree(crypto, [leaf])
        else:
            tree.add_leaf(leaf)
        sigs[i] = sig_priv
        receiver_priv = enc_priv
    receiver = TreeKEMPrivateState.from_leaf_private(crypto, n - 1, receiver_priv)
    provisional = context(crypto)
    for committer in range(0, n - 1, 2):
        before = tree.copy()
        result = create_update_path(
            tree,
            committer,
            group_id=GROUP_ID,
            signature_priv=sigs[committer],
            provisional_context=provisional,
        )
        receiver = process_update_path(
            before, receiver, committer, result.update_path, provisional_context=provisional
        ).private_state
    return tree, sigs, receiver


def measure(
    crypto: Crypto, n: int, repeats: int, provisional: Callable[[bytes], bytes]
) -> tuple[float, float, float, float, float, float]:
    """(copy, add, create, process, validate, cold hash) in microseconds for `n` members."""
    tree, sigs, receiver = build(crypto, n)
    tree.tree_hash()
    copy_us = best_us(tree.copy, repeats * 20)

    def add() -> None:
        t = tree.copy()
        t.add_leaf(t.leaf_node(0))  # type: ignore[arg-type]
        t.tree_hash()

    holder: list[UpdatePathResult] = []

    def create() -> None:
        t = tree.copy()
        holder[:] = [
            create_update_path(
                t, 0, group_id=GROUP_ID, signature_priv=sigs[0], provisional_context=provisional
            )
        ]

    add_us = best_us(add, repeats)
    create_us = best_us(create, repeats)
    path = holder[0].update_path

    def process() -> None:
        process_update_path(tree.copy(), receiver, 0, path, provisional_context=provisional)

    encoded = tree.encode()

    def validate() -> None:
        validate_ratchet_tree(RatchetTree.decode(crypto, encoded), group_id=GROUP_ID)

    process_us = best_us(process, repeats)
    validate_us = best_us(validate, 1 if n >= 512 else repeats)
    cold_us = best_us(lambda: RatchetTree.decode(crypto, encoded).tree_hash(), repeats)
    return copy_us, add_us, create_us, process_us, validate_us, cold_us


def suite(text: str) -> Crypto:
    """An argparse type: an MLS cipher suite number this library supports."""
    try:
        return get_crypto(int(text, 0))
    except (ValueError, UnsupportedCipherSuite) as exc:
        raise argparse.ArgumentTypeError(
            str(exc) if isinstance(exc, UnsupportedCipherSuite) else f"not a number: {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N up to 128, best of 3 (smoke run)")
    parser.add_argument("--suite", type=suite, default="1", help="MLS cipher suite (default 1)")
    args = parser.parse_args(argv)
    crypto: Crypto = args.suite
    sizes = [2, 8, 32, 128] if args.quick else [2, 8, 32, 128, 512, 1024]
    repeats = 3 if args.quick else 7
    provisional = context(crypto)
    print(environment())
    print(f"sizes {','.join(map(str, sizes))}; each figure the best of {repeats} wall-clock runs"
          " (validate: 1 run at N >= 512)")

    _, pub = crypto.hpke_key_pair()
    hpke_us = best_us(
        lambda: crypto.encrypt_with_label(pub, b"UpdatePathNode", b"c" * 100, b"s" * 32), 50
    )
    print(f"cipher suite {crypto.suite.name}; reference: one EncryptWithLabel = {hpke_us:.0f} us")
    print()
    header = (
        f"{'N':>5} {'copy us':>9} {'add us':>9} {'create ms':>10} {'process ms':>11}"
        f" {'create/HPKE':>12} {'process/HPKE':>13} {'validate ms':>12} {'cold hash ms':>13}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        copy_us, add_us, create_us, process_us, validate_us, cold_us = measure(
            crypto, n, repeats, provisional
        )
        print(
            f"{n:>5} {copy_us:>9.1f} {add_us:>9.0f} {create_us / 1000:>10.2f}"
            f" {process_us / 1000:>11.2f} {create_us / hpke_us:>12.1f}"
            f" {process_us / hpke_us:>13.1f} {validate_us / 1000:>12.1f} {cold_us / 1000:>13.2f}"
        )


if __name__ == "__main__":
    main()
