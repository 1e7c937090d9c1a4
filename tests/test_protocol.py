"""TimeProtocol driven by a fake transport and a fake clock."""

from __future__ import annotations

import errno
from collections.abc import Collection, Sequence
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial import unittest

from udptime.core import AnsweringCore
from udptime.formats import (
    encode_ctime,
    encode_daytime,
    encode_time,
    looks_like_time_reply,
)
from udptime.ntp import ServerState
from udptime.policy import DEFAULT_LOOP_PORTS, Policy, RateLimit
from udptime.protocol import TimeProtocol, ns_clock
from udptime.registry import Context, get_format

CLIENT = ("192.0.2.7", 40000)
CLIENT6 = ("2001:db8::1", 40001, 0, 0)


LOCAL = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", 1_700_000_000.0)


def make(
    name: str = "ctime",
    when: float = 1_700_000_000.25,
    *,
    policy: Policy | None = None,
    verbose: bool = False,
) -> tuple[TimeProtocol, FakeDatagramTransport, Clock]:
    clock = Clock()
    clock.advance(when)
    responder = get_format(name).make_responder(Context(ns_clock(clock), lambda: LOCAL))
    core = AnsweringCore(responder, policy, verbose=verbose)
    proto = TimeProtocol(name, core, clock)
    transport = FakeDatagramTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


class OddResponder:
    """A text-like responder that raises on the request ``bad``."""

    late_stamp = False
    echoes_anything = True
    kisses = False

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        if request == b"bad":
            raise ValueError("boom")
        return b"ok"

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Collection[int]]:
        return [self.answer(r, t) for r, t in zip(requests, received_ns)], ()

    def stamp(self) -> bytes:
        raise NotImplementedError

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        return None


