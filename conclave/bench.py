"""`conclave bench`: the MLS, SFrame and SFU benchmark scripts and the end-to-end call, with
progress bars; CSV files and PNG plots go into one folder.

The scripts live in the repository's bench/ folder (they are not installed with the package);
each is run in a child process, its output saved as `<name>.txt` and its tables as `<name>.csv`.
The end-to-end call is `conclave.bench_call` (also runnable as `python bench/e2e_call.py`).
"""

from __future__ import annotations

import asyncio
import csv
import re
import sys
import time
from pathlib import Path

from .bench_call import MODES, CallResult, measure_call

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"

# name, group, script, full arguments, --quick arguments
SCRIPTS: list[tuple[str, str, str, list[str], list[str]]] = [
    ("mls_groups", "mls", "mls_groups.py", [], ["--sizes", "2,8,32", "--runs", "3"]),
    ("mls_tree", "mls", "mls_tree.py", [], ["--quick"]),
    ("sframe", "sframe", "sframe.py", [], ["--quick"]),
    ("sfu_forward", "sfu", "sfu_forward.py", [], ["--packets", "100", "--repeat", "1"]),
    ("ds_load", "ds", "ds_load.py", ["--backends", "sqlite"],
     ["--groups", "5", "--clients", "4", "--seconds", "3", "--backends", "sqlite"]),
]
SCRIPT_TIMEOUT = 900
CALL = "call"  # the end-to-end call's group; `e2e_call` (its script's name) selects it too
GROUPS = ["mls", "sframe", "sfu", "ds", CALL]
ALIASES = [name for name, *_ in SCRIPTS if name not in GROUPS] + ["e2e_call"]


def parse_only(text: str) -> set[str]:
    """The benchmarks `--only` names, comma-separated: groups (mls, sframe, sfu, ds, call) or
    the scripts' names shown in the summary (mls_tree, sfu_forward, ...); raises ValueError
    naming the valid ones for an unknown name or an empty list."""
    names = {name.strip() for name in text.split(",")} - {""}
    unknown = sorted(names - set(GROUPS) - set(ALIASES))
    if unknown or not names:
        what = (f"unknown benchmark {', '.join(map(repr, unknown))}" if unknown
                else "no benchmark named")
        raise ValueError(f"{what}: choose from {', '.join(GROUPS)} "
                         f"(or one script: {', '.join(ALIASES)})")
    return names


async def run_script(path: Path, args: list[str], out: Path) -> tuple[int, float]:
    started = time.monotonic()
    with out.open("wb") as f:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(path), *args, stdout=f, stderr=asyncio.subprocess.STDOUT,
            cwd=str(path.parent.parent),
        )
        try:
            code = await asyncio.wait_for(proc.wait(), SCRIPT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            code = -1
    return code, time.monotonic() - started


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
    rows = [r.row() for r in results]
    with (out / "e2e_call.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (out / "e2e_latency.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "latency_ms"])
        for r in results:
            writer.writerows((r.mode, f"{ms:.3f}") for ms in r.latencies_ms)


def plot_call(out: Path, results: list[CallResult]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    modes = [r.mode for r in results]
    axes[0].bar(modes, [r.cpu_per_participant_pct for r in results], color=["#888", "#2a7"])
    axes[0].set_title("CPU per participant (% of a core)")
    width = 0.35
    xs = range(len(results))
    axes[1].bar([x - width / 2 for x in xs], [r.up_kbps for r in results], width, label="up")
    axes[1].bar([x + width / 2 for x in xs], [r.down_kbps for r in results], width, label="down")
    axes[1].set_xticks(list(xs), modes)
    axes[1].set_title("RTP kbit/s per participant")
    axes[1].set_ylim(0, 1.3 * max([r.down_kbps for r in results] + [r.up_kbps for r in results]
                                  + [1.0]))  # headroom: the legend stays clear of the bars
    axes[1].legend(loc="upper right")
    for r in results:
        for kind, values in sorted(r.latencies_by_kind.items()):
            data = sorted(values)
            if data:
                axes[2].plot(data, [(i + 1) / len(data) for i in range(len(data))],
                             label=f"{r.mode} {kind}")
    axes[2].set_xlabel("frame latency, ms (encoder out -> decoder in)")
    axes[2].set_title("latency CDF")
    axes[2].legend()
    fig.tight_layout()
    path = out / "e2e_call.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def run_benchmarks(out: Path, *, quick: bool = False, only: set[str] | None = None) -> int:
    """Run the benchmarks (`only`: names as `parse_only` accepts them; None: all of them)."""
    if only is not None:
        only = parse_only(",".join(only))  # an unknown name would otherwise select nothing
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    summary: list[tuple[str, str, float, str]] = []
    failed = False
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        for name, group, script, full, quick_args in SCRIPTS:
            if only is not None and group not in only and name not in only:
                continue
            path = BENCH_DIR / script
            if not path.exists():
                summary.append((name, "missing", 0.0, f"{path} not found (not a checkout?)"))
                continue
            task = progress.add_task(f"{name}", total=None)
            code, took = await run_script(path, quick_args if quick else full, out / f"{name}.txt")
            progress.update(task, total=1, completed=1)
            status = "ok" if code == 0 else f"exit {code}"
            failed |= code != 0
            table_csv = write_script_csv(out / f"{name}.txt")
            outputs = f"{name}.txt" + (f", {table_csv.name}" if table_csv else "")
            summary.append((name, status, took, outputs))
        results: list[CallResult] = []
        seconds = 4.0 if quick else 10.0
        if only is None or CALL in only or "e2e_call" in only:
            for mode in MODES:
                task = progress.add_task(f"e2e call, {mode}", total=1.0)
                started = time.monotonic()
                try:
                    result = await measure_call(
                        mode, 3, seconds,
                        progress=lambda f, t=task: progress.update(t, completed=f),
                    )
                except Exception as exc:  # a failed call is reported like a failed script
                    failed = True
                    summary.append((f"e2e_call_{mode}", "error", time.monotonic() - started,
                                    f"{type(exc).__name__}: {exc}"))
                    break
                results.append(result)
                summary.append((f"e2e_call_{mode}", "ok", time.monotonic() - started,
                                "e2e_call.csv"))
        if len(results) == len(MODES):
            write_call_csv(out, results)
            plot_call(out, results)
            table = Table(title=f"end-to-end call, 3 participants, {seconds:g} s per mode "
                                "(same run)")
            table.add_column("metric")
            for r in results:
                table.add_column(r.mode, justify="right")
            rows = [r.row() for r in results]
            for key in rows[0]:
                if key != "mode":
                    table.add_row(key, *(str(row[key]) for row in rows))
            console.print(table)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["benchmark", "status", "seconds", "output"])
        writer.writerows((n, s, f"{t:.1f}", o) for n, s, t, o in summary)
    from .cli import plain  # an error's text and the path are plain text, not rich markup

    table = Table(title=plain(f"benchmarks -> {out}"))
    for col in ("benchmark", "status", "seconds", "output"):
        table.add_column(col)
    for n, s, t, o in summary:
        table.add_row(plain(n), plain(s), f"{t:.1f}", plain(o))
    console.print(table)
    return 1 if failed else 0
