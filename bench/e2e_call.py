"""Benchmark (not a test): an end-to-end call with and without E2EE, in the same run.

Usage: python bench/e2e_call.py [--participants N] [--seconds S] [--width W] [--height H] [--fps F]
                                [--repeat R]

The delivery service and the SFU run in a child process; N participants in this one publish
synthetic audio (Opus) and video (VP8) and decode everyone else's. "plain" runs the same frame
pipeline with an identity transform, "e2ee" with SFrame under MLS keys, so the difference is the
encryption's cost. The cost is smaller than the run-to-run noise of one call, so R pairs of calls
run in alternating order (plain, e2ee, e2ee, plain, ...) and the cost printed is the median of
the R paired differences with their min..max; a spread that covers zero is reported as "not
distinguishable from noise". See conclave/bench_call.py for what each row measures.
`conclave bench` runs this with the other benchmarks and writes CSV files and plots.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from _env import at_least, environment, positive

from conclave.bench_call import (
    WARMUP,
    CallResult,
    call_names,
    call_order,
    call_problem,
    cost_summary,
    measure_call,
)
from conclave.media import MediaSpec


def even(text: str) -> int:
    """An argparse type for a frame dimension: VP8 takes I420, an even size of at least 16."""
    value = at_least(16)(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even, got {value}")
    return value


def print_table(results: list[CallResult]) -> None:
    """One row per metric, one column per call (metric names are long, calls few)."""
    names = call_names(results)
    rows = [r.row() for r in results]
    metrics = [key for key in rows[0] if key != "mode"]
    first = max(len("metric"), *map(len, metrics))
    widths = [max(len(name), *(len(str(row[key])) for key in metrics))
              for name, row in zip(names, rows, strict=True)]
    print(f"{'metric':<{first}}" + "".join(f"  {n:>{w}}" for n, w in zip(names, widths, strict=True)))
    for key in metrics:
        print(f"{key:<{first}}" + "".join(f"  {str(row[key]):>{w}}"
                                           for row, w in zip(rows, widths, strict=True)))


async def run(args: argparse.Namespace) -> int:
    media = MediaSpec(width=args.width, height=args.height, fps=args.fps)
    order = call_order(args.repeat)
    print(environment())
    print(f"{args.participants} participants, synthetic Opus audio + VP8 video {args.width}x"
          f"{args.height} at {args.fps:g} fps each, {args.seconds:g} s measured after {WARMUP:g} s"
          f" of warm-up, {args.repeat} pair(s) of calls in this order: " + ", ".join(order))
    results = []
    for mode in order:
        try:
            result = await measure_call(mode, args.participants, args.seconds, media=media)
        except Exception as exc:  # the services did not start, a peer never joined, ...
            print(f"error: the {mode} call failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        problem = call_problem(result)
        if problem is not None:  # a call that measured nothing is no data point
            print(f"error: {problem}", file=sys.stderr)
            return 1
        results.append(result)
    print_table(results)
    print("(RTP bytes are counted before SRTP protection and after unprotection, not on the wire;"
          " frames received are summed over the receivers)")
    print("\n" + cost_summary(results))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=at_least(2), default=3,
                        help="at least 2 (someone must receive)")
    parser.add_argument("--seconds", type=positive(), default=10.0, help="measured, per call")
    parser.add_argument("--width", type=even, default=320)
    parser.add_argument("--height", type=even, default=240)
    parser.add_argument("--fps", type=positive(), default=15.0)
    parser.add_argument("--repeat", type=at_least(1), default=3,
                        help="pairs of calls (plain and e2ee, alternating order), default 3")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    try:
        sys.exit(asyncio.run(run(args)))
    except KeyboardInterrupt:  # measure_call has stopped its services on the way out
        sys.exit(130)


if __name__ == "__main__":
    main()
