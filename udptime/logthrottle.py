"""Keep errors that can repeat per datagram from filling the disk."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class LogThrottle:
    """Allow at most *limit* log lines per *interval* seconds.

    ``allow()`` answers whether to log now and, when it says yes, how many
    lines were suppressed since the last one let through, so the log keeps an
    honest count of what it left out.
    """

    def __init__(self, clock: IReactorTime, limit: int = 5, interval: float = 60.0):
        self._clock = clock
        self._limit = limit
        self._interval = interval
        self._window_start = -float("inf")
        self._in_window = 0
        self._suppressed = 0

    def allow(self) -> tuple[bool, int]:
        now = self._clock.seconds()
        if now - self._window_start >= self._interval:
            self._window_start = now
            self._in_window = 0
        if self._in_window < self._limit:
            self._in_window += 1
            suppressed, self._suppressed = self._suppressed, 0
            return True, suppressed
        self._suppressed += 1
        return False, 0
