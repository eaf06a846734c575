"""Benchmark (not a test): an end-to-end call with and without E2EE, in the same run.

Usage: python bench/e2e_call.py [--participants N] [--seconds S] [--width W] [--height H] [--fps F]

The delivery service and the SFU run in a child process; N participants in this one publish
synthetic audio (Opus) and video (VP8) and decode everyone else's. "plain" runs the same frame
pipeline with an identity transform, "e2ee" with SFrame under MLS keys, so the difference is the
encryption's cost. See conclave/bench_call.py for what each column measures. `conclave bench`
runs this with the other benchmarks and writes CSV files and plots.
"""

from __future__ import annotations

import argparse
import asyncio

from _env import at_least, environment, positive

from conclave.bench_call import MODES, WARMUP, measure_call
from conclave.media import MediaSpec


def even(text: str) -> int:
    """An argparse type for a frame dimension: VP8 takes I420, an even size of at least 16."""
    value = at_least(16)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even, got {value}")
    return value


async def run(args: argparse.Namespace) -> None:
    media = MediaSpec(width=args.width, height=args.height, fps=args.fps)
    print(environment())
    print(f"{args.participants} participants, synthetic Opus audio + VP8 video {args.width}x"
          f"{args.height} at {args.fps:g} fps each, {args.seconds:g} s measured after {WARMUP:g} s"
          " of warm-up, modes in this order: " + ", ".join(MODES))
    results = []
    for mode in MODES:
        results.append(await measure_call(mode, args.participants, args.seconds, media=media))
    rows = [r.row() for r in results]
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths, strict=True)))
    plain, e2ee = results
    print(
        f"\nE2EE cost: CPU per participant {e2ee.cpu_per_participant_pct - plain.cpu_per_participant_pct:+.1f} "
        f"points, upstream {e2ee.up_kbps - plain.up_kbps:+.1f} kbit/s, "
        f"latency p50 {e2ee.percentile(0.5) - plain.percentile(0.5):+.1f} ms"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=at_least(2), default=3,
                        help="at least 2 (someone must receive)")
    parser.add_argument("--seconds", type=positive(), default=10.0, help="measured, per mode")
    parser.add_argument("--width", type=even, default=320)
    parser.add_argument("--height", type=even, default=240)
    parser.add_argument("--fps", type=positive(), default=15.0)
    return parser.parse_args(argv)


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()
