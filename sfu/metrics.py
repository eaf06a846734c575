"""Prometheus text-format metrics (exposition format 0.0.4), without a client library."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)


class Histogram:
    """Cumulative-bucket histogram; `observe` costs one bisect."""

    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


# (metric name without "sfu_" and "_total", Metrics attribute, help text)
_COUNTERS = (
    ("packets_received", "packets_received", "RTP packets received from publishers."),
    (
        "packets_forwarded",
        "packets_forwarded",
        "RTP packets sent to subscribers (one per subscriber).",
    ),
    ("bytes_forwarded", "bytes_forwarded", "RTP bytes sent to subscribers, before SRTP."),
    ("nacks_received", "nacks_received", "Sequence numbers NACKed by subscribers."),
    ("nacks_sent", "nacks_sent", "Sequence numbers the SFU NACKed to publishers."),
    ("retransmissions", "retransmissions_sent", "Packets resent to subscribers from the cache."),
    ("plis_received", "plis_received", "PLI/FIR received from subscribers."),
    ("plis_sent", "plis_sent", "PLIs sent to publishers."),
    ("rembs_received", "rembs_received", "Bandwidth estimates (REMB) received from subscribers."),
    ("rembs_sent", "rembs_sent", "Bandwidth estimates (REMB) relayed to publishers."),
    ("keyframes", "keyframes_seen", "VP8 keyframes seen from publishers."),
    ("signalling_errors", "signalling_errors", "Signalling messages answered with an error."),
    (
        "signalling_rate_limited",
        "signalling_rate_limited",
        "Signalling messages dropped over a socket's rate limit.",
    ),
    ("tokens_refused", "tokens_refused", "Room tokens refused, at joins and renewals."),
    (
        "token_secret_reloads",
        "token_secret_reloads",
        "Token secret sets taken on a reload (SIGHUP), each starting "
        "sfu_tokens_accepted_total again from 0.",
    ),
)


class Metrics:
    """The SFU's counters. Plain attributes: the forwarding path increments them directly."""

    def __init__(self) -> None:
        self.packets_received = 0
        self.packets_forwarded = 0
        self.bytes_forwarded = 0
        self.nacks_received = 0
        self.nacks_sent = 0
        self.retransmissions_sent = 0
        self.plis_received = 0
        self.plis_sent = 0
        self.rembs_received = 0
        self.rembs_sent = 0
        self.keyframes_seen = 0
        self.signalling_errors = 0
        self.signalling_rate_limited = 0
        self.tokens_refused = 0
        # Room tokens accepted (at joins and renewals), by the secret that signed them: index i
        # is the (i+1)th secret of the token secret file as last (re)loaded (`SFUServer` sizes
        # it, and zeroes it on a reload: the (i+1)th line may now be another secret).
        self.tokens_accepted: list[int] = []
        self.token_secret_reloads = 0
        self.forwarding_latency = Histogram()
        # Gauges are read from the server when rendering.
        self.rooms: Callable[[], int] = lambda: 0
        self.participants: Callable[[], int] = lambda: 0

    def render(self) -> str:
        lines: list[str] = []
        samples: list[tuple[str, str, str, float]] = [
            ("sfu_rooms", "gauge", "Rooms with at least one participant.", self.rooms()),
            ("sfu_participants", "gauge", "Joined participants.", self.participants()),
        ]
        samples += [
            (f"sfu_{name}_total", "counter", help_text, getattr(self, attribute))
            for name, attribute, help_text in _COUNTERS
        ]
        for name, kind, help_text, value in samples:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        if self.tokens_accepted:
            name = "sfu_token_secrets"
            lines += [
                f"# HELP {name} Room-token secrets loaded (lines of the token secret file).",
                f"# TYPE {name} gauge",
                f"{name} {len(self.tokens_accepted)}",
            ]
            name = "sfu_tokens_accepted_total"
            lines.append(
                f"# HELP {name} Room tokens accepted, at joins and renewals, by the secret that "
                "signed them (1: the first of the token secret file; from 0 at each reload)."
            )
            lines.append(f"# TYPE {name} counter")
            lines += [
                f'{name}{{secret="{i}"}} {count}'
                for i, count in enumerate(self.tokens_accepted, start=1)
            ]
        h = self.forwarding_latency
        name = "sfu_forwarding_latency_seconds"
        lines.append(
            f"# HELP {name} Time from an RTP packet's arrival at the host (the socket's receive "
            "stamp; where unknown, from after SRTP) to its last copy sent."
        )
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(h.buckets, h.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
        lines.append(f"{name}_sum {h.sum}")
        lines.append(f"{name}_count {h.count}")
        return "\n".join(lines) + "\n"


class WorkerStatus(NamedTuple):
    """One worker of `--workers`, as worker 0 sees it."""

    index: int
    port: int | None
    state: str  # "up", "starting" or "down"
    restarts: Mapping[str, int] | None  # by reason; None: worker 0, which nothing restarts


def render_workers(workers: Sequence[WorkerStatus]) -> str:
    """Worker 0's metrics of every worker (the others' own /metrics do not answer while they
    are down): whether each is up, how many are not, and their restarts by reason."""
    lines = [
        "# HELP sfu_worker_up Whether the worker serves (1), or is down, starting or late (0).",
        "# TYPE sfu_worker_up gauge",
    ]
    lines += [
        f'sfu_worker_up{{worker="{w.index}",port="{w.port}"}} {int(w.state == "up")}'
        for w in workers
    ]
    down = sum(w.state != "up" for w in workers)
    lines += [
        "# HELP sfu_workers_down Workers down, starting or late (not serving their rooms).",
        "# TYPE sfu_workers_down gauge",
        f"sfu_workers_down {down}",
        "# HELP sfu_worker_restarts_total Workers ended and restarted by worker 0, by reason.",
        "# TYPE sfu_worker_restarts_total counter",
    ]
    for w in workers:
        for reason, count in (w.restarts or {}).items():
            lines.append(
                f'sfu_worker_restarts_total{{worker="{w.index}",reason="{reason}"}} {count}'
            )
    return "\n".join(lines) + "\n"
