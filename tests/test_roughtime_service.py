"""Roughtime in the server: the key service on a fake clock (renewal,
warnings, expiry, SIGHUP reloads), the options and their errors, the wiring
(a roughtime listener answering through the registry) and its metrics."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from udptime.clockstate import STA_UNSYNC, TIME_ERROR, TIME_OK, KernelClock
from udptime.config import Config
from udptime.listener import TimeListener
from udptime.metrics import UdptimeCollector
from udptime.registry import Context, get_format
from udptime.roughtime import keys, verify, wire
from udptime.roughtime import options as rt_options
from udptime.roughtime.responder import (
    DelegationHolder,
    RoughtimeCounters,
    RoughtimeResponder,
)
from udptime.roughtime.service import (
    DAY,
    HOUR,
    SELF_BACKDATE,
    SELF_LIFETIME,
    WARN_AHEAD,
    KeyService,
    SummaryLines,
)
from udptime.signals import SignalService
from udptime.tap import Options, build_service

NOW = 1_800_000_000


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


class LogCatcher:
    """Events logged while a test runs."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def texts(self, level: LogLevel | None = None) -> list[str]:
        from twisted.logger import formatEvent

        return [
            formatEvent(e)
            for e in self.events
            if level is None or e.get("log_level") == level
        ]


class TempDir:
    def __init__(self, test: unittest.TestCase) -> None:
        self.path = Path(tempfile.mkdtemp())
        test.addCleanup(shutil.rmtree, self.path)

    def delegation(
        self, root: Any, mint: int, maxt: int, name: str = "host.json"
    ) -> tuple[str, keys.Delegation]:
        d = keys.delegate(root, mint, maxt)
        path = self.path / name
        keys.write_delegation(path, d)
        return str(path), d


