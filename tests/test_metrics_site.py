"""The metrics HTTP endpoint: paths, /healthz, the connection cap, deadlines,
request bodies, and the one-line start-up errors."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.support import REPO, twistd_command
from udptime.clockstate import STA_INS, STA_UNSYNC, TIME_OK, KernelClock
from udptime.counters import Counters
from udptime.metrics import ListenerStats, UdptimeCollector
from udptime.metrics_site import (
    IDLE_TIMEOUT,
    REQUEST_TIMEOUT,
    MetricsSite,
    clock_text,
    metrics_site,
)

SYNCED = KernelClock(TIME_OK, 0, 2500, 100)


def collector(counters: Counters | None = None) -> UdptimeCollector:
    stats = ListenerStats("ntp", "127.0.0.1", 123, counters or Counters())
    return UdptimeCollector(lambda: [stats], dict)


def site(
    clock: Any,
    health: Callable[[], tuple[bool, str]] = lambda: (
        True,
        "ntp@127.0.0.1:123: serving",
    ),
    **kwargs: Any,
) -> MetricsSite:
    return metrics_site(collector(), clock, health, clock=lambda: SYNCED, **kwargs)


def connect(factory: MetricsSite) -> tuple[Any, StringTransport]:
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def statuses(raw: bytes) -> list[int]:
    return [
        int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3}) ", raw, re.MULTILINE)
    ]


def request(path: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: test", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class DeadlineTests(unittest.TestCase):
    """Deadlines on a ``task.Clock``: no real time passes."""

    def test_a_head_sent_a_line_at_a_time_is_cut_off(self) -> None:
        clock = Clock()
        protocol, transport = connect(site(clock))
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\n")
        for n in range(int(REQUEST_TIMEOUT // 3)):
            clock.advance(3)
            self.assertFalse(transport.disconnecting, n)
            protocol.dataReceived(b"X-Drip-%d: 1\r\n" % n)
        clock.advance(REQUEST_TIMEOUT)
        self.assertTrue(transport.disconnected)  # aborted, not a polite close
        self.assertEqual(transport.value(), b"")

    def test_a_silent_half_head_meets_the_deadline_before_the_idle_timeout(
        self,
    ) -> None:
        clock = Clock()
        protocol, transport = connect(site(clock))
        protocol.dataReceived(b"GET /metr")
        clock.advance(REQUEST_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_the_deadline_is_per_request_and_idle_closes_keep_alive(self) -> None:
        clock = Clock()
        protocol, transport = connect(site(clock))
        protocol.dataReceived(request(b"/metrics"))
        self.assertEqual(statuses(transport.value()), [200])
        # Idle, but under the idle timeout: still open, and no request deadline.
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        # A second request, slow but within its own deadline.
        protocol.dataReceived(b"GET /healthz HTTP/1.1\r\n")
        clock.advance(REQUEST_TIMEOUT - 1)
        protocol.dataReceived(b"Host: test\r\n\r\n")
        self.assertEqual(statuses(transport.value()), [200, 200])
        self.assertFalse(transport.disconnecting)
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)  # idle: closed politely
        self.assertFalse(transport.disconnected)

    def test_pipelined_requests_are_answered_without_a_stray_deadline(self) -> None:
        clock = Clock()
        protocol, transport = connect(site(clock))
        protocol.dataReceived(request(b"/metrics") + request(b"/nope"))
        self.assertEqual(statuses(transport.value()), [200, 404])
        clock.advance(REQUEST_TIMEOUT)
        self.assertFalse(transport.disconnecting)

    def test_lost_connections_leave_no_timers(self) -> None:
        clock = Clock()
        factory = site(clock)
        protocol, _ = connect(factory)
        protocol.dataReceived(b"GET /metrics HTTP/1.1\r\n")
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(factory.active, 0)


class AnyBytesTests(unittest.TestCase):
    @given(
        st.lists(
            st.one_of(
                st.binary(max_size=200),
                st.sampled_from(
                    [
                        request(b"/metrics"),
                        request(b"/healthz"),
                        request(b"/x", b"Content-Length: 3", method=b"PUT"),
                        b"GET /metrics HTTP/1.1\r\n",
                        b"Transfer-Encoding: chunked\r\n\r\n",
                        b"\r\n",
                    ]
                ),
            ),
            max_size=8,
        ),
        st.lists(st.floats(0, 2 * IDLE_TIMEOUT), min_size=8, max_size=8),
    )
    def test_any_bytes_at_any_pace(
        self, chunks: list[bytes], gaps: list[float]
    ) -> None:
        """No exception, nothing open for ever, no timer or slot left behind."""
        clock = Clock()
        factory = site(clock)
        protocol, transport = connect(factory)

        def closed() -> bool:
            # As a reactor would: connectionLost once the transport is closing.
            if transport.disconnecting:
                protocol.connectionLost(Failure(ConnectionError("closed")))
            return bool(transport.disconnecting)

        def wait(seconds: float) -> bool:
            for _ in range(int(seconds * 2) + 1):
                clock.advance(0.5)
                if closed():
                    return True
            return False

        for chunk, gap in zip(chunks, gaps, strict=False):
            protocol.dataReceived(chunk)
            if closed() or wait(gap):
                break
        else:
            self.assertTrue(wait(REQUEST_TIMEOUT + IDLE_TIMEOUT + 1))
        self.assertEqual(factory.active, 0)
        self.assertEqual(clock.getDelayedCalls(), [])


class RequestTests(unittest.TestCase):
    def answer(self, raw: bytes, **kwargs: Any) -> tuple[bytes, StringTransport]:
        protocol, transport = connect(site(Clock(), **kwargs))
        protocol.dataReceived(raw)
        return transport.value(), transport

    def test_bodies_are_refused_before_being_stored(self) -> None:
        for headers in (
            [b"Content-Length: 5"],
            [b"Content-Length: 1000000000"],
            [b"Transfer-Encoding: chunked"],
        ):
            raw = request(b"/metrics", *headers, method=b"POST") + b"hello"
            reply, transport = self.answer(raw)
            self.assertEqual(statuses(reply), [413], headers)
            self.assertTrue(transport.disconnecting)

    def test_methods(self) -> None:
        reply, _ = self.answer(request(b"/metrics", method=b"HEAD"))
        self.assertEqual(statuses(reply), [200])
        self.assertNotIn(b"udptime_received_total", reply)
        reply, _ = self.answer(request(b"/metrics", method=b"POST"))
        self.assertEqual(statuses(reply), [405])

    def test_healthz_serving(self) -> None:
        reply, _ = self.answer(request(b"/healthz"))
        self.assertEqual(statuses(reply), [200])
        body = reply.split(b"\r\n\r\n", 1)[1].decode()
        self.assertEqual(
            body,
            "status: serving\n"
            "ntp@127.0.0.1:123: serving\n"
            "clock_synchronised: yes\n"
            "leap: none\n"
            "maxerror_seconds: 0.002500\n",
        )

    def test_healthz_not_serving(self) -> None:
        reply, _ = self.answer(
            request(b"/healthz"), health=lambda: (False, "ntp@[::]:123: stopped")
        )
        self.assertEqual(statuses(reply), [503])
        self.assertIn(b"status: not serving\nntp@[::]:123: stopped\n", reply)

    def test_clock_text(self) -> None:
        self.assertIn("leap: insert\n", clock_text(KernelClock(TIME_OK, STA_INS, 5, 0)))
        unsynchronised = clock_text(KernelClock(TIME_OK, STA_UNSYNC, 16_000_000, 0))
        self.assertIn("clock_synchronised: no\nleap: alarm\n", unsynchronised)
        self.assertIn("maxerror_seconds: 16.000000", unsynchronised)
        self.assertIn("unknown", clock_text(None))

    def test_metrics_values(self) -> None:
        counters = Counters(received=7, answered=5)
        factory = metrics_site(
            collector(counters), Clock(), lambda: (True, ""), clock=lambda: None
        )
        protocol, transport = connect(factory)
        protocol.dataReceived(request(b"/metrics"))
        reply = transport.value()
        self.assertIn(b"content-type: text/plain; version=0.0.4", reply.lower())
        self.assertIn(b'udptime_received_total{address="127.0.0.1"', reply)
        self.assertIn(b'port="123",worker="0"} 7.0', reply)


class CapTests(unittest.TestCase):
    def test_over_the_cap_nothing_is_built_until_one_closes(self) -> None:
        factory = site(Clock(), max_connections=2)
        first, _ = connect(factory)
        connect(factory)
        address = IPv4Address("TCP", "127.0.0.1", 40001)
        self.assertIsNone(factory.buildProtocol(address))
        self.assertEqual((factory.active, factory.refused), (2, 1))
        first.connectionLost(Failure(ConnectionError("gone")))
        self.assertIsNotNone(factory.buildProtocol(address))


class _Client(Protocol):
    """Sends *data* on connecting; collects everything until the connection ends."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.received = b""
        self.first: Deferred[bytes] = Deferred()
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.data:
            self.transport.write(self.data)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.first.called:
            self.first.callback(self.received)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(self.received)


