"""Prometheus text-format metrics (exposition format 0.0.4), without a client library."""

from __future__ import annotations

import bisect
from collections.abc import Callable

LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
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
        self.keyframes_seen = 0
        self.signalling_errors = 0
        self.tokens_refused = 0
        self.forwarding_latency = Histogram()
        # Gauges are read from the server when rendering.
        self.rooms: Callable[[], int] = lambda: 0
        self.participants: Callable[[], int] = lambda: 0

    def render(self) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name} {value}")

        metric("sfu_rooms", "gauge", "Rooms with at least one participant.", self.rooms())
        metric("sfu_participants", "gauge", "Joined participants.", self.participants())
        metric(
            "sfu_packets_received_total",
            "counter",
            "RTP packets received from publishers.",
            self.packets_received,
        )
        metric(
            "sfu_packets_forwarded_total",
            "counter",
            "RTP packets sent to subscribers (one per subscriber).",
            self.packets_forwarded,
        )
        metric(
            "sfu_bytes_forwarded_total",
            "counter",
            "RTP bytes sent to subscribers, before SRTP.",
            self.bytes_forwarded,
        )
        metric(
            "sfu_nacks_received_total",
            "counter",
            "Sequence numbers NACKed by subscribers.",
            self.nacks_received,
        )
        metric(
            "sfu_nacks_sent_total",
            "counter",
            "Sequence numbers the SFU NACKed to publishers.",
            self.nacks_sent,
        )
        metric(
            "sfu_retransmissions_total",
            "counter",
            "Packets resent to subscribers from the cache.",
            self.retransmissions_sent,
        )
        metric(
            "sfu_plis_received_total",
            "counter",
            "PLI/FIR received from subscribers.",
            self.plis_received,
        )
        metric("sfu_plis_sent_total", "counter", "PLIs sent to publishers.", self.plis_sent)
        metric(
            "sfu_keyframes_total",
            "counter",
            "VP8 keyframes seen from publishers.",
            self.keyframes_seen,
        )
        metric(
            "sfu_signalling_errors_total",
            "counter",
            "Signalling messages answered with an error.",
            self.signalling_errors,
        )
        metric("sfu_tokens_refused_total", "counter", "Join attempts refused.", self.tokens_refused)
        h = self.forwarding_latency
        name = "sfu_forwarding_latency_seconds"
        lines.append(f"# HELP {name} Time from RTP arrival (after SRTP) to the last copy sent.")
        lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, count in zip(h.buckets, h.counts, strict=False):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
        lines.append(f"{name}_sum {h.sum}")
        lines.append(f"{name}_count {h.count}")
        return "\n".join(lines) + "\n"
