"""conclave bench's outputs: CSV rows and the PNG plot, from measured-looking results."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    assert [r["call"] for r in rows] == ["plain #1", "e2ee #1"]
    # Labelled for what they count: RTP in the clear, frames at every receiver.
    assert rows[0]["rtp_up_kbps_before_srtp"] == "690.0"
    assert rows[0]["frames_received_sum_over_receivers"] == "1560"
    latency_rows = list(csv.reader((tmp_path / "e2e_latency.csv").open()))
    assert latency_rows[0] == ["call", "mode", "latency_ms"] and len(latency_rows) == 1 + 4 + 3
    cost = list(csv.DictReader((tmp_path / "e2e_cost.csv").open()))
    assert [(c["metric"], c["pairs"], c["distinguishable_from_noise"]) for c in cost] == [
        ("CPU per participant", "1", "unknown"), ("upstream RTP", "1", "unknown"),
        ("latency p50", "1", "unknown")]
    assert cost[2]["median"] == "-9.00"  # p50 71 (e2ee) - 80 (plain)
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
                                  ["--only", "mls,nosuch"]])
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


@pytest.fixture(name="ran")
def ran_fixture(monkeypatch: pytest.MonkeyPatch) -> list[str]:
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
    assert await e2e.run(e2e.parse_args(
        ["--height", "128", "--fps", "10", "--participants", "4", "--repeat", "1"])) == 0
    assert [(m.width, m.height, m.fps) if m else None for m in specs] == [(320, 128, 10.0)] * 2
    out = capsys.readouterr().out
    assert "4 participants" in out and "320x128 at 10 fps" in out and "environment:" in out


async def test_e2e_call_alternates_the_order_and_reports_the_paired_cost_with_its_spread(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    e2e = load_bench_module("e2e_call", monkeypatch)
    modes: list[str] = []
    # e2ee - plain CPU per pair: +2, -1, +0.5 (spread covers zero); upstream always +10.
    cpu = iter([10.0, 12.0, 11.0, 12.0, 10.0, 10.5])

    async def call(mode: str, participants: int, seconds: float,
                   media: MediaSpec | None = None) -> CallResult:
        modes.append(mode)
        r = result(mode, [60.0, 70.0, 80.0])
        r.cpu_per_participant_pct = next(cpu)
        r.up_kbps += 10.0 * (mode == "e2ee")
        return r

    monkeypatch.setattr(e2e, "measure_call", call)
    assert await e2e.run(e2e.parse_args([])) == 0  # --repeat 3 by default
    assert modes == ["plain", "e2ee", "e2ee", "plain", "plain", "e2ee"]
    out = capsys.readouterr().out
    cost = out.strip().splitlines()[-1]
    assert cost.startswith("E2EE cost, median of 3 paired differences (min..max): ")
    assert "CPU per participant +0.5 points (-1.0..+2.0, not distinguishable from noise)" in cost
    assert "upstream RTP +10.0 kbit/s (+10.0..+10.0)" in cost
    assert "plain #3" in out and "rtp_up_kbps_before_srtp" in out and "Traceback" not in out


@pytest.mark.parametrize("frames_received", [0, 5])
async def test_e2e_call_refuses_a_call_that_measured_nothing(
    frames_received: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    e2e = load_bench_module("e2e_call", monkeypatch)

    async def call(mode: str, *args: Any, **kwargs: Any) -> CallResult:
        r = result(mode, [])  # no latency sample: with no frame, or none matched its send
        r.frames_received = frames_received
        return r

    monkeypatch.setattr(e2e, "measure_call", call)
    assert await e2e.run(e2e.parse_args(["--repeat", "1"])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: plain call: ") and "Traceback" not in err
    assert ("no frames received" if frames_received == 0 else "no frame latency") in err


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


# -- the summary's target column: a script's last line `verdict: ...`

@pytest.mark.parametrize(("text", "expected"), [
    ("table\nGCM per-frame targets missed: 0\nverdict: met\n", "met"),
    ("table\nverdict: missed (2 of 10 GCM per-frame targets)\n\n",
     "missed (2 of 10 GCM per-frame targets)"),
    ("table\nno targets here\n", "-"),
    ("", "-"),
    ("verdict: met\nTraceback (most recent call last):\n  ...\nValueError: x\n", "-"),  # not last
    ("verdict: missed\n", "unreadable: verdict: missed"),  # no reason
    ("verdict: fine\n", "unreadable: verdict: fine"),
])
def test_the_verdict_is_the_last_line_of_a_scripts_output(text: str, expected: str) -> None:
    assert bench.verdict_of(text) == expected


def test_a_missed_target_shows_in_the_summary_but_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = {"mls_groups": "a  b  c\n1  2  3\n", "mls_tree": "verdict: met\n",
               "sframe": "x  y  z\nverdict: missed (1 of 20 GCM per-frame targets)\n"}

    async def run_script(path: Path, args: list[str], out: Path) -> tuple[int, float]:
        out.write_text(outputs[out.stem])
        return 0, 0.0

    monkeypatch.setattr(bench, "run_script", run_script)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", "mls,sframe"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["benchmark"], r["status"], r["target"]) for r in rows] == [
        ("mls_groups", "ok", "-"), ("mls_tree", "ok", "met"),
        ("sframe", "ok", "missed (1 of 20 GCM per-frame targets)")]
    out = capsys.readouterr().out
    assert "target" in out and "targets missed: sframe" in out


def test_sfu_forward_runs_its_loopback_part_in_both_modes() -> None:
    (_, _, _, full, quick), = [s for s in bench.SCRIPTS if s[0] == "sfu_forward"]
    assert "--loopback" in full and "--loopback" in quick


# -- leftover processes: a script's whole process group goes with it

# Starts a child in its own process group's session (inherited), writes the child's pid, sleeps.
# The child ignores nothing: SIGTERM ends it, as it does a delivery service.
SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(float(sys.argv[2]))
"""


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for init to reap it is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def wait_for_file(path: Path) -> int:
    for _ in range(400):
        if path.exists() and path.read_text():
            return int(path.read_text())
        await asyncio.sleep(0.025)
    raise AssertionError(f"{path} never written")


