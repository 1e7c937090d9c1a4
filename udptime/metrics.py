"""Prometheus metrics read from the plain counters on scrape.

The hot path only bumps integers (:class:`udptime.counters.Counters`) and
bucket counts (:class:`LatencyHistogram`); the collector here turns them into
metric families when Prometheus asks, so metrics cost nothing per datagram
beyond those increments. ``prometheus_client`` is imported lazily, and
the HTTP side lives in :mod:`udptime.metrics_site`, so the listeners that
import this module load neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from udptime.counters import Counters, LatencyHistogram

COUNTER_HELP = {
    "received": "Datagrams received.",
    "answered": "Datagrams sent back (Kiss-o'-Death replies included).",
    "rate_limited": "Datagrams over their source's rate limit (dropped or kissed).",
    "denied": "Datagrams refused by the access lists.",
    "ignored": "Datagrams owed no reply: malformed, not a request, loop guard.",
    "kisses": "Kiss-o'-Death replies sent.",
    "send_errors": "Replies the kernel refused to send.",
    "errors": "Replies that failed to build (bugs; should stay 0).",
}


@dataclass
class ListenerStats:
    """What one listener exposes: its labels, counters and latency histogram."""

    format: str
    address: str
    port: int
    counters: Counters
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    worker: str = "0"

    def labels(self) -> list[str]:
        return [self.format, self.address, str(self.port), self.worker]


LABELS = ["format", "address", "port", "worker"]


class UdptimeCollector:
    """A ``prometheus_client`` collector over our plain counters."""

    def __init__(
        self,
        listeners: Callable[[], list[ListenerStats]],
        gauges: Callable[[], dict[str, tuple[str, float]]],
        counters: Callable[[], dict[str, tuple[str, float]]] = dict,
        roles: Sequence[str] = (),
        families: Callable[[], Iterable[Any]] = tuple,
    ) -> None:
        self._listeners = listeners
        self._gauges = gauges
        self._counters = counters
        #: what this host serves (formats, "nts", "nts-ke"): udptime_role
        self._roles = tuple(roles)
        #: whole metric families a format adds (Roughtime's, with labels)
        self._families = families

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        listeners = self._listeners()
        for name, help_text in COUNTER_HELP.items():
            family = CounterMetricFamily(f"udptime_{name}", help_text, labels=LABELS)
            for stats in listeners:
                family.add_metric(stats.labels(), getattr(stats.counters, name))
            yield family
        latency = HistogramMetricFamily(
            "udptime_response_seconds",
            "Time from the kernel receiving a request to handing over the reply.",
            labels=LABELS,
        )
        for stats in listeners:
            latency.add_metric(
                stats.labels(), stats.latency.cumulative(), stats.latency.total
            )
        yield latency
        for name, (help_text, value) in self._gauges().items():
            yield GaugeMetricFamily(f"udptime_{name}", help_text, value=value)
        if self._roles:
            roles = GaugeMetricFamily(
                "udptime_role",
                "1 for each role this host serves: a format, nts, nts-ke.",
                labels=["role"],
            )
            for role in self._roles:
                roles.add_metric([role], 1.0)
            yield roles
        for name, (help_text, value) in self._counters().items():
            # Exposed as udptime_NAME_total.
            yield CounterMetricFamily(f"udptime_{name}", help_text, value=value)
        yield from self._families()

    def describe(self) -> list[Any]:
        # Collected on demand only: registering must not call collect().
        return []


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT``; a bare port binds 127.0.0.1 so metrics stay private."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"--metrics {text!r}: expected [HOST:]PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics {text!r}: port out of range 0-65535")
    return host, port
