"""End-to-end call benchmark: the same call with and without E2EE, measured in the same run.

The delivery service and the SFU run in a child process (`conclave serve`), the participants in
this one. Both modes run the identical media pipeline (aiortc encoder -> frame hook -> RTP ->
SFU -> jitter buffer -> frame hook -> decoder); "e2ee" seals each frame with SFrame under MLS
keys, "plain" passes it through an identity transform. Measured per mode:

- CPU per participant: this process's CPU time (all threads: encoders, decoders, crypto) over
  the window, divided by the number of participants, as % of one core; the services' CPU time
  (from /proc) separately;
- RTP bytes (before SRTP): the RTP packets (headers included) each participant sends to the SFU,
  counted before SRTP protection, and receives from it, counted after unprotection; not the
  bytes on the wire: SRTP adds a 16-byte tag per packet (AEAD_AES_256_GCM, the profile aiortc
  prefers), the same in both modes, and RTCP, DTLS, ICE and UDP/IP headers are not counted;
- frames sent (each frame once, by its sender) and frames received summed over all receivers
  (every frame reaches participants - 1 of them: about twice frames sent with 3 participants);
- frame latency: from the sender's frame hook (after the encoder) to the receiver's frame hook
  (after the jitter buffer, decrypt included), matched by a hash of the bytes on the wire, at
  every receiver of the frame. SFrame makes every frame unique; without it the synthetic tone
  repeats identical Opus frames (6 to 60 frames apart), and a frame is matched to the latest
  send of its bytes: "plain" audio latencies are right only while under about 120 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiortc.rtp import is_rtcp

from delivery_service.client import wait_healthy

from .media import MediaSpec
from .participant import Participant, RemoteTrack

MODES = ("plain", "e2ee")
WARMUP = 2.0  # seconds of call before the measuring starts
SENT_AT_KEPT = 20_000  # send times kept for latency matching (~100 s of a 3-party call)


@dataclass
class CallResult:
    mode: str
    participants: int
    seconds: float
    cpu_per_participant_pct: float
    services_cpu_pct: float
    up_kbps: float  # per participant, RTP before SRTP protection
    down_kbps: float  # per participant, RTP after SRTP unprotection
    frames_sent: int
    frames_received: int  # summed over the receivers: each frame counts once per receiver
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    latencies_by_kind: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def percentile(self, q: float, kind: str | None = None) -> float:
        data = sorted(self.latencies_ms if kind is None else self.latencies_by_kind.get(kind, []))
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]

    def row(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "participants": self.participants,
            "seconds": round(self.seconds, 2),
            "cpu_per_participant_pct": round(self.cpu_per_participant_pct, 1),
            "services_cpu_pct": round(self.services_cpu_pct, 1),
            # Counted in the clear on both sides of SRTP: not the bytes on the wire.
            "rtp_up_kbps_before_srtp": round(self.up_kbps, 1),
            "rtp_down_kbps_after_srtp": round(self.down_kbps, 1),
            "frames_sent": self.frames_sent,
            "frames_received_sum_over_receivers": self.frames_received,
            "latency_p50_ms": round(self.percentile(0.5), 2),
            "latency_p90_ms": round(self.percentile(0.9), 2),
            "audio_latency_p50_ms": round(self.percentile(0.5, "audio"), 2),
            "video_latency_p50_ms": round(self.percentile(0.5, "video"), 2),
            "latency_mean_ms": round(statistics.fmean(self.latencies_ms), 2)
            if self.latencies_ms else float("nan"),
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServiceProcess:
    """`conclave serve` in a child process on free loopback ports."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.ds_port, self.sfu_port = _free_port(), _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ds_url(self) -> str:
        return f"http://127.0.0.1:{self.ds_port}"

    @property
    def sfu_url(self) -> str:
        return f"http://127.0.0.1:{self.sfu_port}/v1/signal"

    @property
    def log(self) -> Path:
        return self.state / "serve.log"

    async def start(self) -> None:
        """Start `conclave serve`; RuntimeError if it exits or does not answer within 20 s
        (the caller still calls `stop`: the child may be running)."""
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conclave.cli", "serve", "--ds-port", str(self.ds_port),
                 "--sfu-port", str(self.sfu_port), "--state", str(self.state)],
                stdout=subprocess.DEVNULL, stderr=log,
            )
        proc = self.proc
        # `alive`: a child that died (a port taken, a broken install) fails at once, not in 20 s.
        if await wait_healthy(self.ds_url, 20, alive=lambda: proc.poll() is None, interval=0.1):
            return
        code = proc.poll()
        if code is None:
            raise RuntimeError("the services did not start within 20 s")
        raise RuntimeError(f"the services exited with code {code} before answering"
                           + self._last_log_line())

    def _last_log_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines else ""

    def cpu(self) -> float:
        return float("nan") if self.proc is None else _proc_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()  # reaped: no zombie left behind
            self.proc = None


