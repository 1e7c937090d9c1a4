"""Summary lines: each listener's counts, then what else asked to be summarised."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from udptime.counters import Counters
from udptime.metrics import ListenerStats
from udptime.summary import SummaryService


class SummaryTests(unittest.TestCase):
    def test_listeners_then_also(self) -> None:
        clock = Clock()
        stats = ListenerStats("ntp", "127.0.0.1", 123, Counters())
        calls: list[float] = []
        summary = SummaryService(10, lambda: [stats], clock, also=[calls.append])
        summary.startService()
        self.addCleanup(summary.stopService)
        with capturedLogs() as events:
            clock.advance(10)
        self.assertEqual(calls, [10])
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["udp_format"], "ntp")
        clock.advance(10)
        self.assertEqual(calls, [10, 10])
