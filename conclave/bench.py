"""`conclave bench`: the MLS, SFrame and SFU benchmark scripts and the end-to-end call, with
progress bars; CSV files and PNG plots go into one folder.

The scripts live in the repository's bench/ folder (they are not installed with the package);
each is run in a child process, its output saved as `<name>.txt` and its tables as `<name>.csv`.
The end-to-end call is `conclave.bench_call` (also runnable as `python bench/e2e_call.py`),
run as pairs of calls (plain and e2ee, in alternating order) whose paired differences give the
E2EE cost with its spread.

A script with targets ends its output with `verdict: met` or `verdict: missed (<reason>)`: the
summary's target column shows it; a missed target is not a failed run (the exit status is 1 for a
script that failed or a call that measured nothing). Each script runs in a process group of its
own, killed with everything in it after a timeout, on Ctrl-C and when the script exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bench_call import (
    MODES,
    CallResult,
    call_names,
    call_order,
    call_problem,
    cost_summary,
    e2ee_costs,
    measure_call,
)

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"

# name, group, script, full arguments, --quick arguments
SCRIPTS: list[tuple[str, str, str, list[str], list[str]]] = [
    ("mls_groups", "mls", "mls_groups.py", [], ["--sizes", "2,8,32", "--runs", "3"]),
    ("mls_tree", "mls", "mls_tree.py", [], ["--quick"]),
    ("sframe", "sframe", "sframe.py", [], ["--quick"]),
    # --loopback: the in-process microbenchmark leaves out the receive path; the loopback part
    # measures a real SFU process.
    ("sfu_forward", "sfu", "sfu_forward.py", ["--loopback", "--rate", "50,150", "--repeat", "3"],
     ["--packets", "100", "--repeat", "1", "--loopback", "--seconds", "3", "--rate", "50"]),
    ("ds_load", "ds", "ds_load.py", ["--backends", "sqlite"],
     ["--groups", "5", "--clients", "4", "--seconds", "3", "--backends", "sqlite"]),
]
SCRIPT_TIMEOUT = 900  # the longest, sfu_forward with --loopback at two rates, takes a few minutes
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a script's process group
CALL_REPEATS = 3  # pairs of e2e calls (plain and e2ee, alternating order); 1 with --quick
CALL = "call"  # the end-to-end call's group; `e2e_call` (its script's name) selects it too
GROUPS = ["mls", "sframe", "sfu", "ds", CALL]
ALIASES = [name for name, *_ in SCRIPTS if name not in GROUPS] + ["e2e_call"]
# The call's rows in the summary (numbered when it runs more than one pair): each selects the
# whole call, as a mode alone has no pair to give the E2EE cost.
CALL_ROWS = {f"e2e_call_{mode}{suffix}" for mode in MODES
             for suffix in ["", *(f"_{n}" for n in range(1, CALL_REPEATS + 1))]}


def parse_only(text: str) -> set[str]:
    """The benchmarks `--only` names, comma-separated: groups (mls, sframe, sfu, ds, call) or
    the names shown in the summary (mls_tree, sfu_forward, e2e_call_plain, ...); raises
    ValueError naming the valid ones for an unknown name or an empty list."""
    names = {name.strip() for name in text.split(",")} - {""}
    unknown = sorted(names - set(GROUPS) - set(ALIASES) - CALL_ROWS)
    if unknown or not names:
        what = (f"unknown benchmark {', '.join(map(repr, unknown))}" if unknown
                else "no benchmark named")
        raise ValueError(f"{what}: choose from {', '.join(GROUPS)} "
                         f"(or one script: {', '.join(ALIASES)}, also as its summary rows "
                         f"{', '.join(f'e2e_call_{mode}' for mode in MODES)})")
    return names


def call_labels(order: list[str]) -> list[str]:
    """The summary's rows of the calls of `order` (`call_order`): e2e_call_<mode>, numbered
    when a mode runs more than once (one call per mode, --quick, keeps the names it always
    had)."""
    numbered = len(order) > len(MODES)
    return [f"e2e_call_{mode}" + (f"_{order[: i + 1].count(mode)}" if numbered else "")
            for i, mode in enumerate(order)]


def runs_call(only: set[str] | None) -> bool:
    """Whether `only` (as `parse_only` returns it; None: everything) selects the e2e call."""
    return only is None or CALL in only or "e2e_call" in only or bool(only & CALL_ROWS)


async def run_script(path: Path, args: list[str], out: Path) -> tuple[int, float]:
    """Run a bench script into `out`: (exit code, -1 on timeout; seconds taken).

    The script gets a session (and process group) of its own, so that what it started (a
    delivery service, an SFU, helper servers) goes with it: its whole group is killed after a
    timeout, on cancellation (Ctrl-C), and whatever it left behind when it exits."""
    started = time.monotonic()
    with out.open("wb") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), *args, stdout=f, stderr=asyncio.subprocess.STDOUT,
            cwd=str(path.parent.parent), start_new_session=True,
        )
        try:
            code = await asyncio.wait_for(proc.wait(), SCRIPT_TIMEOUT)
        except TimeoutError:
            code = -1
        finally:  # also on CancelledError: the group is killed before it propagates
            await kill_group(proc)
    return code, time.monotonic() - started


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the process group; False if no process is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running: zombies do not count (an orphan's
    zombie waits for init to reap it, and may wait for good where init does not reap)."""
    if not _signal_group(pgid, 0):
        return False
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: a zombie counts
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:  # after the command's ")": state, ppid, pgrp, ...
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