class SocketTests(unittest.TestCase):
    """Real sockets on loopback, kernel-chosen ports, the real reactor."""

    timeout = 60

    def serve(self, **kwargs: Any) -> tuple[MetricsSite, int]:
        factory = metrics_site(
            collector(Counters(received=3)), reactor, lambda: (True, "ok"), **kwargs
        )
        listening: Any = reactor
        port = listening.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.until, lambda: factory.active == 0)
        return factory, int(port.getHost().port)

    async def until(self, condition: Callable[[], bool], within: float = 15.0) -> None:
        deadline = time.monotonic() + within
        while not condition():
            self.assertLess(time.monotonic(), deadline, "condition never held")
            await deferLater(reactor, 0.01)

    async def open(self, port: int, data: bytes = b"") -> _Client:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await connectProtocol(endpoint, _Client(data))
        self.addCleanup(self.close, client)
        return client

    async def close(self, client: _Client) -> None:
        if not client.lost.called:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.lost

    async def fetch(self, port: int, raw: bytes) -> bytes:
        client = await self.open(port, raw)
        return await client.lost

    async def test_only_the_two_paths(self) -> None:
        _, port = self.serve()
        answers = {}
        for path in (
            b"/metrics",
            b"/metrics?name=x",
            b"/healthz",
            b"/metrics/anything/else",
            b"/metrics/../metrics",
            b"/metrics/",
            b"//metrics",
            b"/%6detrics",
            b"/metricsx",
            b"/healthz/x",
            b"/",
            b"/favicon.ico",
        ):
            reply = await self.fetch(port, request(path, b"Connection: close"))
            answers[path] = statuses(reply)[0]
            if answers[path] == 200 and path.startswith(b"/metrics"):
                self.assertIn(b"udptime_received_total", reply)
        self.assertEqual(
            {path for path, code in answers.items() if code == 200},
            {b"/metrics", b"/metrics?name=x", b"/healthz"},
        )
        self.assertEqual(set(answers.values()), {200, 404})

    async def test_connections_over_the_cap_are_closed_at_once(self) -> None:
        factory, port = self.serve(max_connections=3)
        held = []
        for _ in range(3):
            client = await self.open(port, request(b"/healthz"))
            await client.first  # answered: accepted and kept alive
            held.append(client)
        refused = await self.open(port, request(b"/healthz"))
        self.assertEqual(await refused.lost, b"")
        self.assertEqual(factory.refused, 1)
        await self.close(held[0])
        await self.until(lambda: factory.active == 2)
        again = await self.open(port, request(b"/healthz"))
        self.assertEqual(statuses(await again.first), [200])

    async def test_a_dawdling_head_is_cut_off(self) -> None:
        # The idle timeout is far beyond the test's: only the deadline can end it.
        _, port = self.serve(request_timeout=0.3, idle_timeout=3600)
        client = await self.open(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(await client.lost, b"")


def _run_twistd(args: list[str], prefix: list[str] | None = None) -> tuple[int, str]:
    command = [*(prefix or []), *twistd_command(), "-n", "--pidfile=", "udptime", *args]
    done = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(REPO),
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout.decode(errors="replace")


class StartupErrorTests(unittest.TestCase):
    """A real ``twistd``: one line and exit 1, no traceback, for each failure."""

    def assert_one_line(
        self, metrics: str, where: str, why: str, prefix: list[str] | None = None
    ) -> None:
        code, output = _run_twistd(
            ["--listen", "ctime@127.0.0.1:0", "--metrics", metrics], prefix
        )
        self.assertEqual(code, 1, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "udptime:" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertRegex(
            lines[0], f"udptime: cannot listen on TCP {where} \\(metrics\\): {why}$"
        )

    def test_busy_port(self) -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            self.assert_one_line(
                f"127.0.0.1:{port}",
                f"127\\.0\\.0\\.1:{port}",
                "Address already in use",
            )

    def test_unresolvable_host(self) -> None:
        self.assert_one_line(
            "no-such-host.invalid:0", r"no-such-host\.invalid:0", r"\S.*"
        )

    def test_privileged_port_as_non_root(self) -> None:
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            raise unittest.SkipTest("needs root and setpriv to become nobody")
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            unprivileged_start = int(f.read())
        port = _free_privileged_tcp_port(min(unprivileged_start, 1024))
        if port is None:
            raise unittest.SkipTest("no free privileged port on 127.0.0.1")
        self.assert_one_line(
            f"127.0.0.1:{port}",
            f"127\\.0\\.0\\.1:{port}",
            "Permission denied",
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"],
        )


def _free_privileged_tcp_port(below: int) -> int | None:
    """A port under *below* that root can bind on 127.0.0.1 now (not a fixed one)."""
    for port in range(below - 1, max(below - 200, 1), -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


class BuiltServiceTests(unittest.TestCase):
    """``/healthz`` as ``udptime.tap`` wires it: listeners decide the status."""

    timeout = 60

    async def test_healthz_follows_the_listeners(self) -> None:
        top, port = await serve_built(self, "--listen", "time@127.0.0.1:0")
        reply = await http_get(port, b"/healthz")
        listener = top.listeners[0]
        name = f"time@127.0.0.1:{listener.bound_port}"
        self.assertEqual(statuses(reply), [200])
        self.assertIn(f"status: serving\n{name}: serving\n".encode(), reply)
        self.assertIn(b"clock_synchronised: ", reply)
        await listener.stopService()
        reply = await http_get(port, b"/healthz")
        self.assertEqual(statuses(reply), [503])
        self.assertIn(f"status: not serving\n{name}: stopped\n".encode(), reply)


async def serve_built(test: unittest.TestCase, *args: str) -> tuple[Any, int]:
    """The whole server from ``udptime.tap``, in this process, metrics on port 0."""
    from udptime.tap import Options, build_service

    options = Options()
    options.parseOptions([*args, "--metrics", "127.0.0.1:0", "--summary-interval", "0"])
    top = build_service(options.config, reactor)
    top.privilegedStartService()
    top.startService()
    test.addCleanup(top.stopService)
    return top, top.getServiceNamed("metrics").bound_port


async def http_get(port: int, path: bytes) -> bytes:
    """One request on a fresh connection; the whole reply once the server closes."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = await connectProtocol(
        endpoint, _Client(request(path, b"Connection: close"))
    )
    return await client.lost
