"""Benchmark (not a test): an end-to-end call with and without E2EE, in the same run.

Usage: python bench/e2e_call.py [--participants N] [--seconds S] [--width W --height H --fps F]

The delivery service and the SFU run in a child process; N participants in this one publish
synthetic audio (Opus) and video (VP8) and decode everyone else's. "plain" runs the same frame
pipeline with an identity transform, "e2ee" with SFrame under MLS keys, so the difference is the
encryption's cost. See conclave/bench_call.py for what each column measures. `conclave bench`
runs this with the other benchmarks and writes CSV files and plots.
"""

from __future__ import annotations

import argparse
import asyncio

from conclave.bench_call import MODES, measure_call
from conclave.media import MediaSpec


async def run(args: argparse.Namespace) -> None:
    results = []
    media = None
    if args.width is not None:
        media = MediaSpec(width=args.width, height=args.height, fps=args.fps)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--fps", type=float, default=15.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
