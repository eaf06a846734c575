"""Counters and gauges in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from collections import defaultdict


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + inner + "}"


class Metrics:
    """A tiny registry: `inc` counters, `set` gauges, `render` for /metrics."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help[name] = (kind, help_text)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values[name]
        series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        return self._values[name].get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        lines = []
        for name in sorted(set(self._help) | set(self._values)):
            kind, help_text = self._help.get(name, ("untyped", ""))
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for key, value in sorted(self._values.get(name, {}).items()):
                number = int(value) if float(value).is_integer() else value
                lines.append(f"{name}{_labels(key)} {number}")
        return "\n".join(lines) + "\n"


def service_metrics() -> Metrics:
    m = Metrics()
    m.describe("ds_http_requests_total", "counter", "HTTP requests by route and status.")
    m.describe("ds_messages_accepted_total", "counter", "Messages appended to group logs, by kind.")
    m.describe("ds_messages_rejected_total", "counter", "Messages refused, by error code.")
    m.describe("ds_pushed_total", "counter", "Messages and Welcomes pushed over WebSockets.")
    m.describe("ds_websockets", "gauge", "Open WebSocket connections.")
    m.describe("ds_groups_created_total", "counter", "Groups created.")
    m.describe("ds_key_packages_claimed_total", "counter", "KeyPackages claimed.")
    m.describe("ds_sessions_issued_total", "counter", "Sessions issued after a proof of possession.")
    m.describe("ds_database_up", "gauge",
               "1 while the database answers, 0 while this instance finds it unreachable.")
    m.describe("ds_database_outages_total", "counter",
               "Times this instance found the database unreachable (one per outage).")
    m.describe("ds_database_refusals_total", "counter",
               "Requests the database declined, by condition: for now (503) full, readonly, "
               "io, locked, contention, resources, timeout, cantopen; damaged (500) corrupt.")
    # Gauges and counters with a sample from the start: an absent series reads as "no data"
    # in Prometheus, not as 0 (an alert on `ds_database_up == 0` needs the 1 before).
    m.set("ds_websockets", 0)
    m.set("ds_database_up", 1)
    m.set("ds_database_outages_total", 0)
    return m