async def kill_group(proc: asyncio.subprocess.Process, grace: float | None = None) -> None:
    """SIGTERM to `proc`'s process group (its session leader: pgid == pid), SIGKILL to what
    is left after `grace` seconds; `proc` reaped. Nothing to do for an empty group."""
    grace = KILL_GRACE if grace is None else grace
    pgid = proc.pid
    try:
        if not _signal_group(pgid, signal.SIGTERM):
            return
        deadline = time.monotonic() + grace
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
        # Its children may outlive it by the time they take to handle SIGTERM (or ignore it).
        while time.monotonic() < deadline and _group_alive(pgid):
            await asyncio.sleep(0.05)
    finally:  # also when a second Ctrl-C cuts the grace short
        _signal_group(pgid, signal.SIGKILL)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())


VERDICT = re.compile(r"verdict: (met|missed \(.+\))")


def verdict_of(text: str) -> str:
    """The target column of a script's output: "met" or "missed (<reason>)" from its last line
    `verdict: met` / `verdict: missed (<reason>)` (the convention for a script with targets),
    "-" for a script that prints none, "unreadable: <line>" for a malformed verdict line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not lines[-1].startswith("verdict:"):
        return "-"
    match = VERDICT.fullmatch(lines[-1])
    return match.group(1) if match else f"unreadable: {lines[-1]}"


_CELL = re.compile(r"\S+(?: \S+)*")  # words one space apart: cells are two or more apart
_WORD = re.compile(r"\S+")


def _fit(line: str, header: list[re.Match[str]]) -> list[str]:
    """`line`'s cells under the header's columns, one per column ("" where it has none).

    The scripts print fixed-width columns (text left-aligned, numbers right-aligned to the
    header's edge), and a wide value can leave one space to its neighbour: a stretch of words one
    space apart that reaches under a single header cell is that column's cell; one reaching
    under several is split into words, each going to the header cell it overlaps most (a word
    under none continues the column of the word before it, or goes to the nearest column)."""
    cells: list[list[tuple[int, int]]] = [[] for _ in header]

    def column(start: int, end: int) -> int:  # most overlap (or least gap); ties to the right
        overlaps = [min(end, h.end()) - max(start, h.start()) for h in header]
        return max(range(len(header)), key=lambda i: (overlaps[i], i))

    last = 0
    for chunk in _CELL.finditer(line):
        under = [i for i, h in enumerate(header)
                 if chunk.start() < h.end() and h.start() < chunk.end()]
        if len(under) <= 1:
            last = max(last, under[0] if under else column(*chunk.span()))
            cells[last].append(chunk.span())
            continue
        for n, word in enumerate(_WORD.finditer(chunk.group())):
            start, end = chunk.start() + word.start(), chunk.start() + word.end()
            if n == 0 or any(start < h.end() and h.start() < end for h in header):
                last = max(last, column(start, end))
            cells[last].append((start, end))
    return [line[spans[0][0]:spans[-1][1]] if spans else "" for spans in cells]


def text_tables(text: str) -> list[list[str]]:
    """The rows of the aligned text tables a bench script prints (a line with three or more
    cells two or more spaces apart is a row; ruler lines dropped), each table after a blank
    row: for `<name>.csv`. Every row has as many cells as its table's first row (the header):
    a row that splits otherwise is split by the header's column positions (`_fit`)."""
    rows: list[list[str]] = []
    header: list[re.Match[str]] | None = None
    for line in text.expandtabs().splitlines():
        if line.strip() and not line.strip().strip("-"):
            continue  # a ruler under a header
        chunks = list(_CELL.finditer(line))
        if len(chunks) < 3:
            header = None
            continue
        if header is None:
            if rows:
                rows.append([])
            header = chunks
            rows.append([c.group() for c in chunks])
        elif len(chunks) == len(header):
            rows.append([c.group() for c in chunks])
        else:
            rows.append(_fit(line, header))
    return rows


def write_script_csv(txt: Path) -> Path | None:
    rows = text_tables(txt.read_text(errors="replace"))
    if not rows:
        return None
    path = txt.with_suffix(".csv")
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def write_call_csv(out: Path, results: list[CallResult]) -> None:
    names = call_names(results)
    rows = [{"call": name, **r.row()} for name, r in zip(names, results, strict=True)]
    with (out / "e2e_call.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "e2e_latency.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["call", "mode", "latency_ms"])
        for name, r in zip(names, results, strict=True):
            writer.writerows((name, r.mode, f"{ms:.3f}") for ms in r.latencies_ms)
    with (out / "e2e_cost.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "unit", "pairs", "median", "min", "max",
                         "distinguishable_from_noise"])
        for c in e2ee_costs(results):
            writer.writerow([c.metric, c.unit, len(c.differences), f"{c.median:.2f}",
                             f"{min(c.differences):.2f}", f"{max(c.differences):.2f}",
                             "no" if c.noise else "yes" if len(c.differences) > 1 else "unknown"])


