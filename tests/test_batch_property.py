"""The batch path against the per-datagram core, on batches that mix everything.

Plain NTP (one shared header or several), malformed datagrams, sources over
their limit (kissed or dropped), denied sources, loop-guarded ports, NTS
requests (good and tampered) and text payloads, from IPv4 or IPv6 sources:
whatever the mix, ``TimeProtocol.batch_received`` must send byte for byte
what ``AnsweringCore.answer`` returns one datagram at a time, and count the
same.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from udptime.core import AnsweringCore, Reply
from udptime.ntp import ServerState
from udptime.nts.cookies import CookieKeys
from udptime.nts.keyset import KeyHolder, KeySet
from udptime.nts.responder import NtsResponder
from udptime.nts.testing import nts_request
from udptime.policy import Policy, RateLimit
from udptime.protocol import TimeProtocol, ns_clock
from udptime.registry import Context, get_format
from udptime.responders.ntp import NtpResponder

from .test_protocol import FakeReceiver, FakeSender

LOCAL = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", 1_700_000_000.0)
KEYS = CookieKeys(15, os.urandom(32), os.urandom(32))
#: Deterministic nonces, so two responders seal the same cookies.
JAR = KeyHolder(KeySet.new(1_700_000_000.0, os.urandom, 86_400.0), lambda n: bytes(n))
COOKIE = JAR.seal(KEYS)


def ntp_header(first: int = 0x23, poll: int = 6, stratum: int = 0) -> bytes:
    return bytes([first, stratum, poll]) + bytes(37) + os.urandom(8)


def tampered(request: bytes) -> bytes:
    raw = bytearray(request)
    raw[-1] ^= 1  # the authenticator no longer verifies: an NTS NAK
    return bytes(raw)


NTS_GOOD = nts_request(KEYS, COOKIE, os.urandom(32))
NTS_BAD = tampered(nts_request(KEYS, COOKIE, os.urandom(32)))

DATAGRAMS = {
    "ntp": ntp_header(),
    "ntp-poll10": ntp_header(poll=10),
    "ntp-v3-stratum2": ntp_header(0x1B, 4, stratum=2),
    "ntp-v1": ntp_header(0x08),
    "ntp-extension": ntp_header() + bytes(16),
    "short": ntp_header()[:47],
    "server-mode": ntp_header(0x24),
    "version-0": ntp_header(0x03),
    "empty": b"",
    "text": b"hello",
    "time-reply": b"\x00\x00\x00\x01",
    "nts": NTS_GOOD,
    "nts-bad": NTS_BAD,
}
V4 = [bytes([192, 0, 2, i]) for i in (1, 2, 3)] + [bytes([10, 0, 0, 1])]
V6 = [
    bytes.fromhex("20010db8000000010000000000000001"),
    bytes.fromhex("20010db8000000020000000000000001"),
    bytes(10) + b"\xff\xff" + V4[0],
    bytes.fromhex("20010db8000000000000000000000bad"),
]


def make(name: str, clock: Clock, policy: Policy, nts: bool) -> TimeProtocol:
    context = Context(ns_clock(clock), lambda: LOCAL)
    responder: Any = get_format(name).make_responder(context)
    if nts:
        ntp = NtpResponder(context.clock_state, context.wall_clock_ns)
        responder = NtsResponder(ntp, JAR, random=lambda n: bytes(n))
    return TimeProtocol(name, AnsweringCore(responder, policy), clock)


def sealed(reply: Reply | None) -> bytes | None:
    return reply() if callable(reply) else reply


class MixedBatchTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        name=st.sampled_from(["ntp", "ntp+nts", "ctime", "time"]),
        family=st.sampled_from([V4, V6]),
        batches=st.lists(
            st.tuples(
                st.sampled_from([0.0, 0.001, 0.3, 2.0]),
                st.lists(
                    st.tuples(
                        st.sampled_from(sorted(DATAGRAMS)),
                        st.integers(0, 3),
                        st.sampled_from([40000, 40000, 123, 7, 0]),
                    ),
                    min_size=1,
                    max_size=64,
                ),
            ),
            min_size=1,
            max_size=4,
        ),
        limit=st.sampled_from([None, RateLimit(10, 50), RateLimit(1, 2)]),
        deny_kiss=st.booleans(),
    )
    def test_batch_sends_what_the_core_answers(
        self,
        name: str,
        family: list[bytes],
        batches: list[tuple[float, list[tuple[str, int, int]]]],
        limit: RateLimit | None,
        deny_kiss: bool,
    ) -> None:
        def policy() -> Policy:
            return Policy(
                limit,
                deny=["10.0.0.0/8", "2001:db8::bad/128"],
                deny_kiss=deny_kiss,
            )

        fmt, _, nts = name.partition("+")
        clock = Clock()
        clock.advance(1_700_000_000.25)
        batched = make(fmt, clock, policy(), bool(nts))
        single = make(fmt, clock, policy(), bool(nts))
        answered = 0
        for step, items in batches:
            clock.advance(step)
            moment = round(clock.seconds() * 1e9)
            datagrams = [
                (DATAGRAMS[kind], family[source], port, moment)
                for kind, source, port in items
            ]
            sender = FakeSender()
            batched.batch_received(
                FakeReceiver(datagrams),  # type: ignore[arg-type]
                sender,  # type: ignore[arg-type]
                len(datagrams),
            )
            # Sealers (NTS replies) are called, as the shell does right
            # before their send.
            expected = [
                sealed(single.core.answer(d, a, p, t, clock.seconds()))
                for d, a, p, t in datagrams
            ]
            sent = sender.sent + [None] * (len(expected) - len(sender.sent))
            self.assertEqual(
                sent if sender.sent else [], expected if any(expected) else []
            )
            answered += len(expected) - expected.count(None)
        counts = single.counters.snapshot()
        counts["answered"] = answered
        self.assertEqual(batched.counters.snapshot(), counts)