@pytest.fixture
def spawner(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "bench" / "spawner.py"
    path.parent.mkdir()
    path.write_text(SPAWNER)
    yield path
    pid_file = tmp_path / "child.pid"  # a failed test leaves no sleeper behind either
    if pid_file.exists() and pid_file.read_text() and running(int(pid_file.read_text())):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_a_timed_out_script_is_killed_with_its_children(
    spawner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "SCRIPT_TIMEOUT", 1.5)
    monkeypatch.setattr(bench, "KILL_GRACE", 2.0)
    pid_file = tmp_path / "child.pid"
    code, _ = await bench.run_script(spawner, [str(pid_file), "600"], tmp_path / "out.txt")
    assert code == -1
    child = int(pid_file.read_text())
    assert not running(child)


async def test_a_cancelled_script_is_killed_with_its_children(
    spawner: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "KILL_GRACE", 2.0)
    pid_file = tmp_path / "child.pid"
    task = asyncio.ensure_future(
        bench.run_script(spawner, [str(pid_file), "600"], tmp_path / "out.txt"))
    child = await wait_for_file(pid_file)
    assert running(child)
    task.cancel()  # what Ctrl-C does to `conclave bench`
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not running(child)


async def test_what_a_script_leaves_behind_when_it_exits_is_killed(
    spawner: Path, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    code, _ = await bench.run_script(spawner, [str(pid_file), "0"], tmp_path / "out.txt")
    assert code == 0
    assert not running(int(pid_file.read_text()))


# -- a call that measured nothing is an error, not "ok"

@pytest.mark.parametrize(("frames_received", "latencies", "message"), [
    (0, [], "no frames received"),
    (12, [], "no frame latency measured"),
])
def test_a_call_that_measured_nothing_fails_the_run(
    frames_received: int, latencies: list[float], message: str,
    ran: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def silent(mode: str, *args: Any, **kwargs: Any) -> CallResult:
        r = result(mode, latencies)
        r.frames_received = frames_received
        return r

    monkeypatch.setattr(bench, "measure_call", silent)
    assert main(["bench", "--quick", "--out", str(tmp_path), "--only", "call"]) == 1
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["benchmark"], r["status"]) for r in rows] == [("e2e_call_plain", "error")]
    assert message in rows[0]["output"]
    assert not (tmp_path / "e2e_call.csv").exists()


def test_the_full_run_pairs_the_calls_in_alternating_order(
    ran: list[str], tmp_path: Path
) -> None:
    assert asyncio.run(bench.run_benchmarks(tmp_path, only={"call"})) == 0
    assert ran == ["call plain", "call e2ee", "call e2ee", "call plain", "call plain",
                   "call e2ee"]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["benchmark"] for r in rows] == [
        "e2e_call_plain_1", "e2e_call_e2ee_1", "e2e_call_e2ee_2", "e2e_call_plain_2",
        "e2e_call_plain_3", "e2e_call_e2ee_3"]
    cost = list(csv.DictReader((tmp_path / "e2e_cost.csv").open()))
    assert all(c["pairs"] == "3" for c in cost)


def test_a_noisy_cost_is_called_noise_and_a_steady_one_is_not() -> None:
    from conclave.bench_call import Cost

    assert Cost("cpu", "points", [0.3, -0.2, 0.8]).text() == (
        "cpu +0.3 points (-0.2..+0.8, not distinguishable from noise)")
    assert Cost("cpu", "points", [0.9, 1.4, 1.1]).text() == "cpu +1.1 points (+0.9..+1.4)"
    assert Cost("cpu", "points", [0.4]).text() == "cpu +0.4 points"  # no spread, no verdict


# -- the call's services: stopped however the call ends