def plot_call(out: Path, results: list[CallResult]) -> Path:
    """Per mode: the median over its calls (the bars' lines: min..max), latencies pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    by_mode = {mode: [r for r in results if r.mode == mode] for mode in MODES}
    by_mode = {mode: calls for mode, calls in by_mode.items() if calls}
    modes = list(by_mode)

    def bar(ax: Any, xs: list[float], value: Callable[[CallResult], float], **kw: Any) -> None:
        values = [[value(r) for r in by_mode[m]] for m in modes]
        medians = [statistics.median(v) for v in values]
        spread = [[m - min(v) for m, v in zip(medians, values, strict=True)],
                  [max(v) - m for m, v in zip(medians, values, strict=True)]]
        ax.bar(xs, medians, yerr=spread, capsize=4, **kw)

    xs = list(range(len(modes)))
    bar(axes[0], [float(x) for x in xs], lambda r: r.cpu_per_participant_pct,
        color=["#888", "#2a7"][:len(modes)])
    axes[0].set_xticks(xs, modes)
    axes[0].set_title("CPU per participant (% of a core)")
    width = 0.35
    bar(axes[1], [x - width / 2 for x in xs], lambda r: r.up_kbps, width=width, label="up")
    bar(axes[1], [x + width / 2 for x in xs], lambda r: r.down_kbps, width=width, label="down")
    axes[1].set_xticks(xs, modes)
    axes[1].set_title("RTP kbit/s per participant (before SRTP)")
    axes[1].set_ylim(0, 1.3 * max([r.down_kbps for r in results] + [r.up_kbps for r in results]
                                  + [1.0]))  # headroom: the legend stays clear of the bars
    axes[1].legend(loc="upper right")
    for mode, calls in by_mode.items():
        for kind in sorted({k for r in calls for k in r.latencies_by_kind}):
            data = sorted(ms for r in calls for ms in r.latencies_by_kind.get(kind, []))
            if data:
                axes[2].plot(data, [(i + 1) / len(data) for i in range(len(data))],
                             label=f"{mode} {kind}")
    axes[2].set_xlabel("frame latency, ms (encoder out -> decoder in)")
    axes[2].set_title("latency CDF (all calls of a mode)")
    axes[2].legend()
    fig.tight_layout()
    path = out / "e2e_call.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def run_benchmarks(out: Path, *, quick: bool = False, only: set[str] | None = None) -> int:
    """Run the benchmarks (`only`: names as `parse_only` accepts them; None: all of them).

    1 if a script failed or a call failed or measured nothing; a missed target is shown in the
    summary's target column but is not a failure of the run."""
    if only is not None:
        only = parse_only(",".join(only))  # an unknown name would otherwise select nothing
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .cli import new_console

    out.mkdir(parents=True, exist_ok=True)
    console = new_console()  # a reader gone away is 141, not rich's 1 (a failed run)
    # benchmark, status, target, seconds, output
    summary: list[tuple[str, str, str, float, str]] = []
    failed = False
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        for name, group, script, full, quick_args in SCRIPTS:
            if only is not None and group not in only and name not in only:
                continue
            path = BENCH_DIR / script
            if not path.exists():
                summary.append((name, "missing", "-", 0.0, f"{path} not found (not a checkout?)"))
                continue
            task = progress.add_task(f"{name}", total=None)
            code, took = await run_script(path, quick_args if quick else full, out / f"{name}.txt")
            progress.update(task, total=1, completed=1)
            status = ("ok" if code == 0 else
                      f"timeout ({SCRIPT_TIMEOUT} s)" if code == -1 else f"exit {code}")
            failed |= code != 0
            text = (out / f"{name}.txt").read_text(errors="replace")
            table_csv = write_script_csv(out / f"{name}.txt")
            outputs = f"{name}.txt" + (f", {table_csv.name}" if table_csv else "")
            summary.append((name, status, verdict_of(text), took, outputs))
        results: list[CallResult] = []
        seconds = 4.0 if quick else 10.0
        order = call_order(1 if quick else CALL_REPEATS)
        if runs_call(only):
            labels = call_labels(order)
            asked = sorted(only & CALL_ROWS) if only is not None else []
            if asked:  # a row of one mode named: say that both modes' rows run
                console.print(
                    f"{', '.join(asked)}: the end-to-end call runs its plain and e2ee calls in "
                    f"pairs (the E2EE cost is their difference): running rows {', '.join(labels)}",
                    markup=False, highlight=False)
            for mode, label in zip(order, labels, strict=True):
                number = sum(r.mode == mode for r in results) + 1
                task = progress.add_task(f"e2e call, {mode}" + (
                    f" ({number}/{len(order) // len(MODES)})" if len(order) > len(MODES) else ""),
                    total=1.0)
                started = time.monotonic()
                try:
                    result = await measure_call(
                        mode, 3, seconds,
                        progress=lambda f, t=task: progress.update(t, completed=f),
                    )
                except Exception as exc:  # a failed call is reported like a failed script
                    problem: str | None = f"{type(exc).__name__}: {exc}"
                else:
                    problem = call_problem(result)  # it ran, but its media never flowed
                took = time.monotonic() - started
                if problem is not None:
                    failed = True
                    summary.append((label, "error", "-", took, problem))
                    break
                results.append(result)
                summary.append((label, "ok", "-", took, "e2e_call.csv"))
        if results and len(results) == len(order):
            write_call_csv(out, results)
            plot_call(out, results)
            table = Table(title=f"end-to-end call, 3 participants, {seconds:g} s per call, "
                                f"{len(order) // len(MODES)} pair(s) in this order: "
                                + ", ".join(order))
            table.add_column("metric")
            for name in call_names(results):
                table.add_column(name, justify="right")
            rows = [r.row() for r in results]
            for key in rows[0]:
                if key != "mode":
                    table.add_row(key, *(str(row[key]) for row in rows))
            console.print(table)
            console.print(cost_summary(results), markup=False, highlight=False)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "status", "target", "seconds", "output"])
        writer.writerows((n, s, v, f"{t:.1f}", o) for n, s, v, t, o in summary)
    from .cli import plain  # an error's text and the path are plain text, not rich markup

    table = Table(title=plain(f"benchmarks -> {out}"))
    for col in ("benchmark", "status", "target", "seconds", "output"):
        table.add_column(col)
    for n, s, v, t, o in summary:
        # A missed target stands out but is no failure: the run measured what it should.
        table.add_row(plain(n), plain(s), plain(v), f"{t:.1f}", plain(o),
                      style="yellow" if v.startswith(("missed", "unreadable")) else None)
    console.print(table)
    missed = [n for n, _, v, _, _ in summary if v.startswith(("missed", "unreadable"))]
    if missed:
        console.print(f"targets missed: {', '.join(missed)} (see the target column)",
                      markup=False, highlight=False)
    return 1 if failed else 0
