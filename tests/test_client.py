"""The query client: retries, timeouts and reply matching, faked and for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any, cast

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.trial import unittest

import udptime
from tests.support import REPO, Twistd, free_udp_port, poll_until_answered
from udptime.client import (
    KissOfDeath,
    NoReply,
    ResolveError,
    Result,
    decode_ctime,
    decode_daytime,
    decode_time,
    describe,
    ntp_request,
    offset_delay,
    query,
    refid_text,
)
from udptime.formats import encode_ctime, encode_daytime, encode_time
from udptime.listener import TimeListener
from udptime.ntp import to_ntp
from udptime.tap import Options, makeService

SERVER = ("192.0.2.1", 123)
#: A present-day instant that floats and NTP fixed point both hold exactly.
T1 = 1_800_000_000.0

Address = tuple[str, int]


class FakePort:
    """A UDP socket that records what is sent and delivers what a test says."""

    def __init__(
        self, fake: FakeReactor, protocol: DatagramProtocol, interface: str, number: int
    ) -> None:
        self.fake = fake
        self.protocol = protocol
        self.interface = interface
        self.number = number
        self.sent: list[tuple[bytes, Address]] = []
        self.open = True
        protocol.makeConnection(cast(Any, self))

    def write(self, datagram: bytes, addr: Address) -> None:
        assert self.open, "write on a closed socket"
        if self.fake.send_error is not None:
            raise self.fake.send_error
        self.sent.append((datagram, addr))
        self.fake.server(self, datagram, addr)

    def stopListening(self) -> None:
        self.open = False
        self.protocol.doStop()

    def deliver(self, datagram: bytes, source: Address) -> None:
        if self.open:
            self.protocol.datagramReceived(datagram, source)


Server = Callable[[FakePort, bytes, Address], None]


def silent(port: FakePort, datagram: bytes, addr: Address) -> None:
    pass


class FakeReactor(Clock):
    """A ``Clock`` with ``listenUDP``: each request goes to *server*."""

    def __init__(self, server: Server = silent) -> None:
        super().__init__()
        self.server = server
        self.ports: list[FakePort] = []
        self.send_error: OSError | None = None

    def listenUDP(
        self,
        port: int,
        protocol: DatagramProtocol,
        interface: str = "",
        maxPacketSize: int = 8192,
    ) -> FakePort:
        fake = FakePort(self, protocol, interface, 40000 + len(self.ports))
        self.ports.append(fake)
        return fake

    def sent(self) -> list[tuple[bytes, Address]]:
        return [item for port in self.ports for item in port.sent]


def ntp_reply(
    request: bytes,
    receive: float,
    transmit: float,
    *,
    stratum: int = 2,
    refid: bytes = b"\xc0\x00\x02\x07",
    first: int = 0x24,
    origin: bytes | None = None,
) -> bytes:
    """A server reply to *request* with the given stamps (LI 0, v4, mode 4)."""
    return (
        bytes((first, stratum, 6, 0xEC))
        + (0x0000_0800).to_bytes(4, "big")
        + (0x0001_8000).to_bytes(4, "big")
        + refid
        + to_ntp(receive - 64)
        + (request[40:48] if origin is None else origin)
        + to_ntp(receive)
        + to_ntp(transmit)
    )


def answering(format: str, drop: int = 0, after: float = 0.125) -> Server:
    """A server that ignores the first *drop* requests, then answers in *after* s.

    Its clock is the fake reactor's: it stamps what the fake clock says.
    """
    seen = [0]

    def server(port: FakePort, datagram: bytes, addr: Address) -> None:
        seen[0] += 1
        if seen[0] <= drop:
            return
        now = port.fake.seconds()
        reply = {
            "ctime": lambda: encode_ctime(now),
            "daytime": lambda: encode_daytime(now),
            "time": lambda: encode_time(now),
            "ntp": lambda: ntp_reply(datagram, now, now),
        }[format]()
        port.fake.callLater(after, port.deliver, reply, addr)

    return server


def start(
    fake: FakeReactor,
    format: str,
    timeout: float = 1.0,
    retries: int = 3,
    server: Address = SERVER,
) -> defer.Deferred[Result]:
    return query(fake, server[0], server[1], format, timeout=timeout, retries=retries)


class RetryTests(unittest.TestCase):
    """Timeouts and retries, driven by a fake clock."""

    def test_success_after_drops(self) -> None:
        for format in ("ctime", "daytime", "time", "ntp"):
            fake = FakeReactor(answering(format, drop=2))
            fake.advance(T1)
            d = start(fake, format)
            fake.advance(1.0)
            fake.advance(1.0)
            self.assertNoResult(d)
            fake.advance(0.125)
            result = self.successResultOf(d)
            self.assertEqual(result.tries, 3, format)
            self.assertEqual(len(fake.sent()), 3, format)
            self.assertEqual((result.host, result.port), SERVER)
            self.assertAlmostEqual(result.time, T1 + 2, delta=1)
            self.assertFalse(any(port.open for port in fake.ports), format)
            self.assertEqual(fake.getDelayedCalls(), [], format)

    def test_text_formats_use_a_fresh_socket_per_try(self) -> None:
        fake = FakeReactor(answering("daytime", drop=2))
        d = start(fake, "daytime")
        fake.pump([1.0, 1.0, 0.125])
        self.successResultOf(d)
        self.assertEqual(len(fake.ports), 3)
        self.assertEqual([len(port.sent) for port in fake.ports], [1, 1, 1])
        self.assertEqual({port.interface for port in fake.ports}, {"0.0.0.0"})

    def test_ntp_uses_one_socket_and_fresh_random_origins(self) -> None:
        fake = FakeReactor(answering("ntp", drop=2))
        fake.advance(T1)
        d = start(fake, "ntp")
        fake.pump([1.0, 1.0, 0.125])
        self.successResultOf(d)
        (port,) = fake.ports
        stamps = {datagram[40:48] for datagram, _ in port.sent}
        self.assertEqual(len(stamps), 3)
        # Random bits, not our clock: the clock would say T1, T1 + 1, T1 + 2.
        self.assertFalse(stamps & {to_ntp(T1 + n) for n in range(3)})
        for datagram, addr in port.sent:
            self.assertEqual(len(datagram), 48)
            self.assertEqual(datagram[0], 0x23)  # LI 0, version 4, client mode
            self.assertEqual(addr, SERVER)

    def test_silent_server_fails_after_timeout_times_tries(self) -> None:
        fake = FakeReactor()
        d = start(fake, "ntp", timeout=0.5, retries=4)
        # Clock.advance runs what falls due, not what that schedules: step.
        fake.pump([0.5, 0.5, 0.5, 0.499])
        self.assertNoResult(d)
        self.assertEqual(len(fake.sent()), 4)
        fake.advance(0.001)
        failure = self.failureResultOf(d, NoReply)
        error = failure.value
        assert isinstance(error, NoReply)
        self.assertEqual((error.tries, error.timeout), (4, 0.5))
        self.assertEqual(len(fake.sent()), 4)
        self.assertIn("after 4 tries of 0.5 s", str(error))
        self.assertEqual(fake.getDelayedCalls(), [])
        self.assertFalse(any(port.open for port in fake.ports))

    def test_one_try(self) -> None:
        fake = FakeReactor()
        d = start(fake, "ctime", timeout=2.0, retries=1)
        fake.advance(2.0)
        error = self.failureResultOf(d, NoReply).value
        self.assertEqual(cast(NoReply, error).tries, 1)
        self.assertEqual(len(fake.sent()), 1)

    def test_send_errors_cost_a_try(self) -> None:
        fake = FakeReactor()
        fake.send_error = OSError(101, "Network is unreachable")
        d = start(fake, "time", retries=2)
        fake.pump([1.0, 1.0])
        error = cast(NoReply, self.failureResultOf(d, NoReply).value)
        self.assertIs(error.send_error, fake.send_error)
        self.assertIn("Network is unreachable", str(error))

    def test_cancel_closes_everything(self) -> None:
        fake = FakeReactor()
        d = start(fake, "ntp")
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(fake.getDelayedCalls(), [])
        self.assertFalse(fake.ports[0].open)

    def test_argument_checks(self) -> None:
        fake = FakeReactor()
        for kwargs in (
            {"port": 0},
            {"port": 65536},
            {"timeout": 0.0},
            {"timeout": float("nan")},
            {"retries": 0},
            {"format": "nope"},
        ):
            args: dict[str, Any] = {"port": 123, "format": "ntp"} | kwargs
            with self.assertRaises(ValueError, msg=str(kwargs)):
                query(fake, "192.0.2.1", **args)
        self.assertEqual(fake.ports, [])


class MatchingTests(unittest.TestCase):
    """Only the reply to our request is taken; anything else is ignored."""

    def request(self, format: str) -> tuple[FakeReactor, defer.Deferred[Result]]:
        fake = FakeReactor()
        fake.advance(T1)
        return fake, start(fake, format)

    def test_forged_ntp_origin_ignored(self) -> None:
        fake, d = self.request("ntp")
        ((request, _),) = fake.sent()
        port = fake.ports[0]
        forged_origin = bytes(b ^ 0xFF for b in request[40:48])
        port.deliver(ntp_reply(request, T1, T1 + 1000, origin=forged_origin), SERVER)
        port.deliver(ntp_reply(request, T1, T1 + 1000, origin=to_ntp(T1)), SERVER)
        self.assertNoResult(d)
        fake.advance(0.25)
        port.deliver(ntp_reply(request, T1 + 0.125, T1 + 0.125), SERVER)
        result = self.successResultOf(d)
        self.assertEqual(result.time, T1 + 0.125)
        assert result.ntp is not None
        self.assertEqual(result.ntp.offset, 0.0)
        self.assertEqual(result.ntp.delay, 0.25)

    def test_wrong_source_ignored(self) -> None:
        for format in ("ctime", "ntp"):
            fake, d = self.request(format)
            ((request, _),) = fake.sent()
            port = fake.ports[0]
            reply = (
                encode_ctime(T1) if format == "ctime" else ntp_reply(request, T1, T1)
            )
            port.deliver(reply, ("192.0.2.2", SERVER[1]))
            port.deliver(reply, (SERVER[0], SERVER[1] + 1))
            port.deliver(reply, ("::ffff:192.0.2.1", SERVER[1]))
            self.assertNoResult(d)
            port.deliver(reply, SERVER)
            self.assertEqual(self.successResultOf(d).raw, reply)

    def test_malformed_ignored(self) -> None:
        cases = {
            "ctime": [b"", b"Fri Nov 27 14:30:05", b"\xff" * 24],
            "daytime": [b"2026-11-27T14:30:05\r\n", b"today", b"\x00"],
            "time": [b"", b"\x00\x00\x00", b"\x00" * 5],
            "ntp": [b"", b"\x24" * 47],
        }
        for format, junk in cases.items():
            fake, d = self.request(format)
            for datagram in junk:
                fake.ports[0].deliver(datagram, SERVER)
            fake.pump([1.0, 1.0, 1.0])
            error = cast(NoReply, self.failureResultOf(d, NoReply).value)
            self.assertEqual(sum(error.ignored.values()), len(junk), format)

    def test_ntp_reply_must_be_server_mode_with_a_transmit_stamp(self) -> None:
        fake, d = self.request("ntp")
        ((request, _),) = fake.sent()
        port = fake.ports[0]
        port.deliver(ntp_reply(request, T1, T1, first=0x23), SERVER)  # client mode
        port.deliver(ntp_reply(request, T1, T1, first=0x25), SERVER)  # broadcast
        port.deliver(ntp_reply(request, T1, T1)[:40] + bytes(8), SERVER)
        fake.pump([1.0, 1.0, 1.0])
        error = cast(NoReply, self.failureResultOf(d, NoReply).value)
        self.assertEqual(
            error.ignored,
            {"not NTP server mode": 2, "NTP transmit timestamp zero": 1},
        )
        self.assertIn("2 not NTP server mode", str(error))

    def test_late_ntp_reply_uses_its_own_send_time(self) -> None:
        fake, d = self.request("ntp")
        fake.advance(1.0)  # the second try goes out at T1 + 1
        (first, _), _ = fake.sent()
        fake.advance(0.5)
        fake.ports[0].deliver(ntp_reply(first, T1 + 0.75, T1 + 0.75), SERVER)
        result = self.successResultOf(d)
        assert result.ntp is not None
        self.assertEqual(result.ntp.originate, T1)
        self.assertEqual(result.ntp.delay, 1.5)
        self.assertEqual(result.tries, 2)

    def test_kiss_of_death_ends_the_query(self) -> None:
        fake, d = self.request("ntp")
        ((request, _),) = fake.sent()
        fake.ports[0].deliver(
            ntp_reply(request, T1, T1, stratum=0, refid=b"RATE", first=0xE4), SERVER
        )
        error = self.failureResultOf(d, KissOfDeath).value
        self.assertEqual(cast(KissOfDeath, error).code, "RATE")
        self.assertIn("'RATE'", str(error))
        self.assertEqual(len(fake.sent()), 1)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_ipv6(self) -> None:
        fake = FakeReactor(answering("time"))
        d = start(fake, "time", server=("2001:db8::1", 37))
        fake.ports[0].deliver(encode_time(0), ("2001:db8::2", 37))
        fake.advance(0.125)
        result = self.successResultOf(d)
        self.assertEqual(fake.ports[0].interface, "::")
        self.assertEqual(fake.sent()[0][1], ("2001:db8::1", 37))
        self.assertEqual((result.host, result.port), ("2001:db8::1", 37))

    def test_ipv6_source_in_another_spelling(self) -> None:
        fake = FakeReactor()
        d = start(fake, "time", server=("2001:db8::1", 37))
        fake.ports[0].deliver(encode_time(T1), ("2001:0db8:0:0::0001", 37))
        self.successResultOf(d)


class ArithmeticTests(unittest.TestCase):
    """RFC 5905 offset and delay, and the decoding of the other fields."""

    def test_offset_delay(self) -> None:
        # Server 5.5 s ahead, 62.5 ms each way, 250 ms inside the server.
        t1 = T1
        t2 = t1 + 0.0625 + 5.5
        t3 = t2 + 0.25
        t4 = t1 + 0.0625 * 2 + 0.25
        self.assertEqual(offset_delay(t1, t2, t3, t4), (5.5, 0.125))
        self.assertEqual(offset_delay(10.0, 4.0, 5.0, 13.0), (-7.0, 2.0))

    def test_through_the_exchange(self) -> None:
        fake = FakeReactor()
        fake.advance(T1)
        d = start(fake, "ntp")
        ((request, _),) = fake.sent()
        t2 = T1 + 0.0625 + 5.5
        t3 = t2 + 0.25
        fake.advance(0.375)
        fake.ports[0].deliver(ntp_reply(request, t2, t3), SERVER)
        ntp = self.successResultOf(d).ntp
        assert ntp is not None
        self.assertEqual(
            (ntp.originate, ntp.receive, ntp.transmit, ntp.destination),
            (T1, t2, t3, T1 + 0.375),
        )
        self.assertEqual((ntp.offset, ntp.delay), (5.5, 0.125))
        self.assertEqual((ntp.leap, ntp.version, ntp.mode), (0, 4, 4))
        self.assertEqual((ntp.stratum, ntp.poll, ntp.precision), (2, 6, -20))
        self.assertEqual(ntp.refid, "192.0.2.7")
        self.assertEqual(ntp.root_delay, 0x800 / 65536)
        self.assertEqual(ntp.root_dispersion, 1.5)
        self.assertEqual(ntp.reference_time, t2 - 64)

    def test_refid_text(self) -> None:
        self.assertEqual(refid_text(0, b"RATE"), "RATE")
        self.assertEqual(refid_text(1, b"GPS\0"), "GPS")
        self.assertEqual(refid_text(16, b"INIT"), "INIT")
        self.assertEqual(refid_text(2, b"\x7f\0\0\x01"), "127.0.0.1")
        self.assertEqual(refid_text(15, b"KERN"), "75.69.82.78")
        self.assertEqual(refid_text(1, b"\x01\x02\x03\x04"), "0x01020304")

    def test_request(self) -> None:
        packet = ntp_request(b"ABCDEFGH")
        self.assertEqual(len(packet), 48)
        self.assertEqual(packet[0], 0x23)
        self.assertEqual(packet[1:40], bytes(39))
        self.assertEqual(packet[40:], b"ABCDEFGH")


class DecodeTests(unittest.TestCase):
    def test_ctime_round_trip(self) -> None:
        for moment in (0.0, T1, 1_000_000_000.0):
            self.assertEqual(decode_ctime(encode_ctime(moment)), moment)
        self.assertEqual(decode_ctime(b"Thu Feb  5 01:02:03 2026\n") % 60, 3)

    def test_daytime(self) -> None:
        self.assertEqual(decode_daytime(encode_daytime(T1)), T1)
        self.assertEqual(decode_daytime(b"1970-01-01T01:00:00+01:00"), 0.0)
        with self.assertRaises(ValueError):
            decode_daytime(b"1970-01-01T01:00:00")

    def test_time_eras(self) -> None:
        self.assertEqual(decode_time(encode_time(T1), T1 + 1000), T1)
        # Past 2036-02-07 the count wraps; a present-day pivot unfolds it.
        after_wrap = 2**32 - 2_208_988_800 + 5.0
        self.assertEqual(decode_time(encode_time(after_wrap), T1), after_wrap)
        self.assertEqual(encode_time(after_wrap), (5).to_bytes(4, "big"))


class _Collect(DatagramProtocol):
    """A socket that never answers and remembers what it got."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))


