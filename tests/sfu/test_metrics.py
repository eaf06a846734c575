"""`/metrics`: the Prometheus text exposition format (0.0.4), and values true to what happened.

`prometheus_client` is not a dependency: the format is checked by a parser of our own.
"""

from __future__ import annotations

import math
import re
import time

import aiohttp

from sfu.forwarding import Slot
from sfu.metrics import Metrics
from sfu.rtp import URI_MID
from tests.sfu.test_forwarding import DELTA, KEY, make_slot, make_source, rtp_packet

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse_exposition(text: str) -> dict[str, dict]:
    """Parse the text format strictly: every sample in a family announced by HELP and TYPE just
    before it, each family once, counters named `_total`, histograms with cumulative buckets
    ending in +Inf, then `_sum` and `_count`. Returns {family: {"type", "help", "samples"}}."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current: dict | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and help_text and name not in families, line
            current = families[name] = {"help": help_text, "type": None, "samples": []}
            current["name"] = name
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current["name"] == name and not current["samples"]
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current["type"] = kind
            continue
        assert not line.startswith("#") and line, f"unexpected line {line!r}"
        match = _SAMPLE.match(line)
        assert match is not None and current is not None and current["type"], line
        name, labels_text, value_text = match.groups()
        labels = dict(_LABEL.findall(labels_text or ""))
        if labels_text:
            assert ",".join(f'{k}="{v}"' for k, v in labels.items()) == labels_text, line
        value = float(value_text)  # "+Inf", "NaN" and exponents included
        family = current["name"]
        if current["type"] == "histogram":
            assert name in (f"{family}_bucket", f"{family}_sum", f"{family}_count"), line
        else:
            assert name == family, line
        current["samples"].append((name, labels, value))
    for family, info in families.items():
        assert info["type"] is not None and info["samples"], family
        if info["type"] == "counter":
            assert family.endswith("_total") and all(v >= 0 for _, _, v in info["samples"])
        if info["type"] == "histogram":
            names = [n for n, _, _ in info["samples"]]
            buckets = [
                (labels["le"], v) for n, labels, v in info["samples"] if n.endswith("_bucket")
            ]
            assert names == [f"{family}_bucket"] * len(buckets) + [
                f"{family}_sum",
                f"{family}_count",
            ]
            bounds = [float(le) for le, _ in buckets]
            assert buckets[-1][0] == "+Inf" and bounds == sorted(bounds) and math.isinf(bounds[-1])
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), "buckets must be cumulative"
            assert counts[-1] == info["samples"][-1][2], "+Inf bucket == _count"
    return families


def values(metrics: Metrics) -> dict[str, float]:
    """Every plain sample by name, for the checks below."""
    return {
        name: value
        for info in parse_exposition(metrics.render()).values()
        for name, labels, value in info["samples"]
        if not labels
    }


def test_exposition_format_and_histogram_buckets() -> None:
    metrics = Metrics()
    for seconds in (0.00003, 0.00005, 0.0002, 0.0002, 0.004, 0.5):  # 0.00005 is on a bound
        metrics.forwarding_latency.observe(seconds)
    families = parse_exposition(metrics.render())
    assert families["sfu_rooms"]["type"] == "gauge"
    assert families["sfu_packets_forwarded_total"]["type"] == "counter"
    buckets = {
        labels["le"]: value
        for name, labels, value in families["sfu_forwarding_latency_seconds"]["samples"]
        if name.endswith("_bucket")
    }
    assert buckets["5e-05"] == 2 and buckets["0.0001"] == 2 and buckets["0.00025"] == 4
    assert buckets["0.005"] == 5 and buckets["0.1"] == 5 and buckets["+Inf"] == 6
    samples = values(metrics)
    assert samples["sfu_forwarding_latency_seconds_count"] == 6
    assert abs(samples["sfu_forwarding_latency_seconds_sum"] - 0.50448) < 1e-9


def test_forwarded_counts_only_what_was_sent() -> None:
    """A copy to a subscriber whose transport is gone (the send raises ConnectionError) was not
    forwarded: it must not count in packets or bytes forwarded."""
    source, up = make_source()
    metrics = source.metrics
    live, down = make_slot(metrics=metrics)

    def gone(data: bytes, rest: bytes = b"") -> None:
        raise ConnectionError("not connected")

    closing = Slot(
        subscriber="leaving",
        kind="video",
        ssrc=8888,
        mid="1",
        payload_type=100,
        ext_ids={URI_MID: 9},
        send=gone,
        metrics=metrics,
    )
    live.attach(source)
    closing.attach(source)
    source.tick(now=0.0)  # the PLI both new slots asked for
    source.handle_rtp(rtp_packet(1, 0, KEY), now=0.0)
    source.handle_rtp(rtp_packet(2, 3000, DELTA), now=0.01)
    source.handle_rtp(rtp_packet(2, 3000, DELTA), now=0.02)  # a duplicate: received, not sent
    source.handle_rtp(rtp_packet(4, 9000, DELTA), now=0.03)  # 3 is missing
    source.send_nacks(now=0.03)
    live.retransmit([parse_seq(down.packets[1])], now=0.05)
    samples = values(metrics)
    assert samples["sfu_packets_received_total"] == 4
    assert samples["sfu_packets_forwarded_total"] == 3  # was 6: the closing slot's copies
    assert samples["sfu_bytes_forwarded_total"] == sum(len(p) for p in down.packets[:3])
    assert samples["sfu_keyframes_total"] == 1
    assert samples["sfu_plis_sent_total"] == 1 and len(up.packets) == 2  # PLI, NACK
    assert samples["sfu_nacks_sent_total"] == 1
    assert samples["sfu_nacks_received_total"] == 1
    assert samples["sfu_retransmissions_total"] == 1 and len(down.packets) == 4
    assert samples["sfu_forwarding_latency_seconds_count"] == 3  # duplicates are not timed
    # Timed from the packet's arrival at the host when known: 30 ms in the socket count.
    before = samples["sfu_forwarding_latency_seconds_sum"]
    source.handle_rtp(rtp_packet(5, 12000, DELTA), now=0.04,
                      arrival_ns=time.time_ns() - 30_000_000)
    samples = values(metrics)
    assert samples["sfu_forwarding_latency_seconds_count"] == 4
    assert samples["sfu_forwarding_latency_seconds_sum"] - before >= 0.03


def parse_seq(packet: bytes) -> int:
    return int.from_bytes(packet[2:4], "big")


async def test_rooms_and_participants_go_down_when_people_leave() -> None:
    from tests.sfu.test_signalling import _joined, running

    async with running() as h:
        url = h.url.replace("/v1/signal", "/metrics")
        async with aiohttp.ClientSession() as session:

            async def gauges() -> tuple[float, float]:
                async with session.get(url) as resp:
                    samples = {
                        name: value
                        for info in parse_exposition(await resp.text()).values()
                        for name, _, value in info["samples"]
                    }
                return samples["sfu_rooms"], samples["sfu_participants"]

            async with session.ws_connect(h.url) as a, session.ws_connect(h.url) as b:
                await _joined(a, "a")
                await _joined(b, "b")
                assert await gauges() == (1, 2)
                await b.send_json({"type": "leave"})
                assert await _until(gauges, (1, 1))
            assert await _until(gauges, (0, 0))


async def _until(read, expected: tuple[float, float]) -> bool:  # type: ignore[no-untyped-def]
    import asyncio

    for _ in range(50):
        if await read() == expected:
            return True
        await asyncio.sleep(0.1)
    return False
