"""Benchmark (not a test): SFrame seal/open per frame against raw AES-GCM in the same run.

Usage: python bench/sframe.py [--quick]

For each cipher suite and frame size (60 B, 160 B, 1200 B, 10 KB, 100 KB) it measures
`SFrameContext.encrypt` (seal) and `.decrypt` (open) per frame next to a raw
`AESGCM.encrypt`/`decrypt` of the same size (AES-128-GCM, or AES-256-GCM beside the 256-bit
suite), and the bytes SFrame adds per frame. Each figure is the best of several repeats, so that
other load on the machine inflates it as little as possible.

Columns: seal = `encrypt` (allocates its output), into = `encrypt_into` (writes into one reused
buffer, as a per-track pipeline can), open = `decrypt`; raw = AES-GCM alone; +us and x compare
with raw. The target verdict uses seal and open.

Targets: GCM suites within 2 us of raw AES-GCM per frame and within 1.1x of it at 100 KB; the
short-tag suites add <= 8 B to an audio frame.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from e2ee_media.cipher_suites import CipherSuite, suite_params  # noqa: E402
from e2ee_media.context import SFrameContext  # noqa: E402
from e2ee_media.header import encode_header  # noqa: E402

SIZES = [60, 160, 1200, 10_000, 100_000]
# A typical MLS-derived KID (E=4, sender index 5, epoch 3 -> 0x53, one extended byte).
KID = 0x53
# Audio at 50 frames/s reaches CTR 2^16 after ~22 minutes: a 2-byte CTR is the common case.
AUDIO_CTR = 3000


def iterations(size: int, quick: bool) -> int:
    n = 4000 if size <= 1200 else 1000 if size <= 10_000 else 150
    return max(20, n // 4) if quick else n


def best_per_call(run: Callable[[], int], repeats: int) -> float:
    """Microseconds per call: the best of `repeats` runs; `run` returns its number of calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter_ns()
        calls = run()
        best = min(best, (time.perf_counter_ns() - start) / calls / 1000)
    return best


def measure(suite: CipherSuite, size: int, quick: bool) -> dict[str, float]:
    params = suite_params(suite)
    base_key = os.urandom(params.Nk)
    n = iterations(size, quick)
    repeats = 3 if quick else 7
    plaintext = os.urandom(size)
    metadata = b"\x9d"  # e.g. a one-byte clear codec prefix, authenticated

    sender = SFrameContext(suite)
    sender.add_send_key(KID, base_key)
    encrypt = sender.encrypt

    def seal() -> int:
        for _ in range(n):
            encrypt(KID, metadata, plaintext)
        return n

    raw = AESGCM(os.urandom(32 if suite is CipherSuite.AES_256_GCM_SHA512_128 else 16))
    nonce = os.urandom(12)
    raw_aad = b"\x00\x53\x0b\xb8\x9d"  # same AAD length as the SFrame header + metadata

    into = SFrameContext(suite)
    into.add_send_key(KID, base_key)
    encrypt_into = into.encrypt_into
    buffer = bytearray(size + 64)

    def seal_into() -> int:
        for _ in range(n):
            encrypt_into(KID, metadata, plaintext, buffer).release()
        return n

    def raw_seal() -> int:
        for _ in range(n):
            raw.encrypt(nonce, plaintext, raw_aad)
        return n

    # As many distinct ciphertexts as SFrame opens below, so that both read the same amount of
    # memory (100 KB frames do not all fit in cache).
    raw_cts = [raw.encrypt(nonce, os.urandom(size), raw_aad) for _ in range(n)]

    def raw_open() -> int:
        for ct in raw_cts:
            raw.decrypt(nonce, ct, raw_aad)
        return n

    # Each frame can be opened once (replay window): every repeat gets a fresh receiver.
    frames = [bytes(encrypt(KID, metadata, plaintext)) for _ in range(n)]
    receivers: list[SFrameContext] = []

    def new_receiver() -> None:
        receiver = SFrameContext(suite)
        receiver.add_recv_key(KID, base_key)
        receivers.append(receiver)

    def open_() -> int:
        decrypt = receivers.pop().decrypt
        for frame in frames:
            decrypt(metadata, frame)
        new_receiver()  # inside the clock, but one key derivation (~10 us) over n frames
        return n

    new_receiver()
    for warm_up in (seal, seal_into, raw_seal, raw_open, open_):
        warm_up()
    return {
        "seal": best_per_call(seal, repeats),
        "seal_into": best_per_call(seal_into, repeats),
        "raw_seal": best_per_call(raw_seal, repeats),
        "open": best_per_call(open_, repeats),
        "raw_open": best_per_call(raw_open, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()

    print(f"SFrame per-frame cost vs raw AES-GCM (best of repeats, microseconds); KID={KID:#x}")
    header = (
        f"{'suite':<28}{'size':>8}{'seal':>9}{'raw':>9}{'+us':>8}{'x':>7}{'into':>8}{'x':>7}"
        f"{'open':>9}{'raw':>9}{'+us':>8}{'x':>7}{'+bytes':>8}  target"
    )
    print(header)
    print("-" * len(header))
    misses = 0
    for suite in CipherSuite:
        params = suite_params(suite)
        for size in SIZES:
            r = measure(suite, size, args.quick)
            added = len(encode_header(KID, AUDIO_CTR)) + params.Nt
            d_seal, d_open = r["seal"] - r["raw_seal"], r["open"] - r["raw_open"]
            x_seal, x_open = r["seal"] / r["raw_seal"], r["open"] / r["raw_open"]
            verdict = "-"
            if not params.is_ctr_hmac:
                failed = [
                    name
                    for name, delta, ratio in (("seal", d_seal, x_seal), ("open", d_open, x_open))
                    if delta > 2.0 or (size >= 100_000 and ratio > 1.1)
                ]
                verdict = "MISS " + "+".join(failed) if failed else "ok"
                misses += bool(failed)
            print(
                f"{suite.name:<28}{size:>8}{r['seal']:>9.2f}{r['raw_seal']:>9.2f}{d_seal:>8.2f}"
                f"{x_seal:>7.2f}{r['seal_into']:>8.2f}{r['seal_into'] / r['raw_seal']:>7.2f}"
                f"{r['open']:>9.2f}{r['raw_open']:>9.2f}{d_open:>8.2f}"
                f"{x_open:>7.2f}{added:>8}  {verdict}"
            )
    print()
    print(f"Bytes added per frame (header + tag) for KID {KID:#x}, by CTR; audio at 50 frames/s")
    ctrs = {"CTR 3 (0.1 s)": 3, "CTR 200 (4 s)": 200, "CTR 3000 (1 min)": 3000}
    ctrs["CTR 10^5 (33 min)"] = 100_000
    print(f"  {'suite':<28}" + "".join(f"{name:>19}" for name in ctrs) + "  target")
    for suite in CipherSuite:
        params = suite_params(suite)
        added = [len(encode_header(KID, ctr)) + params.Nt for ctr in ctrs.values()]
        mark = ("ok" if added[2] <= 8 else "MISS") if params.Nt <= 4 else "-"
        print(f"  {suite.name:<28}" + "".join(f"{a:>17} B" for a in added) + f"  {mark}")
    print("  target: <= 8 B added per audio frame with the 32-bit tag suite, at CTR 3000")
    print(f"\nGCM per-frame targets missed: {misses}")


if __name__ == "__main__":
    main()
