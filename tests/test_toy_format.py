"""A format defined here and nowhere else, served end to end on both paths.

The proof that a new protocol is a wire function plus a responder: the
datagram path (core, protocol, batch port) is used as it is.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from udptime.listenspec import ListenSpec
from udptime.mmsg import libc as mmsg_libc
from udptime.mmsg.port import BatchPort
from udptime.policy import Policy, RateLimit
from udptime.protocol import ns_clock
from udptime.registry import Context, Format
from udptime.tap import listener_for

reactor: Any = _reactor
_LENGTH = struct.Struct("!I")


class LengthResponder:
    """Replies with the request's length; refuses with ``NO`` + the reason."""

    late_stamp = False
    echoes_anything = False
    kisses = True

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        return _LENGTH.pack(len(request)) if request != b"quiet" else None

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Collection[int]]:
        return [self.answer(r, t) for r, t in zip(requests, received_ns)], ()

    def stamp(self) -> bytes:
        raise NotImplementedError

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        return b"NO " + why


LENGTH = Format("length", "the request's length", lambda context: LengthResponder())


class Client(DatagramProtocol):
    """Sends datagrams, fires once *expected* replies came from *server*."""

    noisy = False

    def __init__(self, server: tuple[str, int], expected: int) -> None:
        self.server = server
        self.expected = expected
        self.replies: list[bytes] = []
        self.done: defer.Deferred[list[bytes]] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if addr[:2] != self.server:
            return  # not our server's answer
        self.replies.append(datagram)
        if len(self.replies) == self.expected and not self.done.called:
            self.done.callback(self.replies)


class ToyFormatTests(unittest.TestCase):
    def serve(self, *, batch: bool, policy: Policy | None = None) -> Any:
        context = Context(ns_clock(reactor), lambda: NotImplemented)
        listener = listener_for(
            LENGTH,
            ListenSpec("length", "127.0.0.1", 0),
            context,
            reactor,
            policy=policy,
            batch=batch,
        )
        listener.startService()
        self.addCleanup(listener.stopService)
        return listener

    def exchange(
        self, listener: Any, datagrams: list[bytes], expected: int
    ) -> defer.Deferred[list[bytes]]:
        server = ("127.0.0.1", listener.bound_port)
        client = Client(server, expected)
        port = reactor.listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        for datagram in datagrams:
            port.write(datagram, server)
        return client.done

    def check_path(self, batch: bool) -> defer.Deferred[None]:
        listener = self.serve(batch=batch)
        uses_batch_port = isinstance(listener.port, BatchPort)
        self.assertEqual(uses_batch_port, batch and mmsg_libc.available())
        datagrams = [b"", b"a", b"quiet", b"x" * 100, b"y" * 3000]

        def check(replies: list[bytes]) -> None:
            lengths = sorted(_LENGTH.unpack(r)[0] for r in replies)
            # On the batch port a datagram longer than a slot arrives empty.
            longest = 0 if uses_batch_port else 3000
            self.assertEqual(lengths, sorted([0, 1, 100, longest]))
            counters = listener.protocol.counters
            self.assertEqual((counters.received, counters.ignored), (5, 1))
            self.assertEqual(counters.answered, 4)

        return self.exchange(listener, datagrams, 4).addCallback(check)

    def test_batch_path(self) -> defer.Deferred[None]:
        if not mmsg_libc.available():
            raise unittest.SkipTest("no recvmmsg/sendmmsg here")
        return self.check_path(batch=True)

    def test_portable_path(self) -> defer.Deferred[None]:
        return self.check_path(batch=False)

    def test_refusals_are_the_formats_own(self) -> defer.Deferred[None]:
        policy = Policy(rate_limit=RateLimit(0.001, 2))
        listener = self.serve(batch=True, policy=policy)

        def check(replies: list[bytes]) -> None:
            self.assertEqual(replies.count(b"NO RATE"), 1)
            answers = sorted(_LENGTH.unpack(r)[0] for r in replies if r != b"NO RATE")
            self.assertEqual(answers, [1, 2])

        return self.exchange(listener, [b"1", b"22", b"333", b"4444"], 3).addCallback(
            check
        )
