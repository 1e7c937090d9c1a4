"""A periodic summary line per listener instead of a line per datagram."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from udptime.metrics import ListenerStats


class SummaryService(service.Service):
    """Every *interval* seconds, log each listener's counts since the last line.

    Operators read these to see that a server is alive and what it faces
    (floods show as rate_limited, scans as ignored) without a log line per
    datagram; the fields are structured for JSON logs.
    """

    log = Logger()

    def __init__(
        self,
        interval: float,
        listeners: Callable[[], list[ListenerStats]],
        clock: Any,
        *,
        also: Sequence[Callable[[float], None]] = (),
    ) -> None:
        self.step = interval
        self._listeners = listeners
        #: called with the interval after the listeners' lines (NTS-KE's line)
        self._also = list(also)
        self._last: dict[tuple[str, str, int, str], dict[str, int]] = {}
        self._loop = LoopingCall(self.summarise)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        # The first line comes after one interval: zeros at start-up say nothing.
        self._loop.start(self.step, now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()

    def summarise(self) -> None:
        for stats in self._listeners():
            key = (stats.format, stats.address, stats.port, stats.worker)
            now = stats.counters.snapshot()
            before = self._last.get(key, dict.fromkeys(now, 0))
            delta = {name: now[name] - before[name] for name in now}
            self._last[key] = now
            self.log.info(
                "{udp_format} on {address} port {port} (worker {worker}): "
                "{received} received, "
                "{answered} answered, {rate_limited} rate-limited, {denied} denied, "
                "{ignored} ignored, {send_errors} send errors in the last {interval} s",
                udp_format=stats.format,
                address=stats.address,
                port=stats.port,
                worker=stats.worker,
                interval=self.step,
                summary=True,
                **delta,
            )
        for call in self._also:
            call(self.step)
