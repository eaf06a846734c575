"""Benchmark (not a test): SFrame seal/open per frame against raw AES-GCM in the same run.

Usage: python bench/sframe.py [--quick] [--rounds N] [--gcm] [--sizes N ...]

For each cipher suite and frame size (60 B, 160 B, 1200 B, 10 KB, 100 KB) it measures
`SFrameContext.encrypt` (seal) and `.decrypt` (open) per frame next to a raw
`AESGCM.encrypt`/`decrypt` of the same size with an AAD of the same size (AES-128-GCM, or
AES-256-GCM beside the 256-bit suite; the raw reference for the CTR+HMAC suites is AES-128-GCM
too), and the bytes SFrame adds per frame.

Fairness and robustness: after a warm-up round, every round times each variant once over the same
number of calls (about 200 us of raw AES-GCM), one right after the other and in reverse order
every other round, so that load on the (shared) machine and cache contents hit SFrame and its raw
reference alike. Open and raw open read as many distinct
ciphertexts as each other (16 at 100 KB); a fresh receiver per round (each frame opens once:
replay window) is made outside the clock. The table shows the median over rounds of each time,
and the median over rounds of the per-round difference (+us) and ratio (x) to the raw reference;
the target verdict uses those paired medians. Heavy load from other processes still inflates
SFrame's Python part more than the AES-NI part: compare runs made on a quiet machine.

Columns: seal = `encrypt` (allocates its output, like raw `AESGCM.encrypt`), into = `encrypt_into`
(writes into one reused buffer), open = `decrypt`. A second table times the aiortc transform path
(`FrameEncryptor.encrypt_frame` / `FrameDecryptor.decrypt_frame` over `MLSKeyManager`, with the
codec's clear prefix) for an Opus frame and VP8 frames; it has no target.

Targets: GCM suites within 2 us of raw AES-GCM per frame and within 1.1x of it at 100 KB (seal and
open); the short-tag suites add <= 8 B to an audio frame. The last line of the output is
`verdict: met` or `verdict: missed (<which>)`, shown by `conclave bench` in its summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _env import environment  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from e2ee_media.cipher_suites import CipherSuite, suite_params  # noqa: E402
from e2ee_media.codecs import OPUS, VP8  # noqa: E402
from e2ee_media.context import SFrameContext  # noqa: E402
from e2ee_media.header import encode_header  # noqa: E402
from e2ee_media.mls_keys import MLSKeyManager  # noqa: E402
from e2ee_media.transform import FrameDecryptor, FrameEncryptor  # noqa: E402

SIZES = [60, 160, 1200, 10_000, 100_000]
# A typical MLS-derived KID (E=4, sender index 5, epoch 3 -> 0x53, one extended byte).
KID = 0x53
# Audio at 50 frames/s reaches CTR 2^16 after ~22 minutes: a 2-byte CTR is the common case. Every
# sender starts here, so that its headers are 4 bytes like those of a running call.
AUDIO_CTR = 3000
METADATA = b"\x9d"  # e.g. a one-byte clear codec prefix, authenticated


def calls_per_round(size: int) -> int:
    """About 200 us of raw AES-GCM per timed run: short enough that most runs on a shared machine
    are not preempted (the median over rounds then ignores the runs that were)."""
    return 200 if size <= 1200 else 60 if size <= 10_000 else 16


def timed(run: Callable[[], None], calls: int) -> float:
    """Microseconds per call of one run of `calls` calls."""
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / calls / 1000


def rounds_of(
    runs: dict[str, Callable[[], None]], calls: int, rounds: int, before_round: Callable[[], None]
) -> dict[str, list[float]]:
    """Per-call times of every run, one list entry per timed round (after one warm-up round).

    Every other round runs them in reverse order, so that no run always follows the same other
    one (and finds the caches as that one left them). `before_round` runs outside the clock."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(rounds + 1):  # round 0 warms up
        before_round()
        for name in order if round_ % 2 else order[::-1]:
            t = timed(runs[name], calls)
            if round_:
                times[name].append(t)
    return times