class FakeServe:
    """Stands in for `conclave serve`: a child that sleeps (or exits at once with `code`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int | None = None) -> None:
        import conclave.bench_call as bench_call

        self.procs: list[subprocess.Popen[bytes]] = []
        real = subprocess.Popen
        script = ("import time; time.sleep(600)" if code is None else
                  f"import sys; print('port 1 is taken', file=sys.stderr); sys.exit({code})")

        def popen(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            self.procs.append(real([sys.executable, "-c", script], **kwargs))
            return self.procs[-1]

        monkeypatch.setattr(bench_call.subprocess, "Popen", popen)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeServe]]:
    """`FakeServe` factory; a failed test leaves no sleeper behind."""
    made: list[FakeServe] = []

    def make(code: int | None = None) -> FakeServe:
        made.append(FakeServe(monkeypatch, code))
        return made[-1]

    yield make
    for fake in made:
        fake.kill()


async def test_a_service_that_dies_fails_the_start_at_once_with_its_last_words(
    tmp_path: Path, serve: Callable[..., FakeServe]
) -> None:
    from conclave.bench_call import ServiceProcess

    fake = serve(code=3)
    services = ServiceProcess(tmp_path)
    task = asyncio.ensure_future(services.start())
    # Well before the 20 s the health wait gives a live service: it saw the child exit.
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done
    with pytest.raises(RuntimeError, match="exited with code 3 before answering: port 1 is taken"):
        task.result()
    services.stop()
    assert fake.procs[0].poll() == 3


async def test_the_services_are_stopped_when_they_never_become_healthy(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., FakeServe]
) -> None:
    import conclave.bench_call as bench_call

    fake = serve()

    async def never(*args: Any, **kwargs: Any) -> bool:
        return False

    monkeypatch.setattr(bench_call, "wait_healthy", never)
    with pytest.raises(RuntimeError, match="did not start"):
        await measure_call("plain", 2, 0.1, warmup=0.0)
    assert fake.procs[0].poll() is not None  # terminated, not orphaned


async def test_the_services_are_stopped_even_when_closing_a_participant_fails(
    monkeypatch: pytest.MonkeyPatch, serve: Callable[..., FakeServe]
) -> None:
    import conclave.bench_call as bench_call

    fake = serve()

    async def healthy(*args: Any, **kwargs: Any) -> bool:
        return True

    async def refuse(self: Any) -> None:
        raise RuntimeError("cannot reach the delivery service")

    async def broken_close(self: Any) -> None:
        raise OSError("close failed")

    monkeypatch.setattr(bench_call, "wait_healthy", healthy)
    monkeypatch.setattr(bench_call.Participant, "start", refuse)
    monkeypatch.setattr(bench_call.Participant, "close", broken_close)
    with pytest.raises(OSError, match="close failed"):
        await measure_call("plain", 2, 0.1, warmup=0.0)
    assert fake.procs[0].poll() is not None


def test_the_sfu_forward_loopback_measures_both_relays_end_to_end() -> None:
    # The loopback part drives the real SFU process and the naive relay built on its hooks: a
    # change of the hooks' signatures must not leave the benchmark unable to run.
    path = BENCH_DIR / "sfu_forward.py"
    if not path.exists():
        pytest.skip("bench/ is not in this checkout")
    args = ["--loopback", "--participants", "2", "--repeat", "1", "--rate", "50",
            "--seconds", "1", "--packets", "100"]
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("  ")[0]: line.split() for line in done.stdout.splitlines()
            if line.startswith(("naive aiortc relay ", "sfu (raw, fast send) "))}
    assert set(rows) == {"naive aiortc relay", "sfu (raw, fast send)"}, done.stdout[-2000:]
    for cells in rows.values():  # each forwarded (a loaded machine may lose a few)
        forwarded = next(c for c in cells if c.endswith("%"))
        assert float(forwarded[:-1]) >= 50.0, cells
    assert done.stdout.rstrip().splitlines()[-1].startswith("verdict: ")


def test_the_environment_line_says_how_the_cpus_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = load_bench_module("_env", monkeypatch)
    assert env.idle_policy(tmp_path) is None  # no cpuidle in sysfs: nothing to say
    driver = tmp_path / "devices/system/cpu/cpuidle/current_driver"
    driver.parent.mkdir(parents=True)
    driver.write_text("acpi_idle\n")
    assert env.idle_policy(tmp_path) == "cpuidle acpi_idle"
    driver.write_text("haltpoll\n")
    assert env.idle_policy(tmp_path) == "cpuidle haltpoll"  # its window unreadable
    window = tmp_path / "module/haltpoll/parameters/guest_halt_poll_ns"
    window.parent.mkdir(parents=True)
    window.write_text("200000\n")
    assert env.idle_policy(tmp_path) == "cpuidle haltpoll (guest halt poll 200 us)"
    window.write_text("0\n")
    assert env.idle_policy(tmp_path) == "cpuidle haltpoll (guest halt poll 0 us)"
    window.write_text("fast\n")
    assert env.idle_policy(tmp_path) == "cpuidle haltpoll"
    # `conclave bench` tells the environment line from table rows by its single spaces
    monkeypatch.setattr(env, "idle_policy", lambda: "cpuidle haltpoll (guest halt poll 0 us)")
    line = env.environment()
    assert "cpuidle haltpoll (guest halt poll 0 us)" in line and "  " not in line
