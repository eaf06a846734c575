"""conclave bench's outputs: CSV rows and the PNG plot, from measured-looking results."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conclave import bench
from conclave.bench import (
    BENCH_DIR,
    parse_only,
    plot_call,
    text_tables,
    write_call_csv,
    write_script_csv,
)
from conclave.bench_call import MODES, CallResult, measure_call
from conclave.cli import main
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
        ["update (create)", "0.8", "1.6", ""],  # as many cells as the header
        [],
        ["path", "us/pkt/sub", "fwd pkts/s"],
        ["sfu (raw header rewrite)", "15.2", "65740"],
    ]


# Fixed-width columns as the scripts print them: a wide value leaves one space to its neighbour.
FIXED_WIDTH = "\n".join([
    f"{'suite':<12}{'size':>6}{'seal':>6}{'x':>6}  target",
    f"{'AES 128 GCM':<12}{100000:>6}{12.345:>6.2f}{7.5:>6.2f}  ok",
    f"{'AES':<12}{60:>6}{1.25:>6.2f}{10.25:>6.2f}  MISS seal+open",
    f"{'CTR':<12}{60:>6}{'':>6}{99.5:>6.2f}",
    "summary: 3 rows",
])


def test_cells_one_space_apart_stay_in_their_columns() -> None:
    assert FIXED_WIDTH.splitlines()[1] == "AES 128 GCM 100000 12.35  7.50  ok"
    assert text_tables(FIXED_WIDTH) == [
        ["suite", "size", "seal", "x", "target"],
        ["AES 128 GCM", "100000", "12.35", "7.50", "ok"],
        ["AES", "60", "1.25", "10.25", "MISS seal+open"],
        ["CTR", "60", "", "99.50", ""],
    ]


def test_the_sframe_scripts_csv_rows_match_its_header(tmp_path: Path) -> None:
    script = BENCH_DIR / "sframe.py"
    if not script.exists():
        pytest.skip("bench/ is not in this checkout")
    txt = tmp_path / "sframe.txt"
    txt.write_text(subprocess.run([sys.executable, str(script), "--quick"], check=True,
                                  capture_output=True, text=True, timeout=120).stdout)
    path = write_script_csv(txt)
    assert path is not None
    tables: list[list[list[str]]] = [[]]
    for row in csv.reader(path.open()):
        if row:
            tables[-1].append(row)
        else:
            tables.append([])
    assert len(tables) >= 2
    for header, *rows in tables:
        assert rows and all(len(row) == len(header) for row in rows), (header, rows)
    header, *rows = tables[0]
    assert len(header) == 15 and header[-1] == "target"
    for row in rows:  # suite, then numbers (a single space apart where a value is wide), verdict
        assert row[0].startswith("AES_") and (row[-1] in ("ok", "-") or row[-1].startswith("MISS "))
        # Every cell a number; times, ratios and sizes positive. A "+us" (a median of paired
        # differences) may be negative: sealing into a buffer can beat raw AES-GCM on 100 kB.
        numbers = [float(cell) for cell in row[1:-1]]
        deltas = [i for i, name in enumerate(header[1:-1]) if name == "+us"]
        assert len(deltas) == 3, header
        assert all(n > 0 for i, n in enumerate(numbers) if i not in deltas), row


@pytest.mark.parametrize("text", ["mls,call", " sfu_forward ", "e2e_call,ds_load,sframe"])
def test_only_takes_groups_and_the_names_in_the_summary(text: str) -> None:
    assert parse_only(text) == {name.strip() for name in text.split(",")}


@pytest.mark.parametrize("argv", [["--only", "nosuch"], ["--only", ""], ["--only", ","],
                                  ["--only", "mls,nosuch"], ["--only", "e2e_call_plain"]])
def test_an_unknown_only_name_is_a_usage_error(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("no benchmark may run")

    monkeypatch.setattr(bench, "run_benchmarks", refuse)
    with pytest.raises(SystemExit) as info:
        main(["bench", "--out", str(tmp_path / "out"), *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "choose from mls, sframe, sfu, ds, call" in err and "sfu_forward" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-ins for the scripts and the call: the names of what would have run."""
    names: list[str] = []

    async def run_script(path: Path, args: list[str], out: Path) -> tuple[int, float]:
        names.append(out.stem)
        out.write_text("")
        return 0, 0.0

    async def call(mode: str, *args: Any, **kwargs: Any) -> CallResult:
        names.append(f"call {mode}")
        return result(mode, [60.0, 70.0, 80.0])

    monkeypatch.setattr(bench, "run_script", run_script)
    monkeypatch.setattr(bench, "measure_call", call)
    return names