def measure(suite: CipherSuite, size: int, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per-call times of every variant, one list entry per round."""
    params = suite_params(suite)
    base_key = os.urandom(params.Nk)
    plaintext = os.urandom(size)
    sframe_iterations = range(calls)

    sender = SFrameContext(suite)
    sender.add_send_key(KID, base_key).next_counter = AUDIO_CTR
    encrypt = sender.encrypt
    into = SFrameContext(suite)
    into.add_send_key(KID, base_key).next_counter = AUDIO_CTR
    encrypt_into = into.encrypt_into
    buffer = bytearray(size + 64)

    def seal() -> None:
        for _ in sframe_iterations:
            encrypt(KID, METADATA, plaintext)

    def seal_into() -> None:
        for _ in sframe_iterations:
            encrypt_into(KID, METADATA, plaintext, buffer)

    # The raw reference: the same key size as the suite (AES-128 for the CTR+HMAC suites), an
    # AAD as long as SFrame's (header + metadata), a fresh output per call.
    raw = AESGCM(os.urandom(32 if suite is CipherSuite.AES_256_GCM_SHA512_128 else 16))
    nonce = os.urandom(12)
    raw_aad = os.urandom(len(encode_header(KID, AUDIO_CTR)) + len(METADATA))
    raw_encrypt, raw_decrypt = raw.encrypt, raw.decrypt

    def raw_seal() -> None:
        for _ in sframe_iterations:
            raw_encrypt(nonce, plaintext, raw_aad)

    raw_cts = [raw_encrypt(nonce, os.urandom(size), raw_aad) for _ in range(calls)]

    def raw_open() -> None:
        for ct in raw_cts:
            raw_decrypt(nonce, ct, raw_aad)

    frames = [bytes(encrypt(KID, METADATA, plaintext)) for _ in range(calls)]
    decrypt: Callable[[bytes, bytes], bytes] = SFrameContext(suite).decrypt

    def open_() -> None:
        for frame in frames:
            decrypt(METADATA, frame)

    def fresh_receiver() -> None:
        nonlocal decrypt
        receiver = SFrameContext(suite)
        receiver.add_recv_key(KID, base_key)
        decrypt = receiver.decrypt

    runs = {
        "raw_seal": raw_seal,
        "seal": seal,
        "seal_into": seal_into,
        "raw_open": raw_open,
        "open": open_,
    }
    return rounds_of(runs, calls, rounds, fresh_receiver)


class _Group:
    """The little of an MLS group that `MLSKeyManager` needs: two members, one exporter secret."""

    epoch = 1
    members = (0, 1)

    def __init__(self, leaf_index: int, secret: bytes) -> None:
        self.leaf_index = leaf_index
        self.secret = secret

    def export_secret(self, label: bytes, context: bytes, length: int) -> bytes:
        return (self.secret * (1 + length // len(self.secret)))[:length]


# (codec, frame size): an Opus frame, a VP8 delta frame, VP8 keyframes.
TRANSFORM_CASES = [(OPUS, 160), (VP8, 1200), (VP8, 10_000), (VP8, 100_000)]


def measure_transform(mime: str, size: int, calls: int, rounds: int) -> dict[str, list[float]]:
    """Per-call times of the aiortc transform path (AES_128_GCM_SHA256_128, `MLSKeyManager`)
    and of raw AES-128-GCM, one list entry per round."""
    secret = os.urandom(32)
    sender = MLSKeyManager()
    sender.update(_Group(0, secret))
    first = 0x78 if mime == OPUS else 0x31  # Opus TOC / VP8 delta-frame tag
    frame = bytes([first]) + os.urandom(size - 1)
    encryptor = FrameEncryptor(sender, mime, context=1)
    frames = [bytes(encryptor.encrypt_frame(frame)) for _ in range(calls + 1)]
    raw = AESGCM(os.urandom(16))
    nonce = os.urandom(12)
    raw_aad = os.urandom(len(frames[0]) - size - 16 + 1)  # header + clear prefix
    raw_cts = [raw.encrypt(nonce, os.urandom(size), raw_aad) for _ in range(calls)]
    iterations = range(calls)
    encrypt_frame = encryptor.encrypt_frame
    decrypt_frame = FrameDecryptor(sender).decrypt_frame

    def raw_seal() -> None:
        for _ in iterations:
            raw.encrypt(nonce, frame, raw_aad)

    def seal() -> None:
        for _ in iterations:
            encrypt_frame(frame)

    def raw_open() -> None:
        for ct in raw_cts:
            raw.decrypt(nonce, ct, raw_aad)

    def open_() -> None:
        for wire in frames[1:]:
            decrypt_frame(wire, mime)

    def fresh_receiver() -> None:
        # Outside the clock: the receive key is derived on the first frame.
        nonlocal decrypt_frame
        receiver = MLSKeyManager()
        receiver.update(_Group(1, secret))
        decrypt_frame = FrameDecryptor(receiver).decrypt_frame
        decrypt_frame(frames[0], mime)

    runs = {"raw_seal": raw_seal, "seal": seal, "raw_open": raw_open, "open": open_}
    return rounds_of(runs, calls, rounds, fresh_receiver)


def paired(times: dict[str, list[float]], name: str, ref: str) -> tuple[float, float]:
    """Median over rounds of (name - ref) and of (name / ref)."""
    pairs = list(zip(times[name], times[ref], strict=True))
    return (
        statistics.median(a - b for a, b in pairs),
        statistics.median(a / b for a, b in pairs),
    )


def at_least(minimum: int) -> Callable[[str], int]:
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return integer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--rounds", type=at_least(1), default=None, help="timed rounds (def. 51)")
    parser.add_argument("--gcm", action="store_true", help="only the GCM suites")
    parser.add_argument(
        "--sizes", type=at_least(0), nargs="+", default=SIZES, help="frame sizes in bytes"
    )
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 51)
    suites = [s for s in CipherSuite if not (args.gcm and suite_params(s).is_ctr_hmac)]

    print(environment())
    print(
        f"SFrame per-frame cost vs raw AES-GCM, wall-clock microseconds, median of {rounds} rounds; "
        f"KID={KID:#x}, CTR from {AUDIO_CTR}, {len(METADATA)} B metadata"
    )
    header = (
        f"{'suite':<28}{'size':>7}{'seal':>8}{'raw':>8}{'+us':>7}{'x':>6}{'into':>8}{'+us':>7}"
        f"{'x':>6}{'open':>8}{'raw':>8}{'+us':>7}{'x':>6}{'+bytes':>8}  target"
    )
    print(header)
    print("-" * len(header))
    misses = checked = 0
    for suite in suites:
        params = suite_params(suite)
        for size in args.sizes:
            times = measure(suite, size, calls_per_round(size), rounds)
            med = {name: statistics.median(values) for name, values in times.items()}
            d_seal, x_seal = paired(times, "seal", "raw_seal")
            d_into, x_into = paired(times, "seal_into", "raw_seal")
            d_open, x_open = paired(times, "open", "raw_open")
            added = len(encode_header(KID, AUDIO_CTR)) + params.Nt
            verdict = "-"
            if not params.is_ctr_hmac:
                failed = [
                    name
                    for name, delta, ratio in (("seal", d_seal, x_seal), ("open", d_open, x_open))
                    if delta > 2.0 or (size >= 100_000 and ratio > 1.1)
                ]
                verdict = "MISS " + "+".join(failed) if failed else "ok"
                misses += bool(failed)
                checked += 1
            print(
                f"{suite.name:<28}{size:>7}{med['seal']:>8.2f}{med['raw_seal']:>8.2f}"
                f"{d_seal:>7.2f}{x_seal:>6.2f}{med['seal_into']:>8.2f}{d_into:>7.2f}{x_into:>6.2f}"
                f"{med['open']:>8.2f}{med['raw_open']:>8.2f}{d_open:>7.2f}{x_open:>6.2f}"
                f"{added:>8}  {verdict}"
            )
    print()
    print(
        "aiortc transform path: FrameEncryptor.encrypt_frame / FrameDecryptor.decrypt_frame with "
        "MLSKeyManager (clear prefix, AES_128_GCM_SHA256_128) vs raw AES-128-GCM, microseconds"
    )
    header = (
        f"  {'codec':<12}{'size':>7}{'encrypt':>9}{'raw':>8}{'+us':>7}{'x':>6}"
        f"{'decrypt':>9}{'raw':>8}{'+us':>7}{'x':>6}"
    )
    print(header)
    for mime, size in TRANSFORM_CASES:
        times = measure_transform(mime, size, calls_per_round(size), rounds)
        med = {name: statistics.median(values) for name, values in times.items()}
        d_seal, x_seal = paired(times, "seal", "raw_seal")
        d_open, x_open = paired(times, "open", "raw_open")
        print(
            f"  {mime:<12}{size:>7}{med['seal']:>9.2f}{med['raw_seal']:>8.2f}{d_seal:>7.2f}"
            f"{x_seal:>6.2f}{med['open']:>9.2f}{med['raw_open']:>8.2f}{d_open:>7.2f}{x_open:>6.2f}"
        )
    print()
    print(f"Bytes added per frame (header + tag) for KID {KID:#x}, by CTR; audio at 50 frames/s")
    ctrs = {"CTR 3 (0.1 s)": 3, "CTR 200 (4 s)": 200, "CTR 3000 (1 min)": 3000}
    ctrs["CTR 10^5 (33 min)"] = 100_000
    print(f"  {'suite':<28}" + "".join(f"{name:>19}" for name in ctrs) + "  target")
    byte_misses = []
    for suite in CipherSuite:
        params = suite_params(suite)
        added = [len(encode_header(KID, ctr)) + params.Nt for ctr in ctrs.values()]
        mark = ("ok" if added[2] <= 8 else "MISS") if params.Nt <= 4 else "-"
        if mark == "MISS":
            byte_misses.append(suite.name)
        print(f"  {suite.name:<28}" + "".join(f"{a:>17} B" for a in added) + f"  {mark}")
    print("  target: <= 8 B added per audio frame with the 32-bit tag suite, at CTR 3000")
    print(f"\nGCM per-frame targets missed: {misses}")
    print(verdict_line(misses, checked, byte_misses))


def verdict_line(misses: int, checked: int, byte_misses: list[str]) -> str:
    """The last line of the output, which `conclave bench` shows in its summary."""
    reasons = []
    if misses:
        reasons.append(f"{misses} of {checked} GCM per-frame targets")
    if byte_misses:
        reasons.append("audio frame over 8 B added: " + ", ".join(byte_misses))
    return "verdict: " + (f"missed ({'; '.join(reasons)})" if reasons else "met")


if __name__ == "__main__":
    main()
