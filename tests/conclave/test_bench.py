"""conclave bench's outputs: CSV rows and the PNG plot, from measured-looking results."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conclave.bench import plot_call, text_tables, write_call_csv
from conclave.bench_call import MODES, CallResult, measure_call
from conclave.media import MediaSpec


def result(mode: str, latencies: list[float]) -> CallResult:
    return CallResult(mode, 3, 4.0, 15.0, 7.5, 690.0, 1380.0, 780, 1560, latencies,
                      {"audio": latencies[:2], "video": latencies[2:]})


def test_csv_and_png(tmp_path: Path) -> None:
    results = [result("plain", [60.0, 70.0, 80.0, 90.0]), result("e2ee", [61.0, 71.0, 81.0])]
    write_call_csv(tmp_path, results)
    plot_call(tmp_path, results)
    rows = list(csv.DictReader((tmp_path / "e2e_call.csv").open()))
    assert [r["mode"] for r in rows] == ["plain", "e2ee"]
    assert rows[0]["latency_p50_ms"] == "80.0" and rows[1]["latency_p50_ms"] == "71.0"
    assert rows[0]["audio_latency_p50_ms"] == "70.0" and rows[0]["video_latency_p50_ms"] == "90.0"
    latency_rows = list(csv.reader((tmp_path / "e2e_latency.csv").open()))
    assert latency_rows[0] == ["mode", "latency_ms"] and len(latency_rows) == 1 + 4 + 3
    assert (tmp_path / "e2e_call.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        await measure_call("rot13")


SCRIPT_OUTPUT = """N=2 done
operation (ms, median of 5)      N=2      N=8    ref N=8
-----------------------------------------------------------
batched build                    1.8      4.3      3-5
update (create)                  0.8      1.6

primitive costs in this run (ms): sign 0.082, verify 0.134
path                         us/pkt/sub   fwd pkts/s
sfu (raw header rewrite)           15.2        65740
"""


def test_the_scripts_tables_become_csv_rows() -> None:
    assert text_tables(SCRIPT_OUTPUT) == [
        ["operation (ms, median of 5)", "N=2", "N=8", "ref N=8"],
        ["batched build", "1.8", "4.3", "3-5"],
        ["update (create)", "0.8", "1.6"],
        [],
        ["path", "us/pkt/sub", "fwd pkts/s"],
        ["sfu (raw header rewrite)", "15.2", "65740"],
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_a_short_call_is_measured(mode: str) -> None:
    # Not a speed check: the measuring hooks see frames go out, come in, and their latency.
    r = await measure_call(mode, 2, 1.0, warmup=0.5, media=MediaSpec(width=96, height=64, fps=10))
    assert r.frames_sent > 0 and r.frames_received > 0
    assert r.up_kbps > 0 and r.down_kbps > 0
    assert r.latencies_ms and all(ms >= 0 for ms in r.latencies_ms)
    assert set(r.latencies_by_kind) == {"audio", "video"}