class CapturedLog:
    """Collect log events at warning level and above while a test runs."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.observe)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def observe(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def at_least(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_level", LogLevel.info) >= level]


class ReplyTests(unittest.TestCase):
    def test_empty_datagram_gets_ctime(self) -> None:
        proto, transport, clock = make("ctime")
        proto.datagramReceived(b"", CLIENT)
        self.assertEqual(transport.written, [(encode_ctime(clock.seconds()), CLIENT)])

    def test_every_format(self) -> None:
        for name, encode in (
            ("ctime", encode_ctime),
            ("daytime", encode_daytime),
            ("time", encode_time),
        ):
            proto, transport, clock = make(name)
            proto.datagramReceived(b"hello", CLIENT)
            self.assertEqual(transport.written, [(encode(clock.seconds()), CLIENT)])

    def test_reply_follows_the_clock(self) -> None:
        proto, transport, clock = make("time", when=100.0)
        proto.datagramReceived(b"", CLIENT)
        clock.advance(5)
        proto.datagramReceived(b"", CLIENT)
        self.assertEqual(
            [packet for packet, _ in transport.written],
            [encode_time(100.0), encode_time(105.0)],
        )

    def test_largest_datagram(self) -> None:
        proto, transport, _ = make("daytime")
        proto.datagramReceived(b"\xff" * 65_507, CLIENT)
        self.assertEqual(len(transport.written), 1)

    def test_ipv6_source(self) -> None:
        proto, transport, clock = make("ctime")
        proto.datagramReceived(b"x", CLIENT6)
        self.assertEqual(transport.written, [(encode_ctime(clock.seconds()), CLIENT6)])

    def test_counts(self) -> None:
        proto, _, _ = make("ctime")
        for _ in range(3):
            proto.datagramReceived(b"", CLIENT)
        self.assertEqual(proto.counters.received, 3)
        self.assertEqual(proto.counters.answered, 3)

    @settings(max_examples=200)
    @given(
        name=st.sampled_from(["ctime", "daytime", "time"]),
        datagram=st.binary(max_size=2048),
    )
    def test_any_datagram_exactly_one_reply(self, name: str, datagram: bytes) -> None:
        proto, transport, clock = make(name)
        proto.datagramReceived(datagram, CLIENT)
        if looks_like_time_reply(datagram, clock.seconds()):
            self.assertEqual(transport.written, [])
        else:
            self.assertEqual(len(transport.written), 1)
            self.assertEqual(transport.written[0][1], CLIENT)

    def test_time_server_replies_are_not_answered(self) -> None:
        """Two text servers pointed at each other stop after one datagram."""
        for name in ("ctime", "daytime", "time"):
            for other, encode in (
                ("ctime", encode_ctime),
                ("daytime", encode_daytime),
                ("time", encode_time),
            ):
                proto, transport, clock = make(name)
                proto.datagramReceived(encode(clock.seconds()), CLIENT)
                self.assertEqual(transport.written, [], (name, other))
                self.assertEqual(proto.counters.ignored, 1)

    def test_four_bytes_far_from_now_are_answered(self) -> None:
        proto, transport, clock = make("time")
        proto.datagramReceived(encode_time(clock.seconds() - 3 * 86_400), CLIENT)
        proto.datagramReceived(b"ping", CLIENT)
        self.assertEqual(len(transport.written), 2)


class QuietTests(unittest.TestCase):
    def test_not_verbose_logs_nothing_per_datagram(self) -> None:
        log = CapturedLog(self)
        proto, _, _ = make("ctime")
        for _ in range(10):
            proto.datagramReceived(b"", CLIENT)
        self.assertEqual([e for e in log.events if e.get("outcome") == "answered"], [])

    def test_verbose_logs_each_request(self) -> None:
        log = CapturedLog(self)
        proto, _, _ = make("ctime", verbose=True)
        proto.datagramReceived(b"abc", CLIENT)
        events = [e for e in log.events if e.get("outcome") == "answered"]
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["host"], CLIENT[0])
        self.assertEqual(events[0]["port"], CLIENT[1])
        self.assertEqual(events[0]["size"], 3)


class FailingTransport(FakeDatagramTransport):
    def write(self, packet: bytes, addr: Any = None) -> None:
        raise OSError(errno.ENOBUFS, "No buffer space available")


class ErrorTests(unittest.TestCase):
    def test_responder_error_is_counted_and_throttled(self) -> None:
        log = CapturedLog(self)
        clock = Clock()
        proto = TimeProtocol("odd", AnsweringCore(OddResponder(), None), clock)
        transport = FakeDatagramTransport()
        proto.makeConnection(transport)
        for _ in range(100):
            proto.datagramReceived(b"bad", CLIENT)
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.counters.errors, 100)
        warnings = log.at_least(LogLevel.warn)
        self.assertEqual(len(warnings), 5)
        self.assertEqual({e.get("log_failure") for e in warnings}, {None})
        clock.advance(61)
        proto.datagramReceived(b"bad", CLIENT)
        warnings = log.at_least(LogLevel.warn)
        self.assertEqual(len(warnings), 6)
        self.assertEqual(warnings[-1]["suppressed"], 95)

    def test_send_buffer_full_drops_and_goes_on(self) -> None:
        proto, _, _ = make("time")
        proto.transport = FailingTransport()
        proto.datagramReceived(b"", CLIENT)
        self.assertEqual(proto.counters.send_errors, 1)
        self.assertEqual(proto.counters.answered, 0)
        transport = FakeDatagramTransport()
        proto.transport = transport
        proto.datagramReceived(b"", CLIENT)
        self.assertEqual(len(transport.written), 1)


class PolicyInFrontTests(unittest.TestCase):
    """The whole protocol, policy in front, under any input: never more than one
    reply, never an exception, never a reply to a loop-guarded or denied source."""

    @settings(max_examples=300, deadline=None)
    @given(
        name=st.sampled_from(["ctime", "daytime", "time", "ntp"]),
        datagrams=st.lists(
            st.tuples(
                st.binary(max_size=256),
                st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "10.9.9.9"]),
                st.sampled_from([0, 7, 13, 19, 37, 123, 40000]),
                st.floats(0, 5),
            ),
            max_size=40,
        ),
    )
    def test_any_traffic(
        self, name: str, datagrams: list[tuple[bytes, str, int, float]]
    ) -> None:
        policy = Policy(
            rate_limit=RateLimit(2, 3),
            deny=["10.0.0.0/8"],
            deny_kiss=True,
            table_size=2,
        )
        proto, transport, clock = make(name, policy=policy)
        for datagram, host, port, step in datagrams:
            clock.advance(step)
            before = len(transport.written)
            proto.datagramReceived(datagram, (host, port))
            sent = transport.written[before:]
            self.assertLessEqual(len(sent), 1)
            if port == 0 or (name != "ntp" and port in DEFAULT_LOOP_PORTS):
                self.assertEqual(sent, [])
            if host.startswith("10.") and sent:
                self.assertEqual(sent[0][0][12:16], b"DENY")  # only a DENY kiss
        counters = proto.counters
        self.assertEqual(counters.received, len(datagrams))
        self.assertEqual(counters.errors, 0)
        self.assertEqual(counters.answered, len(transport.written))
        self.assertEqual(
            counters.received,
            counters.answered
            - counters.kisses
            + counters.rate_limited
            + counters.denied
            + counters.ignored,
        )


class FakeReceiver:
    """What ``TimeProtocol.batch_received`` reads from a ``Receiver``, as lists."""

    batch = 64

    def __init__(self, items: list[tuple[bytes, bytes, int, int]]) -> None:
        self.items = items

    def sources(self, n: int) -> tuple[list[bytes], list[int]]:
        return [i[1] for i in self.items[:n]], [i[2] for i in self.items[:n]]

    def received_ns(self, n: int) -> list[int]:
        return [i[3] for i in self.items[:n]]

    def data(self, n: int) -> list[bytes]:
        return [i[0] for i in self.items[:n]]


class FakeSender:
    """Keeps what a ``Sender`` would have sent, the late stamp applied."""

    def __init__(self) -> None:
        self.sent: list[bytes | None] = []

    def send(
        self,
        replies: list[bytes | None],
        stamp: Any = None,
        complete: Collection[int] = (),
    ) -> int:
        stamped = stamp() if stamp is not None else None
        sent = [
            r[:-8] + stamped if r is not None and stamped and i not in complete else r
            for i, r in enumerate(replies)
        ]
        for i, reply in enumerate(sent):  # a later send adds to the batch's
            if reply is not None or i >= len(self.sent):
                self.put(i, reply)
        return 0

    def send_one(self, slot: int, reply: bytes) -> int:
        """A sealed reply (``udptime.core.Sealer``), sent on its own."""
        self.put(slot, reply)
        return 0

    def put(self, slot: int, reply: bytes | None) -> None:
        self.sent.extend([None] * (slot + 1 - len(self.sent)))
        self.sent[slot] = reply


def ntp_request(poll: int = 6) -> bytes:
    return bytes([0x23, 0, poll]) + bytes(37) + b"\x01\x02\x03\x04\x05\x06\x07\x08"


class BatchPathTests(unittest.TestCase):
    """The batch path decides exactly as the portable path, datagram for datagram."""

    @settings(max_examples=200, deadline=None)
    @given(
        name=st.sampled_from(["ctime", "daytime", "time", "ntp"]),
        items=st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"",
                        b"x",
                        b"\x00\x00\x00\x01",
                        b"hello" * 5,
                        ntp_request(),
                        ntp_request(3),
                        ntp_request()[:47],
                        b"\x1c" + ntp_request()[1:],
                    ]
                ),
                st.sampled_from(
                    [b"\xc0\x00\x02\x01", b"\xc0\x00\x02\x02", b"\x0a\x00\x00\x01"]
                ),
                st.sampled_from([0, 7, 40000]),
            ),
            min_size=1,
            max_size=64,
        ),
        limited=st.booleans(),
        deny_kiss=st.booleans(),
    )
    def test_same_as_one_by_one(
        self,
        name: str,
        items: list[tuple[bytes, bytes, int]],
        limited: bool,
        deny_kiss: bool,
    ) -> None:
        def policy() -> Policy:
            return Policy(
                rate_limit=RateLimit(1, 3) if limited else None,
                deny=["10.0.0.0/8"],
                deny_kiss=deny_kiss,
            )

        batched, _, clock = make(name, policy=policy())
        single, _, _ = make(name, policy=policy())
        moment = round(clock.seconds() * 1e9)
        sender = FakeSender()
        receiver = FakeReceiver([(d, a, p, moment) for d, a, p in items])
        batched.batch_received(receiver, sender, len(items))  # type: ignore[arg-type]
        one_by_one = [
            single.core.answer(d, a, p, moment, clock.seconds()) for d, a, p in items
        ]
        # Nothing to send, no sendmmsg at all.
        self.assertEqual(sender.sent, one_by_one if any(one_by_one) else [])
        expected = single.counters.snapshot()
        expected["answered"] = len(one_by_one) - one_by_one.count(None)
        self.assertEqual(batched.counters.snapshot(), expected)

    def test_a_raising_responder_costs_only_its_datagram(self) -> None:
        proto = TimeProtocol("odd", AnsweringCore(OddResponder(), None), Clock())
        receiver = FakeReceiver(
            [
                (b"a", b"\xc0\x00\x02\x01", 4000, 0),
                (b"bad", b"\xc0\x00\x02\x02", 4000, 0),
                (b"c", b"\xc0\x00\x02\x03", 4000, 0),
            ]
        )
        sender = FakeSender()
        proto.batch_received(receiver, sender, 3)  # type: ignore[arg-type]
        self.assertEqual(sender.sent, [b"ok", None, b"ok"])
        self.assertEqual(proto.counters.errors, 1)
        self.assertEqual(proto.counters.answered, 2)

    def test_verbose_logs_after_the_batch(self) -> None:
        log = CapturedLog(self)
        proto, _, clock = make("time", verbose=True)
        moment = round(clock.seconds() * 1e9)
        receiver = FakeReceiver([(b"", b"\xc0\x00\x02\x01", 4000, moment)] * 3)
        proto.batch_received(receiver, FakeSender(), 3)  # type: ignore[arg-type]
        events = [e for e in log.events if e.get("outcome") == "answered"]
        self.assertEqual(len(events), 3)
        self.assertEqual(proto.core.notes, [])