class LoopbackTests(unittest.TestCase):
    """The real reactor against an in-process udptime service."""

    def serve(self, *listen: str) -> list[int]:
        options = Options()
        options.parseOptions([arg for spec in listen for arg in ("--listen", spec)])
        service = makeService(options, reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return [s.bound_port for s in service if isinstance(s, TimeListener)]

    @defer.inlineCallbacks
    def test_every_format(self) -> Any:
        formats = ("ctime", "daytime", "time", "ntp")
        ports = self.serve(*(f"{fmt}@127.0.0.1:0" for fmt in formats))
        for format, port in zip(formats, ports, strict=True):
            result = yield query(reactor, "127.0.0.1", port, format, timeout=2.0)
            self.assertEqual(
                (result.format, result.port, result.tries), (format, port, 1)
            )
            self.assertLess(abs(result.time - time.time()), 3, format)
            if format == "ntp":
                self.assertIsNotNone(result.ntp)
                self.assertLess(abs(result.ntp.offset), 0.5)
                self.assertGreaterEqual(result.ntp.delay, 0.0)
                self.assertLess(result.ntp.delay, 1.0)

    @defer.inlineCallbacks
    def test_ipv6(self) -> Any:
        try:
            free_udp_port("::1")
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback") from None
        (time_port, ntp_port) = self.serve("time@[::1]:0", "ntp@[::1]:0")
        result = yield query(reactor, "::1", time_port, "time", timeout=2.0)
        self.assertEqual(result.host, "::1")
        self.assertLess(abs(result.time - time.time()), 3)
        result = yield query(reactor, "[::1]", ntp_port, "ntp", timeout=2.0)
        self.assertLess(abs(result.ntp.offset), 0.5)

    @defer.inlineCallbacks
    def test_host_name(self) -> Any:
        (port,) = self.serve("daytime@127.0.0.1:0")
        result = yield query(reactor, "localhost", port, "daytime", family=4)
        self.assertEqual(result.host, "127.0.0.1")
        with self.assertRaises(ResolveError):
            yield query(reactor, "no-such-host.invalid", port, "daytime")
        with self.assertRaises(ResolveError):
            yield query(reactor, "127.0.0.1", port, "daytime", family=6)

    @defer.inlineCallbacks
    def test_silent_socket(self) -> Any:
        sink = _Collect()
        listening = cast(Any, reactor).listenUDP(0, sink, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        with self.assertRaises(NoReply):
            yield query(reactor, "127.0.0.1", port, "ctime", timeout=0.05, retries=3)
        self.assertEqual(len(sink.received), 3)
        # A fresh source port for every try of a text format.
        self.assertEqual(len({addr for _, addr in sink.received}), 3)


def run_cli(
    *args: str, timeout: float = 20.0, stdout: int | IO[Any] = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udptime", *args],
        check=False,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )


class CommandLineTests(unittest.TestCase):
    """``python -m udptime query`` against a real twistd, as a user runs it."""

    def test_json_for_every_format(self) -> None:
        formats = ("ctime", "daytime", "time", "ntp")
        server = Twistd(
            self, ["udptime", *(f"--listen={f}@127.0.0.1:0" for f in formats)]
        )
        ports = dict(zip(formats, server.serving(len(formats)), strict=True))
        poll_until_answered("127.0.0.1", ports["ctime"], process=server.process)
        poll_until_answered(
            "127.0.0.1", ports["ntp"], ntp_request(bytes(8)), process=server.process
        )
        for format, port in ports.items():
            done = run_cli(
                "query", "127.0.0.1", "--port", str(port), "--format", format, "--json"
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            answer = json.loads(done.stdout)
            self.assertEqual((answer["format"], answer["port"]), (format, port))
            self.assertLess(abs(answer["time"] - time.time()), 3)
            if format == "ntp":
                self.assertLess(abs(answer["offset"]), 0.5)
                self.assertIn("stratum", answer)
        done = run_cli("query", "127.0.0.1", "-p", str(ports["ntp"]), "-f", "ntp")
        self.assertEqual(done.returncode, 0, done.stderr)
        for label in ("time", "offset", "delay", "stratum", "leap", "refid"):
            self.assertRegex(done.stdout, rf"(?m)^{label} ")

    def test_silent_port_exits_1(self) -> None:
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sink.close)
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        started = time.monotonic()
        done = run_cli(
            "query",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "0.2",
            "--retries",
            "2",
        )
        elapsed = time.monotonic() - started
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertEqual(done.stdout, "")
        self.assertIn("no valid ctime reply", done.stderr)
        self.assertIn("after 2 tries of 0.2 s", done.stderr)
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 0.4 + 5.0)
        sink.setblocking(False)
        got = []
        while True:
            try:
                got.append(sink.recvfrom(64))
            except BlockingIOError:
                break
        self.assertEqual(len(got), 2)

    def test_usage_errors_exit_2(self) -> None:
        for args in (
            ("query", "127.0.0.1", "--bogus"),
            ("query",),
            ("query", "127.0.0.1", "--format", "nope"),
            ("query", "127.0.0.1", "--port", "70000"),
            ("query", "127.0.0.1", "--timeout", "0"),
            ("query", "127.0.0.1", "--retries", "0"),
            ("query", "127.0.0.1", "-4", "-6"),
            (),
        ):
            done = run_cli(*args)
            self.assertEqual(done.returncode, 2, args)
            self.assertIn("usage:", done.stderr, args)
            self.assertNotIn("Traceback", done.stderr, args)

    def test_version(self) -> None:
        done = run_cli("--version")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, f"udptime {udptime.__version__}\n")

    def test_help_names_every_exit_status(self) -> None:
        for args in (("--help",), ("query", "--help")):
            done = run_cli(*args)
            self.assertEqual(done.returncode, 0, done.stderr)
            text = " ".join(done.stdout.split())
            for status in ("0 answered", "1 no valid reply", "2 usage error"):
                self.assertIn(status, text, args)
            self.assertIn("3 answered but the result could not be written", text)


