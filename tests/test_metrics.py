"""Metrics, summaries and JSON logs, end to end and in pieces."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import ILogObserver
from twisted.trial import unittest

from tests.support import Twistd, free_udp_port, poll_until_answered
from udptime.counters import LatencyHistogram
from udptime.formats import encode_ctime
from udptime.metrics import UdptimeCollector, parse_metrics_address


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def counter(samples: dict[Any, float], name: str, fmt: str) -> float:
    return sum(
        value
        for (sample, labels), value in samples.items()
        if sample == f"udptime_{name}_total" and ("format", fmt) in labels
    )


def send(port: int, payloads: list[bytes], source: str = "127.0.0.1") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for payload in payloads:
            sock.sendto(payload, ("127.0.0.1", port))


class ScrapeTests(unittest.TestCase):
    def test_exact_counts(self) -> None:
        udp_ctime, udp_ntp, http = free_udp_port(), free_udp_port(), free_tcp_port()
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"ctime@127.0.0.1:{udp_ctime}",
                "--listen",
                f"ntp@127.0.0.1:{udp_ntp}",
                "--rate-limit",
                "0.001/5",
                "--metrics",
                str(http),
            ],
        )
        # Readiness without touching the UDP counters: the scrape answers.
        deadline = time.monotonic() + 15
        while True:
            try:
                scrape(http)
                break
            except OSError:
                self.assertIsNone(server.process.poll())
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.05)
        # ctime: 8 requests from one source (5 answered, 3 over the limit),
        # 2 that are time-server replies (ignored) from another source.
        send(udp_ctime, [b""] * 8, "127.0.0.11")
        send(udp_ctime, [encode_ctime(time.time())] * 2, "127.0.0.12")
        # ntp: 3 too short to be requests (ignored), 1 real request.
        send(udp_ntp, [b"\x23" * 10] * 3 + [b"\x23" + bytes(47)], "127.0.0.13")
        expected = {
            ("received", "ctime"): 10,
            ("answered", "ctime"): 5,
            ("rate_limited", "ctime"): 3,
            ("ignored", "ctime"): 2,
            ("received", "ntp"): 4,
            ("answered", "ntp"): 1,
            ("ignored", "ntp"): 3,
            ("denied", "ctime"): 0,
            ("kisses", "ntp"): 0,
            ("send_errors", "ctime"): 0,
        }
        deadline = time.monotonic() + 15
        while True:
            samples = scrape(http)
            seen = {key: counter(samples, *key) for key in expected}
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(seen, expected)
        gauges = {name for name, _ in samples}
        self.assertIn("udptime_clock_synchronised", gauges)
        self.assertIn("udptime_kernel_maxerror_seconds", gauges)
        self.assertEqual(samples[("udptime_rate_limit_table_entries", ())], 3)
        self.assertIn("udptime_response_seconds_bucket", gauges)


class JsonLogTests(unittest.TestCase):
    def test_json_lines_with_structured_fields(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            [
                "--logger",
                "udptime.logging.json_stdout",
                "udptime",
                "--listen",
                f"time@127.0.0.1:{port}",
                "--summary-interval",
                "1",
                "-v",
            ],
        )
        poll_until_answered("127.0.0.1", port, process=server.process)
        deadline = time.monotonic() + 15

        def read_events() -> list[dict[str, Any]]:
            return [json.loads(line) for line in server.log_text().splitlines() if line]

        while not any(e.get("summary") and e["received"] for e in read_events()):
            self.assertLess(time.monotonic(), deadline, server.log_text())
            time.sleep(0.05)
        server.terminate()
        events = read_events()
        started = [e for e in events if e["message"].startswith("serving")]
        self.assertEqual(started[0]["level"], "info")
        self.assertEqual(started[0]["namespace"], "udptime.listener.TimeListener")
        self.assertEqual(started[0]["udp_format"], "time")
        self.assertEqual(started[0]["port"], port)
        answered = [e for e in events if e.get("outcome") == "answered"]
        self.assertTrue(answered)
        self.assertEqual(answered[0]["host"], "127.0.0.1")
        summaries = [e for e in events if e.get("summary")]
        summarised = sum(e["received"] for e in summaries)
        self.assertTrue(1 <= summarised <= len(answered), (summarised, len(answered)))
        self.assertEqual(summaries[0]["udp_format"], "time")


class PieceTests(unittest.TestCase):
    def test_histogram_buckets_are_cumulative(self) -> None:
        histogram = LatencyHistogram((0.001, 0.01))
        for seconds in (0.0005, 0.002, 0.002, 5.0):
            histogram.observe(seconds)
        self.assertEqual(
            histogram.cumulative(), [("0.001", 1.0), ("0.01", 3.0), ("+Inf", 4.0)]
        )
        self.assertAlmostEqual(histogram.total, 5.0045)

    def test_roles_gauge(self) -> None:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(UdptimeCollector(list, dict, dict, ["daytime", "nts-ke"]))
        families = {
            f.name: f
            for f in text_string_to_metric_families(generate_latest(registry).decode())
        }
        samples = [(s.labels, s.value) for s in families["udptime_role"].samples]
        self.assertEqual(
            samples, [({"role": "daytime"}, 1.0), ({"role": "nts-ke"}, 1.0)]
        )
        empty = CollectorRegistry()
        empty.register(UdptimeCollector(list, dict))
        self.assertNotIn(b"udptime_role", generate_latest(empty))

    def test_metrics_address(self) -> None:
        self.assertEqual(parse_metrics_address("9100"), ("127.0.0.1", 9100))
        self.assertEqual(parse_metrics_address("0.0.0.0:9100"), ("0.0.0.0", 9100))
        self.assertEqual(parse_metrics_address("[::1]:9100"), ("::1", 9100))
        for bad in ("x", "1:99999", ""):
            with self.assertRaises(ValueError):
                parse_metrics_address(bad)

    def test_json_stdout_writes_one_object_a_line(self) -> None:
        import io
        import sys

        from udptime.logging import json_stdout

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = json_stdout()
        observer({"log_format": "x {n}", "n": 3, "log_time": 1.0})
        observer({"log_format": "y", "log_time": 2.0, "thing": object()})
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            [r["time"] for r in records],
            ["1970-01-01T00:00:01.000000+00:00", "1970-01-01T00:00:02.000000+00:00"],
        )
        self.assertEqual(records[0]["message"], "x 3")
        self.assertEqual(records[0]["n"], 3)
        self.assertTrue(records[1]["thing"].startswith("<object"))


class SummaryTests(unittest.TestCase):
    def test_counts_since_the_last_line_first_after_one_interval(self) -> None:
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        from udptime.counters import Counters
        from udptime.metrics import ListenerStats
        from udptime.summary import SummaryService

        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        clock = Clock()
        counters = Counters()
        summary = SummaryService(
            60, lambda: [ListenerStats("time", "0.0.0.0", 37, counters)], clock
        )
        summary.startService()
        self.addCleanup(summary.stopService)

        def lines() -> list[dict[str, Any]]:
            return [e for e in events if e.get("summary")]

        self.assertEqual(lines(), [])
        counters.received += 7
        counters.answered += 5
        clock.advance(60)
        counters.received += 2
        clock.advance(60)
        self.assertEqual([e["received"] for e in lines()], [7, 2])
        self.assertEqual([e["answered"] for e in lines()], [5, 0])
        self.assertEqual(lines()[0]["port"], 37)
