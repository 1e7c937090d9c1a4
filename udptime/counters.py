"""Per-listener counters: plain integers bumped on the hot path, read on demand."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    """What one listener has seen; metrics and summaries read these, nothing locks."""

    #: every datagram that reached the listener
    received: int = 0
    #: datagrams sent back, Kiss-o'-Death replies included
    answered: int = 0
    #: over a source's rate limit (dropped or kissed)
    rate_limited: int = 0
    #: refused by the access lists
    denied: int = 0
    #: no reply owed: malformed or not a request, loop guard
    ignored: int = 0
    #: Kiss-o'-Death replies sent (RATE, DENY)
    kisses: int = 0
    #: a responder raised (a bug, never a property of the datagram)
    errors: int = 0
    #: replies the kernel would not take (full buffer, unreachable)
    send_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


#: Receive-to-send latency buckets, seconds: 10 us to 100 ms.
LATENCY_BUCKETS = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    1e-1,
)


class LatencyHistogram:
    """Bucket counts of receive-to-send time, as plain integers."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: cumulative counts with ``le`` labels, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(
                ("+Inf" if bound == float("inf") else repr(bound), float(running))
            )
        return out