class OutputErrorTests(unittest.TestCase):
    """An answer that cannot be printed: exit 3 and one line, no traceback.

    Exit 3 also shows that the query itself succeeded: without a valid reply
    from the server this test started (on a port the kernel chose) it would
    be 1.
    """

    def setUp(self) -> None:
        server = Twistd(
            self,
            ["udptime", "--listen", "ctime@127.0.0.1:0", "--listen", "ntp@127.0.0.1:0"],
        )
        self.ctime, self.ntp = server.serving(2)
        poll_until_answered("127.0.0.1", self.ctime, process=server.process)
        poll_until_answered(
            "127.0.0.1", self.ntp, ntp_request(bytes(8)), process=server.process
        )

    def assert_output_error(
        self, done: subprocess.CompletedProcess[str], reason: str
    ) -> None:
        self.assertEqual(done.returncode, 3, done.stderr)
        self.assertEqual(done.stderr, f"udptime: cannot write the result: {reason}\n")

    def test_pipe_closed_before_the_result(self) -> None:
        for args in (
            ("-p", str(self.ctime)),
            ("-p", str(self.ntp), "-f", "ntp", "--json"),
        ):
            read, write = os.pipe()
            os.close(read)  # no reader left: the client's write gets EPIPE
            try:
                done = run_cli("query", "127.0.0.1", *args, stdout=write)
            finally:
                os.close(write)
            self.assert_output_error(done, "Broken pipe")

    def test_full_disk(self) -> None:
        if not os.path.exists("/dev/full"):
            raise unittest.SkipTest("no /dev/full")
        for args in (
            ("-p", str(self.ctime)),
            ("-p", str(self.ntp), "-f", "ntp", "--json"),
        ):
            with open("/dev/full", "w") as full:
                done = run_cli("query", "127.0.0.1", *args, stdout=full)
            self.assert_output_error(done, "No space left on device")


class DescribeTests(unittest.TestCase):
    def test_text_format(self) -> None:
        result = Result("time", "::1", 37, T1, encode_time(T1), 2)
        text = describe(result, "localhost")
        self.assertIn("localhost ([::1]:37), time, answered after 2 tries", text)
        self.assertIn("2027-01-15T08:00:00Z", text)
        self.assertEqual(json.loads(json.dumps(result.as_dict()))["tries"], 2)