class _Probe:
    """Byte counters and latency matching shared by the participants of one run."""

    def __init__(self) -> None:
        self.sent_at: dict[bytes, float] = {}
        self.latencies: dict[str, list[float]] = {"audio": [], "video": []}
        self.up = 0
        self.down = 0
        self.frames_sent = 0
        self.frames_received = 0
        self.measuring = False

    def reset(self) -> None:
        for values in self.latencies.values():
            values.clear()
        self.up = self.down = self.frames_sent = self.frames_received = 0
        self.measuring = True

    def hook_sender(self, p: Participant) -> None:
        for encryptor in p.encryptors.values():
            original = encryptor.encrypt_frame

            def encrypt(frame: bytes, original: Callable[[bytes], bytes] = original) -> bytes:
                out = original(frame)
                sent_at = self.sent_at
                if len(sent_at) >= SENT_AT_KEPT:  # frames this old have arrived or never will
                    for key in list(itertools.islice(sent_at, SENT_AT_KEPT // 2)):
                        del sent_at[key]
                sent_at[hashlib.blake2b(out, digest_size=8).digest()] = time.perf_counter()
                self.frames_sent += self.measuring
                return out

            encryptor.encrypt_frame = encrypt  # type: ignore[method-assign]
        assert p.sfu is not None
        transports = {id(t.sender.transport): t.sender.transport
                      for t in p.sfu.pc.getTransceivers() if t.sender.transport is not None}
        for transport in transports.values():
            send = transport._send_rtp

            async def counted(data: bytes, send: Any = send) -> None:
                # RTCP goes out through the same call; only RTP is counted, as on the way in
                # (where RTCP takes another path, `_handle_rtcp_data`).
                if not is_rtcp(data):
                    self.up += len(data) * self.measuring
                await send(data)

            transport._send_rtp = counted
            handle = transport._handle_rtp_data

            async def received(data: bytes, arrival_time_ms: int, handle: Any = handle) -> None:
                self.down += len(data) * self.measuring
                await handle(data, arrival_time_ms)

            transport._handle_rtp_data = received

    def hook_receiver(self, remote: RemoteTrack) -> None:
        # The participant's own hook (in e2ee mode, the per-frame epoch audit) still runs: it is
        # part of the pipeline measured.
        own = remote.decryptor.on_decrypted

        def decrypted(data: bytes, mime_type: str) -> None:
            if own is not None:
                own(data, mime_type)
            # Every receiver of a frame measures its latency (not only the first to get it).
            sent = self.sent_at.get(hashlib.blake2b(data, digest_size=8).digest())
            if self.measuring:
                self.frames_received += 1
                if sent is not None:
                    ms = (time.perf_counter() - sent) * 1000
                    self.latencies.setdefault(remote.kind, []).append(ms)

        remote.decryptor.on_decrypted = decrypted


async def measure_call(
    mode: str,
    participants: int = 3,
    seconds: float = 8.0,
    warmup: float = WARMUP,
    media: MediaSpec | None = None,
    progress: Callable[[float], None] | None = None,
) -> CallResult:
    """One call of `participants` for `seconds` (after `warmup`) in `mode` "plain" or "e2ee".

    `media` is what each participant publishes, with its own `seed` (its own tone and pattern:
    identical frames from two senders would confuse the latency matching)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    with tempfile.TemporaryDirectory(prefix="conclave-bench-") as tmp:
        services = ServiceProcess(Path(tmp))
        probe = _Probe()
        people = [
            Participant(
                f"{mode}-{i}", services.ds_url, services.sfu_url,
                media=dataclasses.replace(media or MediaSpec(width=320, height=240, fps=15),
                                          seed=i),
            )
            for i in range(participants)
        ]
        # Undone in reverse, each step even if an earlier one raised: the participants are
        # closed, then the services stopped, whether the start, the call or a close failed.
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(services.stop)
            for p in people:
                stack.push_async_callback(p.close)
            await services.start()
            for p in people:
                p.on_remote_track = probe.hook_receiver
                await p.start()
            await people[0].create(f"bench-{mode}")
            for p in people[1:]:
                await p.join(f"bench-{mode}")
            for p in people:
                await p.connect_media(e2ee=mode == "e2ee")
                probe.hook_sender(p)
            await asyncio.sleep(warmup)
            probe.reset()
            cpu0, svc0, t0 = time.process_time(), services.cpu(), time.perf_counter()
            steps = max(1, int(seconds / 0.25))
            for i in range(steps):
                await asyncio.sleep(seconds / steps)
                if progress is not None:
                    progress((i + 1) / steps)
            cpu1, svc1, t1 = time.process_time(), services.cpu(), time.perf_counter()
            probe.measuring = False
    wall = t1 - t0
    return CallResult(
        mode, participants, wall,
        cpu_per_participant_pct=100 * (cpu1 - cpu0) / wall / participants,
        services_cpu_pct=100 * (svc1 - svc0) / wall,
        up_kbps=probe.up * 8 / 1000 / wall / participants,
        down_kbps=probe.down * 8 / 1000 / wall / participants,
        frames_sent=probe.frames_sent, frames_received=probe.frames_received,
        latencies_ms=[ms for values in probe.latencies.values() for ms in values],
        latencies_by_kind={k: list(v) for k, v in probe.latencies.items()},
    )


def call_order(repeats: int) -> list[str]:
    """The modes of `repeats` pairs of calls, the order alternating pair by pair (plain, e2ee,
    e2ee, plain, ...): neither mode always runs first, on a machine that warms up or whose load
    drifts during the run. The k-th call of each mode belong to the k-th pair."""
    return [mode for k in range(repeats) for mode in (MODES if k % 2 == 0 else MODES[::-1])]


def call_names(results: list[CallResult]) -> list[str]:
    """Each call's name: its mode, and its number among the calls of that mode ("e2ee #2")."""
    names: list[str] = []
    for r in results:
        names.append(f"{r.mode} #{sum(n.startswith(r.mode + ' ') for n in names) + 1}")
    return names


def call_problem(result: CallResult) -> str | None:
    """Why `result` is not a measurement of a call (None if it is one): a call whose media
    never flowed (the SFU died, ICE never connected) has no frames and no latencies."""
    if result.frames_received == 0:
        return f"{result.mode} call: no frames received (media never connected?)"
    if not result.latencies_ms:
        return f"{result.mode} call: no frame latency measured (no frame matched its send)"
    return None


# What the E2EE cost is reported on: (label, unit, value of one call).
COST_METRICS: list[tuple[str, str, Callable[[CallResult], float]]] = [
    ("CPU per participant", "points", lambda r: r.cpu_per_participant_pct),
    ("upstream RTP", "kbit/s", lambda r: r.up_kbps),
    ("latency p50", "ms", lambda r: r.percentile(0.5)),
]


@dataclass
class Cost:
    """e2ee minus plain for one metric over the pairs of calls."""

    metric: str
    unit: str
    differences: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.differences)

    @property
    def noise(self) -> bool:
        """The pairs disagree on the sign: the cost is not distinguishable from run-to-run noise
        (one pair cannot show its noise: never called noise, see `text`)."""
        return len(self.differences) > 1 and min(self.differences) <= 0 <= max(self.differences)

    def text(self) -> str:
        if len(self.differences) == 1:  # no spread to show (`cost_summary` says so once)
            return f"{self.metric} {self.median:+.1f} {self.unit}"
        return (f"{self.metric} {self.median:+.1f} {self.unit} ({min(self.differences):+.1f}.."
                f"{max(self.differences):+.1f}"
                + (", not distinguishable from noise" if self.noise else "") + ")")


def e2ee_costs(results: list[CallResult]) -> list[Cost]:
    """The paired differences e2ee - plain (the k-th call of each mode, `call_order`), per metric.
    ValueError if the results do not pair up."""
    plain = [r for r in results if r.mode == "plain"]
    e2ee = [r for r in results if r.mode == "e2ee"]
    if not plain or len(plain) != len(e2ee):
        raise ValueError(f"{len(plain)} plain and {len(e2ee)} e2ee calls do not pair up")
    return [Cost(label, unit, [value(b) - value(a) for a, b in zip(plain, e2ee, strict=True)])
            for label, unit, value in COST_METRICS]


def cost_summary(results: list[CallResult]) -> str:
    """The E2EE cost as one line: median of the paired differences and their min..max."""
    costs = e2ee_costs(results)
    pairs = len(costs[0].differences)
    what = (f"median of {pairs} paired differences (min..max)" if pairs > 1 else
            "one pair of calls (its noise unknown: repeat the pairs to see it)")
    return f"E2EE cost, {what}: " + "; ".join(c.text() for c in costs)