@pytest.mark.parametrize(("only", "expected"), [
    ("sfu_forward", ["sfu_forward"]),
    ("mls", ["mls_groups", "mls_tree"]),
    ("mls_tree,sframe", ["mls_tree", "sframe"]),
    ("e2e_call", ["call plain", "call e2ee"]),
])
def test_only_runs_what_it_names(
    only: str, expected: list[str], ran: list[str], tmp_path: Path
) -> None:
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", only]) == 0
    assert ran == expected
    summary = [row["benchmark"] for row in csv.DictReader((tmp_path / "summary.csv").open())]
    assert summary == [n if " " not in n else "e2e_call_" + n.split()[1] for n in expected]


async def test_run_benchmarks_refuses_unknown_names(ran: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose from"):
        await bench.run_benchmarks(tmp_path, quick=True, only={"nosuch"})
    assert ran == []


@pytest.mark.parametrize("mode", MODES)
async def test_a_short_call_is_measured(mode: str) -> None:
    # Not a speed check: the measuring hooks see frames go out, come in, and their latency.
    r = await measure_call(mode, 2, 1.0, warmup=0.5, media=MediaSpec(width=96, height=64, fps=10))
    assert r.frames_sent > 0 and r.frames_received > 0
    assert r.up_kbps > 0 and r.down_kbps > 0
    assert r.latencies_ms and all(ms >= 0 for ms in r.latencies_ms)
    assert set(r.latencies_by_kind) == {"audio", "video"}
    # Every frame received was matched to its send: one media spec for all still gives each
    # participant its own tone and pattern (identical frames of two senders would not match).
    assert len(r.latencies_ms) == r.frames_received


def test_every_receiver_of_a_frame_measures_its_latency_and_the_own_hook_still_runs() -> None:
    from types import SimpleNamespace

    from conclave.bench_call import _Probe

    probe = _Probe()
    probe.reset()
    seen: list[bytes] = []
    remotes = [
        SimpleNamespace(kind="audio", decryptor=SimpleNamespace(
            on_decrypted=lambda data, mime: seen.append(data))),
        SimpleNamespace(kind="audio", decryptor=SimpleNamespace(on_decrypted=None)),
    ]
    for remote in remotes:
        probe.hook_receiver(remote)  # type: ignore[arg-type]
    frame = b"sealed frame"
    probe.sent_at[hashlib.blake2b(frame, digest_size=8).digest()] = 0.0
    for remote in remotes:
        remote.decryptor.on_decrypted(frame, "audio/opus")
    assert probe.frames_received == 2
    assert len(probe.latencies["audio"]) == 2  # both receivers, not only the first
    assert seen == [frame]  # the participant's own hook (epoch audit) was kept


async def test_the_upstream_count_is_rtp_only_like_the_downstream_one() -> None:
    from types import SimpleNamespace

    from conclave.bench_call import _Probe

    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    async def handle(data: bytes, arrival_time_ms: int) -> None:
        pass

    transport = SimpleNamespace(_send_rtp=send, _handle_rtp_data=handle)
    transceiver = SimpleNamespace(sender=SimpleNamespace(transport=transport))
    participant = SimpleNamespace(
        encryptors={}, sfu=SimpleNamespace(pc=SimpleNamespace(getTransceivers=lambda: [transceiver])))
    probe = _Probe()
    probe.hook_sender(participant)  # type: ignore[arg-type]
    probe.reset()
    rtp = b"\x80\x60" + bytes(98)  # payload type 96
    rtcp = b"\x81\xc9" + bytes(30)  # receiver report
    await transport._send_rtp(rtp)
    await transport._send_rtp(rtcp)
    await transport._handle_rtp_data(rtp, 0)
    assert sent == [rtp, rtcp]  # both still go out
    assert probe.up == len(rtp) == probe.down


def run_bench_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = BENCH_DIR / script
    if not path.exists():
        pytest.skip("bench/ is not in this checkout")
    env = {k: v for k, v in os.environ.items() if k != "CONCLAVE_PG_DSN"}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize(("script", "args", "message"), [
    ("mls_groups.py", ["--runs", "0"], "--runs: must be at least 1, got 0"),
    ("mls_groups.py", ["--sizes", "2,1"], "every group size must be at least 2"),
    ("mls_groups.py", ["--sizes", "2,x"], "expected comma-separated integers"),
    ("mls_tree.py", ["--suite", "99"], "cipher suite 0x0063 is not supported"),
    ("ds_load.py", ["--groups", "0"], "--groups: must be at least 1, got 0"),
    ("ds_load.py", ["--clients", "1"], "--clients: must be at least 2, got 1"),
    ("ds_load.py", ["--seconds", "0"], "--seconds: must be a finite number above 0"),
    ("ds_load.py", ["--backends", "mysql"], "unknown backend 'mysql'"),
    ("ds_load.py", ["--backends", "sqlite,postgres"], "needs CONCLAVE_PG_DSN"),
    ("e2e_call.py", ["--participants", "1"], "--participants: must be at least 2, got 1"),
    ("e2e_call.py", ["--seconds", "-1"], "--seconds: must be a finite number above 0"),
    ("e2e_call.py", ["--height", "121"], "--height: must be even, got 121"),
    ("e2e_call.py", ["--fps", "0"], "--fps: must be a finite number above 0"),
    ("sframe.py", ["--rounds", "0"], "--rounds: must be at least 1, got 0"),
])
def test_a_bad_option_is_a_usage_error_before_anything_runs(
    script: str, args: list[str], message: str
) -> None:
    done = run_bench_script(script, *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""  # refused before measuring (or printing) anything


def load_bench_module(name: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    if not (BENCH_DIR / f"{name}.py").exists():
        pytest.skip("bench/ is not in this checkout")
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_batched_build_row_is_the_median_of_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    groups = load_bench_module("mls_groups", monkeypatch)
    real_build = groups.build
    times = iter([1.0, 5.0, 9.0])  # the first build is not the median

    def build(n: int, suite: int = 1) -> tuple[Any, ...]:
        return (*real_build(n, suite)[:3], next(times))

    monkeypatch.setattr(groups, "build", build)
    assert groups.bench_size(2, 3)["batched build"] == 5.0


async def test_e2e_call_uses_the_height_and_fps_it_is_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    e2e = load_bench_module("e2e_call", monkeypatch)
    specs: list[MediaSpec | None] = []

    async def call(mode: str, participants: int, seconds: float,
                   media: MediaSpec | None = None) -> CallResult:
        specs.append(media)
        return result(mode, [60.0, 70.0, 80.0])

    monkeypatch.setattr(e2e, "measure_call", call)
    await e2e.run(e2e.parse_args(["--height", "128", "--fps", "10", "--participants", "4"]))
    assert [(m.width, m.height, m.fps) if m else None for m in specs] == [(320, 128, 10.0)] * 2
    out = capsys.readouterr().out
    assert "4 participants" in out and "320x128 at 10 fps" in out and "environment:" in out


def test_a_call_that_fails_is_reported_not_a_traceback(
    ran: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(mode: str, *args: Any, **kwargs: Any) -> CallResult:
        raise RuntimeError("the services did not start within 20 s")

    monkeypatch.setattr(bench, "measure_call", broken)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", "call,sframe"]) == 1
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["benchmark"], r["status"]) for r in rows] == [
        ("sframe", "ok"), ("e2e_call_plain", "error")]
    assert "the services did not start" in rows[1]["output"]
    assert not (tmp_path / "e2e_call.csv").exists()