class SelfDelegationTests(unittest.TestCase):
    """Given the root key, the server makes and renews its own delegations."""

    def test_renews_at_half_life(self) -> None:
        root = keys.generate_key()
        clock = clock_at()
        service = KeyService.from_root(root, clock)
        first = service.delegation
        self.assertEqual(first.mint, NOW - SELF_BACKDATE)
        self.assertEqual(first.maxt, NOW + SELF_LIFETIME)
        self.assertEqual(first.root_public_key, keys.public_bytes(root))
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(SELF_LIFETIME // 2 - 120)
        self.assertIs(service.delegation, first)
        clock.advance(120)
        second = service.delegation
        self.assertIsNot(second, first)
        self.assertNotEqual(
            keys.public_bytes(second.online_key), keys.public_bytes(first.online_key)
        )
        self.assertGreater(second.maxt, first.maxt)
        self.assertEqual(service.renewals, 2)
        # never a moment without a valid delegation
        self.assertTrue(second.valid_at(int(clock.seconds())))

    def test_responder_signs_with_the_renewed_key(self) -> None:
        root = keys.generate_key()
        clock = clock_at()
        service = KeyService.from_root(root, clock)
        responder = RoughtimeResponder(
            service.holder,
            lambda: (True, 1000),
            now_ns=lambda: int(clock.seconds() * 1e9),
        )
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(SELF_LIFETIME)
        request = verify.make_request(public_key=keys.public_bytes(root))
        reply = responder.answer(request, int(clock.seconds() * 1e9))
        assert reply is not None
        result = verify.verify_response(request, reply, keys.public_bytes(root))
        self.assertEqual(
            result.response.public_key, keys.public_bytes(service.delegation.online_key)
        )
        self.assertEqual(result.midpoint, int(clock.seconds()))


class DelegationFileTests(unittest.TestCase):
    """Given a delegation, the server serves under it, warns ahead of MAXT,
    says when it expired, and reloads it on SIGHUP."""

    def setUp(self) -> None:
        self.root = keys.generate_key()
        self.dir = TempDir(self)
        self.log = LogCatcher(self)

    def test_warns_ahead_then_expires(self) -> None:
        path, d = self.dir.delegation(self.root, NOW - DAY, NOW + 10 * DAY)
        clock = clock_at()
        service = KeyService.from_file(path, clock)
        self.assertEqual(service.delegation.cert, d.cert)
        responder = RoughtimeResponder(
            service.holder,
            lambda: (True, 1000),
            now_ns=lambda: int(clock.seconds() * 1e9),
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(self.log.texts(LogLevel.warn), [])
        clock.advance(10 * DAY - WARN_AHEAD - 60)
        self.assertEqual(self.log.texts(LogLevel.warn), [])
        clock.advance(120)
        warnings = self.log.texts(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("expires at", warnings[0])
        self.assertIn(path, warnings[0])
        # at most hourly
        for _ in range(59):
            clock.advance(60)
        self.assertEqual(len(self.log.texts(LogLevel.warn)), 1)
        clock.advance(60)
        self.assertEqual(len(self.log.texts(LogLevel.warn)), 2)
        # answering until MAXT, nobody after it
        request = verify.make_request()
        clock.advance(d.maxt - clock.seconds() - 1)
        self.assertIsNotNone(responder.answer(request, int(clock.seconds() * 1e9)))
        clock.advance(HOUR)
        self.assertIsNone(responder.answer(request, int(clock.seconds() * 1e9)))
        self.assertEqual(responder.counters.expired, 1)
        errors = self.log.texts(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("expired", errors[0])

    def test_reload(self) -> None:
        path, first = self.dir.delegation(self.root, NOW - DAY, NOW + DAY)
        clock = clock_at()
        service = KeyService.from_file(path, clock)
        signals = SignalService(clock)
        signals.reloaders["Roughtime delegation"] = service.reload

        self.assertIn("unchanged", service.reload())

        # another root's delegation: refused, the old one stays
        self.dir.delegation(keys.generate_key(), NOW - DAY, NOW + DAY, "host.json")
        signals.reload()
        self.assertEqual(service.delegation.cert, first.cert)
        self.assertIn("another root key", self.log.texts(LogLevel.error)[-1])

        # a file that cannot be trusted: refused
        Path(path).write_text("{}")
        signals.reload()
        self.assertEqual(service.delegation.cert, first.cert)
        self.assertEqual(len(self.log.texts(LogLevel.error)), 2)

        # an expired one: refused
        self.dir.delegation(self.root, NOW - 2 * DAY, NOW - DAY, "host.json")
        with self.assertRaises(ValueError):
            service.reload()

        # a new delegation of the same root: taken
        _, second = self.dir.delegation(self.root, NOW - HOUR, NOW + 30 * DAY)
        outcome = service.reload()
        self.assertIn("valid", outcome)
        self.assertEqual(service.delegation.cert, second.cert)
        self.assertEqual(service.reloads, 1)

    def test_root_mode_has_nothing_to_reload(self) -> None:
        service = KeyService.from_root(keys.generate_key(), clock_at())
        self.assertIn("nothing to reload", service.reload())

    def test_holder_swap_seen_by_the_next_batch(self) -> None:
        a = keys.delegate(self.root, NOW - DAY, NOW + DAY)
        b = keys.delegate(self.root, NOW - DAY, NOW + DAY)
        holder = DelegationHolder(a)
        responder = RoughtimeResponder(
            holder, lambda: (True, 1000), now_ns=lambda: NOW * 1_000_000_000
        )
        request = verify.make_request()
        first = responder.answer(request, NOW * 1_000_000_000)
        holder.delegation = b
        second = responder.answer(request, NOW * 1_000_000_000)
        assert first is not None and second is not None
        self.assertEqual(
            wire.parse_response(first).public_key, keys.public_bytes(a.online_key)
        )
        self.assertEqual(
            wire.parse_response(second).public_key, keys.public_bytes(b.online_key)
        )


class SummaryTests(unittest.TestCase):
    def test_differences_and_mean_batch(self) -> None:
        log = LogCatcher(self)
        counters = RoughtimeCounters()
        summary = SummaryLines(lambda: [("127.0.0.1 port 2002", counters)])
        counters.answered, counters.signatures = 40, 4
        counters.batch_count, counters.batch_leaves = 4, 40
        counters.too_small = 3
        summary(10)
        counters.answered += 6
        counters.signatures += 1
        counters.batch_count += 1
        counters.batch_leaves += 6
        summary(10)
        lines = [t for t in log.texts() if t.startswith("roughtime on")]
        self.assertEqual(len(lines), 2)
        self.assertIn("40 answered with 4 signatures (mean batch 10.0)", lines[0])
        self.assertIn("3 too small", lines[0])
        self.assertIn("6 answered with 1 signatures (mean batch 6.0)", lines[1])
        self.assertIn("0 too small", lines[1])


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = TempDir(self)
        self.root = keys.generate_key()
        self.key = str(self.dir.path / "root.pem")
        keys.write_root_key(Path(self.key), self.root)

    def assert_usage(self, start: str, *argv: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(*argv)
        message = str(caught.exception)
        self.assertTrue(message.startswith(start), message)
        self.assertNotIn("\n", message)

    def test_config(self) -> None:
        config = parse(
            "--listen", "roughtime@127.0.0.1:2002", "--roughtime-key", self.key
        ).config
        assert config.roughtime is not None
        self.assertEqual(config.roughtime.key_file, self.key)
        self.assertIsNone(config.roughtime.local_radius)
        self.assertEqual(Config.from_json(config.to_json()), config)
        local = parse(
            "--listen",
            "roughtime@2002",
            "--roughtime-key",
            self.key,
            "--local-stratum",
            "10",
        ).config.roughtime
        assert local is not None
        self.assertEqual(local.local_radius, rt_options.DEFAULT_LOCAL_RADIUS)
        radius = parse(
            "--listen",
            "roughtime@2002",
            "--roughtime-key",
            self.key,
            "--local-stratum",
            "10",
            "--roughtime-radius",
            "2",
        ).config.roughtime
        assert radius is not None
        self.assertEqual(radius.local_radius, 2)
        self.assertIsNone(parse("--listen", "ntp@0").config.roughtime)

    def test_errors_name_their_option(self) -> None:
        path, _ = self.dir.delegation(self.root, 0, int(time.time()) - 60)
        listen = ("--listen", "roughtime@127.0.0.1:0")
        self.assert_usage("--listen roughtime@...: needs --roughtime-key", *listen)
        self.assert_usage(
            "--roughtime-key, --roughtime-delegation:",
            *listen,
            "--roughtime-key",
            self.key,
            "--roughtime-delegation",
            path,
        )
        self.assert_usage(
            "--roughtime-key: only used with a roughtime listener",
            "--roughtime-key",
            self.key,
        )
        self.assert_usage(
            "--roughtime-radius: only used with --local-stratum",
            *listen,
            "--roughtime-key",
            self.key,
            "--roughtime-radius",
            "5",
        )
        self.assert_usage(
            "--roughtime-key: cannot read", *listen, "--roughtime-key", "/nonexistent"
        )
        Path(self.key).chmod(0o644)
        self.assert_usage("--roughtime-key:", *listen, "--roughtime-key", self.key)
        self.assert_usage(
            "--roughtime-delegation:", *listen, "--roughtime-delegation", self.key
        )
        self.assert_usage(
            "--roughtime-delegation:", *listen, "--roughtime-delegation", path
        )

    def test_kernel_clock_state(self) -> None:
        synced = KernelClock(TIME_OK, 0, 12_345, 100)
        self.assertEqual(rt_options.kernel_clock_state(lambda: synced), (True, 12_345))
        unsynced = KernelClock(TIME_ERROR, STA_UNSYNC, 16_000_000, 16_000_000)
        self.assertEqual(
            rt_options.kernel_clock_state(lambda: unsynced), (False, 16_000_000)
        )
        self.assertIsNone(rt_options.kernel_clock_state(lambda: None))

    def test_registry_needs_keys(self) -> None:
        context = Context(wall_clock_ns=time.time_ns, clock_state=lambda: None)  # type: ignore[arg-type,return-value]
        with self.assertRaises(ValueError):
            get_format("roughtime").make_responder(context)


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.replies: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.replies.called:
            self.replies.callback(datagram)


class WiredTests(unittest.TestCase):
    """build_service with a roughtime listener, on the real reactor."""

    def setUp(self) -> None:
        self.dir = TempDir(self)
        self.root = keys.generate_key()
        self.public = keys.public_bytes(self.root)

    def serve(self, *argv: str) -> tuple[Any, int]:
        options = parse("--listen", "roughtime@127.0.0.1:0", *argv)
        top = build_service(options.config, reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        [port] = [s.bound_port for s in top if isinstance(s, TimeListener)]
        return top, port

    @defer.inlineCallbacks
    def ask(self, port: int, request: bytes) -> Any:
        collector = Collector()
        client = cast(Any, reactor).listenUDP(0, collector, interface="127.0.0.1")
        self.addCleanup(client.stopListening)
        client.write(request, ("127.0.0.1", port))
        reply = yield collector.replies
        return reply

    @defer.inlineCallbacks
    def test_delegation_served_reloaded_and_exported(self) -> Any:
        now = int(time.time())
        path, d = self.dir.delegation(self.root, now - DAY, now + DAY)
        top, port = self.serve(
            "--roughtime-delegation",
            path,
            "--local-stratum",
            "10",
            "--metrics",
            "127.0.0.1:0",
        )
        self.assertIn("Roughtime delegation", top.signals.reloaders)
        request = verify.make_request(public_key=self.public)
        reply = yield self.ask(port, request)
        result = verify.verify_response(request, reply, self.public)
        self.assertEqual(result.response.public_key, keys.public_bytes(d.online_key))
        self.assertLessEqual(len(reply), len(request))

        # SIGHUP's reloader takes a new delegation; the next reply uses it
        _, new = self.dir.delegation(self.root, now - HOUR, now + 2 * DAY)
        top.signals.reload()
        request = verify.make_request(public_key=self.public)
        reply = yield self.ask(port, request)
        result = verify.verify_response(request, reply, self.public)
        self.assertEqual(result.response.public_key, keys.public_bytes(new.online_key))

        collector = UdptimeCollector(
            top.stats,
            dict,
            dict,
            families=rt_options.metric_families(
                top.listeners, [top.getServiceNamed("roughtime-keys")]
            ),
        )
        metrics = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect()
            for s in family.samples
        }

        def value(name: str, **labels: str) -> float:
            return next(
                v
                for (n, ls), v in metrics.items()
                if n == name and set(labels.items()) <= set(ls)
            )

        self.assertEqual(value("udptime_roughtime_signatures_total"), 2)
        self.assertEqual(value("udptime_roughtime_batch_size_count"), 2)
        self.assertEqual(value("udptime_roughtime_batch_size_sum"), 2)
        self.assertEqual(value("udptime_roughtime_batch_size_bucket", le="1"), 2)
        self.assertEqual(value("udptime_roughtime_batch_size_bucket", le="+Inf"), 2)
        self.assertEqual(
            value("udptime_roughtime_delegation_expiry_timestamp_seconds"), new.maxt
        )
        self.assertEqual(value("udptime_answered_total", format="roughtime"), 2)

    @defer.inlineCallbacks
    def test_small_requests_ignored_and_counted(self) -> Any:
        key = self.dir.path / "root.pem"
        keys.write_root_key(key, self.root)
        top, port = self.serve("--roughtime-key", str(key), "--local-stratum", "10")
        small = wire.encode_request(bytes(32), size=900)
        client = cast(Any, reactor).listenUDP(0, Collector(), interface="127.0.0.1")
        self.addCleanup(client.stopListening)
        client.write(small, ("127.0.0.1", port))
        # a full-size request after it: once it is answered, the small one
        # was handled (same socket, in order)
        request = verify.make_request(public_key=self.public)
        reply = yield self.ask(port, request)
        verify.verify_response(request, reply, self.public)
        [(_, responder)] = rt_options.responders(top.listeners)
        counters = responder.counters
        self.assertEqual(counters.too_small, 1)
        self.assertEqual(counters.answered, 1)
        [listener] = top.listeners
        self.assertEqual(listener.stats.counters.ignored, 1)
