"""udptime.mmsg on real loopback sockets: recvmmsg in, sendmmsg out, the batch port."""

from __future__ import annotations

import errno
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from udptime.mmsg import libc as mmsg_libc
from udptime.mmsg.port import BatchPort, adopt
from udptime.mmsg.receive import Receiver
from udptime.mmsg.send import Sender

LOCAL4 = "127.0.0.1"
LOCAL6 = "::1"
MAPPED_LOCAL4 = bytes(10) + b"\xff\xff" + socket.inet_aton(LOCAL4)
IP_RECVERR = 11
reactor: Any = _reactor

SKIP: str | None = None
if not sys.platform.startswith("linux"):
    SKIP = "recvmmsg/sendmmsg batch I/O is Linux only"
elif not mmsg_libc.available():
    SKIP = "libc lacks recvmmsg/sendmmsg or the platform is not LP64"


def ipv6_skip() -> str | None:
    if not socket.has_ipv6:
        return "Python built without IPv6"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind((LOCAL6, 0))
    except OSError as exc:
        return f"no IPv6 loopback here: {exc}"
    return None


class BatchSocket:
    """A receiver and its sender as one object, with conveniences only tests use."""

    def __init__(
        self,
        sock: socket.socket | int,
        batch: int = 64,
        slot_size: int = 2048,
        *,
        timestamps: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.receiver = Receiver(
            sock,
            batch,
            slot_size,
            timestamps=timestamps,
            clock_ns=lambda: round(clock() * 1e9),
        )
        self.sender = Sender(self.receiver)
        self.family = self.receiver.family
        self.receive = self.receiver.receive
        self.data = self.receiver.data
        self.lengths = self.receiver.lengths
        self.sources = self.receiver.sources
        self.received_ns = self.receiver.received_ns
        self.send = self.sender.send

    def received(self, n: int) -> list[float]:
        return [ns / 1e9 for ns in self.received_ns(n)]

    def messages(self, n: int) -> list[tuple[bytes, bytes, int, float]]:
        addrs, ports = self.sources(n)
        return list(zip(self.data(n), addrs, ports, self.received(n)))

    def truncated(self, n: int) -> list[int]:
        size = self.receiver.slot_size
        return [i for i, k in enumerate(self.lengths(n)) if k > size]

    def poke_receive_buffer(self, offset: int, raw: bytes) -> None:
        memoryview(self.receiver._mem).cast("B")[offset : offset + len(raw)] = raw

    def __getattr__(self, name: str) -> Any:
        for part in (self.receiver, self.sender):
            if hasattr(part, name):
                return getattr(part, name)
        raise AttributeError(name)


class Loopback:
    """A non-blocking server socket and blocking client sockets, closed on cleanup."""

    def __init__(self, test: unittest.TestCase, family: int, host: str) -> None:
        self.test = test
        self.server = self.make(family)
        if family == socket.AF_INET6 and host == "::":
            self.server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server.bind((host, 0))
        self.server.setblocking(False)
        port = self.server.getsockname()[1]
        self.target = (LOCAL6 if host == "::" else host, port)

    def make(self, family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        self.test.addCleanup(sock.close)
        return sock

    def clients(self, count: int, family: int, host: str) -> list[socket.socket]:
        out = []
        for _ in range(count):
            client = self.make(family)
            client.bind((host, 0))
            client.settimeout(2.0)
            out.append(client)
        return out

    def wait_readable(self, timeout: float = 2.0) -> None:
        ready, _, _ = select.select([self.server], [], [], timeout)
        if not ready:
            raise AssertionError("server socket never became readable")


def receive_all(bs: BatchSocket, loop: Loopback, expected: int) -> list[Any]:
    """Receive until *expected* datagrams came in; per batch, its messages."""
    batches: list[Any] = []
    total = 0
    while total < expected:
        n = bs.receive()
        if not n:
            loop.wait_readable()
            continue
        batches.append((n, bs.messages(n)))
        total += n
    return batches


class BatchSocketTests(unittest.TestCase):
    skip = SKIP

    def exchange(self, family: int, server_host: str, client_host: str) -> None:
        """Several clients, several datagrams each: data, sources, stamps, replies."""
        loop = Loopback(
            self, family if server_host != "::" else socket.AF_INET6, server_host
        )
        client_family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
        clients = loop.clients(3, client_family, client_host)
        bs = BatchSocket(loop.server, timestamps=True)
        sent = {}
        before = time.time()
        for round_ in range(4):
            for index, client in enumerate(clients):
                payload = b"c%d r%d " % (index, round_) + b"x" * (index * 50)
                client.sendto(payload, loop.target)
                sent[payload] = client.getsockname()[1]
        loop.wait_readable()
        n = bs.receive()
        after = time.time()
        self.assertEqual(n, 12)
        messages = bs.messages(n)
        if server_host == "::" and client_family == socket.AF_INET:
            packed = MAPPED_LOCAL4
        else:
            packed = socket.inet_pton(client_family, client_host)
        seen = {}
        for data, source, port, rx in messages:
            self.assertEqual(source, packed)
            seen[data] = port
            # Kernel stamps: taken during the sends, never after we looked.
            self.assertLessEqual(rx, after)
            self.assertGreater(rx, before - 0.005)
            self.assertLess(after - rx, 0.5)
        self.assertEqual(seen, sent)
        self.assertEqual(bs.received(n), [m[3] for m in messages])
        self.assertEqual(bs.truncated(n), [])

        replies = [b"reply to " + data for data, *_ in messages]
        self.assertEqual(bs.send(replies), 0)
        for client in clients:
            port = client.getsockname()[1]
            want = sorted(b"reply to " + d for d, p in sent.items() if p == port)
            got = sorted(client.recvfrom(4096)[0] for _ in want)
            self.assertEqual(got, want)
        self.assertEqual(bs.sent_count, 12)
        self.assertEqual(bs.dropped_count, 0)

    def test_ipv4(self) -> None:
        self.exchange(socket.AF_INET, LOCAL4, LOCAL4)

    def test_ipv6(self) -> None:
        skip = ipv6_skip()
        if skip:
            raise unittest.SkipTest(skip)
        self.exchange(socket.AF_INET6, LOCAL6, LOCAL6)

    def test_dual_stack_mapped_ipv4(self) -> None:
        """A :: socket hears 127.0.0.1 as ::ffff:127.0.0.1 and answers it."""
        skip = ipv6_skip()
        if skip:
            raise unittest.SkipTest(skip)
        loop = Loopback(self, socket.AF_INET6, "::")
        loop.target = (LOCAL4, loop.target[1])
        clients = loop.clients(2, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server, timestamps=True)
        for index, client in enumerate(clients):
            client.sendto(b"v4 %d" % index, loop.target)
        batches = receive_all(bs, loop, 2)
        messages = [m for _, ms in batches for m in ms]
        self.assertEqual([m[1] for m in messages], [MAPPED_LOCAL4] * 2)
        self.assertEqual(
            sorted(m[2] for m in messages), sorted(c.getsockname()[1] for c in clients)
        )
        n, last = batches[-1]
        self.assertEqual(bs.send([b"back " + m[0] for m in last]), 0)
        got = sorted(c.recvfrom(100)[0] for c in clients[-n:])
        self.assertEqual(got, sorted(b"back " + m[0] for m in last))

    def test_file_descriptor_and_no_timestamps(self) -> None:
        """A bare fd works; without timestamps every datagram gets the batch clock."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        (client,) = loop.clients(1, socket.AF_INET, LOCAL4)
        ticks = iter([1000.5, 2000.5])
        bs = BatchSocket(loop.server.fileno(), clock=lambda: next(ticks))
        self.assertEqual(bs.family, socket.AF_INET)
        for payload in (b"a", b"bb", b"ccc"):
            client.sendto(payload, loop.target)
        loop.wait_readable()
        n = bs.receive()
        self.assertEqual(n, 3)
        self.assertEqual(bs.data(n), (b"a", b"bb", b"ccc"))
        self.assertEqual(bs.received(n), [1000.5] * 3)
        self.assertEqual(bs.received_ns(n), [1_000_500_000_000] * 3)
        # The socket is still the caller's and still open.
        self.assertEqual(loop.server.getsockname()[0], LOCAL4)

    def test_truncated_datagram_is_empty(self) -> None:
        """No format may answer part of a request: a cut datagram reads as b""."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        (client,) = loop.clients(1, socket.AF_INET, LOCAL4)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        bs = BatchSocket(loop.server, slot_size=2048)
        big = bytes(range(256)) * 12  # 3072 bytes
        client.sendto(b"small", loop.target)
        client.sendto(big[:3000], loop.target)
        client.sendto(b"after", loop.target)
        (n, _), *rest = receive_all(bs, loop, 3)
        self.assertEqual((n, rest), (3, []))
        self.assertEqual(bs.truncated(n), [1])
        self.assertEqual(bs.lengths(n), (5, 3000, 5))
        self.assertEqual(bs.data(n), (b"small", b"", b"after"))
        self.assertEqual(bs.truncated_count, 1)

    def test_burst_drains_in_batches(self) -> None:
        """200 datagrams: full batches of 64, then the rest, nothing lost or reordered."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        loop.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        (client,) = loop.clients(1, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server, batch=64, timestamps=True)
        payloads = [b"%03d" % i + b"." * (i % 7) for i in range(200)]
        for payload in payloads:
            client.sendto(payload, loop.target)
        batches = receive_all(bs, loop, 200)
        sizes = [n for n, _ in batches]
        self.assertEqual(sum(sizes), 200)
        self.assertTrue(all(n <= 64 for n in sizes), sizes)
        self.assertGreaterEqual(len(sizes), 4)
        self.assertEqual([m[0] for _, ms in batches for m in ms], payloads)
        self.assertEqual(bs.received_count, 200)

    def test_repeated_length_pattern(self) -> None:
        """The compiled per-pattern unpack gives each batch its own bytes."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        (client,) = loop.clients(1, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        for round_ in range(4):
            payloads = [b"%d-%d" % (round_, i) + b"p" * i for i in range(5)]
            for payload in payloads:
                client.sendto(payload, loop.target)
            batches = receive_all(bs, loop, 5)
            self.assertEqual([m[0] for _, ms in batches for m in ms], payloads)

    def test_gaps_go_to_the_right_sources(self) -> None:
        """``None`` slots send nothing; the others still reach their own source."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        clients = loop.clients(5, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        for index, client in enumerate(clients):
            client.sendto(b"%d" % index, loop.target)
        batches = receive_all(bs, loop, 5)
        self.assertEqual(len(batches), 1)
        _, messages = batches[0]
        by_port = {c.getsockname()[1]: c for c in clients}
        replies: list[bytes | None] = [
            None if data in (b"0", b"2") else b"to " + data for data, *_ in messages
        ]
        self.assertEqual(bs.send(replies), 0)
        self.assertEqual(bs.sent_count, 3)
        for data, _, port, _ in messages:
            client = by_port[port]
            if data in (b"0", b"2"):
                client.settimeout(0.05)
                self.assertRaises(TimeoutError, client.recvfrom, 100)
            else:
                self.assertEqual(client.recvfrom(100)[0], b"to " + data)
        # Patches for the gaps are undone: a full batch goes out unchanged.
        for client in clients:
            client.sendto(b"again", loop.target)
        _, messages = receive_all(bs, loop, 5)[0]
        self.assertEqual(bs.send([b"%d" % p for _, _, p, _ in messages]), 0)
        for port, client in by_port.items():
            client.settimeout(2.0)
            self.assertEqual(client.recvfrom(100)[0], b"%d" % port)

    def test_stamp_replaces_last_eight_bytes(self) -> None:
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        clients = loop.clients(5, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        calls: list[float] = []

        def stamp() -> bytes:
            calls.append(time.time())
            return b"STAMPED!"

        body = b"head-of-reply-" + b"T" * 8
        # Slot of "skip" unanswered (a gap, or the tail), slot of "whole"
        # sent unstamped: both before and after the gap.
        for skip, whole in ((b"1", b"3"), (b"3", b"0"), (b"4", b"2")):
            for index, client in enumerate(clients):
                client.sendto(b"%d" % index, loop.target)
            n, messages = receive_all(bs, loop, 5)[0]
            order = [m[0] for m in messages]
            replies: list[bytes | None] = [
                None if data == skip else b"%s:" % data + body for data in order
            ]
            calls.clear()
            dropped = bs.send(replies, stamp, complete={order.index(whole)})
            self.assertEqual(dropped, 0)
            self.assertEqual(len(calls), 1)
            for data, _, port, _ in messages:
                client = next(c for c in clients if c.getsockname()[1] == port)
                if data == skip:
                    client.settimeout(0.02)
                    self.assertRaises(TimeoutError, client.recvfrom, 100)
                    client.settimeout(2.0)
                elif data == whole:
                    self.assertEqual(client.recvfrom(100)[0], data + b":" + body)
                else:
                    self.assertEqual(
                        client.recvfrom(100)[0], data + b":head-of-reply-STAMPED!"
                    )
        # Short replies go out whole, and the next stamped batch is clean.
        for client in clients:
            client.sendto(b"x", loop.target)
        n, _ = receive_all(bs, loop, 5)[0]
        self.assertEqual(bs.send([b"tiny"] + [b"12345678abcdefgh"] * (n - 1), stamp), 0)
        everyone = sorted(c.recvfrom(100)[0] for c in clients)
        self.assertEqual(everyone, sorted([b"tiny"] + [b"12345678STAMPED!"] * (n - 1)))
        for client in clients:
            client.sendto(b"y", loop.target)
        n, _ = receive_all(bs, loop, 5)[0]
        self.assertEqual(bs.send([b"abcdefgh12345678"] * n, stamp), 0)
        everyone = sorted(c.recvfrom(100)[0] for c in clients)
        self.assertEqual(everyone, [b"abcdefghSTAMPED!"] * n)

    def test_reply_layouts_change_between_batches(self) -> None:
        """One shared reply, distinct ones, big ones: each batch's bytes arrive."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        clients = loop.clients(3, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        shared = b"same for everyone"
        rounds: list[Callable[[int], Sequence[bytes | None]]] = [
            lambda n: [shared] * n,
            lambda n: [shared] * n,
            lambda n: [b"own %d" % i for i in range(n)],
            lambda n: [b"own %d" % (i + 5) for i in range(n)],
            lambda n: [shared[:4]] * n,
            lambda n: [bytes([65 + i]) * 3000 for i in range(n)],  # grows the buffer
            lambda n: [shared] * (n - 1) + [b"last"],
            lambda n: [shared] * n,
        ]
        for index, make_replies in enumerate(rounds):
            active = clients[: 1 + index % 3]
            for client in active:
                client.sendto(b"?", loop.target)
            n, messages = receive_all(bs, loop, len(active))[0]
            replies = make_replies(n)
            self.assertEqual(bs.send(replies), 0)
            by_port = {c.getsockname()[1]: c for c in active}
            for (_, _, port, _), reply in zip(messages, replies):
                self.assertEqual(by_port[port].recvfrom(4096)[0], reply)

    def test_missing_kernel_stamp_falls_back_to_the_batch_clock(self) -> None:
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        (client,) = loop.clients(1, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server, timestamps=True, clock=lambda: 1234.5)
        for _ in range(3):
            client.sendto(b"t", loop.target)
        (n, _), *_ = receive_all(bs, loop, 3)
        self.assertEqual(n, 3)
        stamps = bs.received(n)
        # As if the kernel had attached no control message to slot 1.
        bs.poke_receive_buffer(bs.receiver._control + 32, bytes(32))
        self.assertEqual(bs.received(n), [stamps[0], 1234.5, stamps[2]])
        got = bs.received_ns(n)
        self.assertEqual(got[1], 1_234_500_000_000)
        self.assertLess(abs(got[0] / 1e9 - stamps[0]), 1e-6)

    def test_reply_refused_by_kernel_is_skipped(self) -> None:
        """A reply the kernel refuses (port 0: EINVAL) costs that reply only."""
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        clients = loop.clients(3, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        for client in clients:
            client.sendto(b"q", loop.target)
        _, messages = receive_all(bs, loop, 3)[0]
        # Slot 1's source port becomes 0, which sendmsg refuses with EINVAL.
        bs.poke_receive_buffer(bs.receiver._names + bs.receiver.name_size + 2, b"\0\0")
        self.assertEqual(bs.send([b"r0", b"r1", b"r2"]), 1)
        self.assertEqual(bs.sent_count, 2)
        self.assertEqual(bs.dropped_count, 1)
        self.assertEqual(bs.sender.last_errno, errno.EINVAL)
        by_port = {c.getsockname()[1]: c for c in clients}
        for slot in (0, 2):
            self.assertEqual(by_port[messages[slot][2]].recvfrom(100)[0], b"r%d" % slot)

    def test_icmp_unreachable_does_not_break_receiving(self) -> None:
        for recverr in (False, True):
            loop = Loopback(self, socket.AF_INET, LOCAL4)
            if recverr:
                loop.server.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
            gone, stays = loop.clients(2, socket.AF_INET, LOCAL4)
            bs = BatchSocket(loop.server, timestamps=True)
            gone.sendto(b"bye", loop.target)
            n, _ = receive_all(bs, loop, 1)[0]
            gone.close()  # the reply now draws ICMP port unreachable
            self.assertEqual(bs.send([b"late"] * n), 0)
            for round_ in range(3):
                stays.sendto(b"still here %d" % round_, loop.target)
                n, messages = receive_all(bs, loop, 1)[0]
                self.assertEqual(messages[0][0], b"still here %d" % round_)
                self.assertEqual(bs.send([b"ok"]), 0)
                self.assertEqual(stays.recvfrom(100)[0], b"ok")
            if recverr:
                self.assertGreaterEqual(bs.receiver.errors, 1)
                self.assertEqual(bs.receiver.last_errno, errno.ECONNREFUSED)
            self.assertEqual(bs.receive(), 0)

    def test_empty_socket_and_empty_send(self) -> None:
        loop = Loopback(self, socket.AF_INET, LOCAL4)
        bs = BatchSocket(loop.server)
        self.assertEqual(bs.receive(), 0)
        self.assertEqual(bs.send([]), 0)
        self.assertEqual(bs.send([None, None]), 0)
        self.assertEqual(bs.receiver.errors, 0)

    def test_closed_socket_raises(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOCAL4, 0))
        bs = BatchSocket(sock)
        sock.close()
        error = self.assertRaises(OSError, bs.receive)
        self.assertEqual(error.errno, errno.EBADF)

    def test_rejects_what_it_cannot_serve(self) -> None:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(tcp.close)
        self.assertRaises(ValueError, BatchSocket, tcp)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(udp.close)
        self.assertRaises(ValueError, BatchSocket, udp, batch=0)
        self.assertRaises(ValueError, BatchSocket, udp, slot_size=0)


class AvailabilityTests(unittest.TestCase):
    def test_linux_has_it(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("only Linux promises recvmmsg/sendmmsg")
        self.assertTrue(mmsg_libc.available())

    def test_elsewhere_it_says_no(self) -> None:
        """Other platforms import the module, are told no, and cannot build one."""
        self.patch(sys, "platform", "darwin")
        mmsg_libc.libc.cache_clear()
        self.addCleanup(mmsg_libc.libc.cache_clear)
        self.assertFalse(mmsg_libc.available())
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        error = self.assertRaises(OSError, BatchSocket, sock)
        self.assertEqual(error.errno, errno.ENOSYS)


class FakeKernel:
    """Scripted ``sendmmsg`` results and errnos, recording each call's count."""

    def __init__(self, script: Sequence[tuple[int, int]]) -> None:
        self.script = list(script)
        self.calls: list[int] = []
        self.errno = 0

    def sendmmsg(self, fd: int, address: int, count: int, flags: int) -> int:
        self.calls.append(count)
        result, self.errno = self.script.pop(0)
        return result

    def install(self, bs: BatchSocket) -> None:
        bs.sender._sendmmsg = self.sendmmsg
        bs.sender._get_errno = lambda: self.errno


class PartialSendTests(unittest.TestCase):
    """What ``send`` does when the kernel takes only part of a batch."""

    skip = SKIP

    def setUp(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sock.close)
        self.bs = BatchSocket(self.sock)

    def send(self, script: Sequence[tuple[int, int]]) -> tuple[int, list[int]]:
        kernel = FakeKernel(script)
        kernel.install(self.bs)
        dropped = self.bs.send([b"r"] * 10)
        self.assertEqual(kernel.script, [])
        return dropped, kernel.calls

    def test_rest_is_retried(self) -> None:
        self.assertEqual(self.send([(6, 0), (4, 0)]), (0, [10, 4]))

    def test_full_buffer_drops_the_rest(self) -> None:
        self.assertEqual(self.send([(6, 0), (-1, errno.EAGAIN)]), (4, [10, 4]))
        self.assertEqual(self.send([(-1, errno.ENOBUFS)]), (10, [10]))
        self.assertEqual(self.bs.dropped_count, 14)
        self.assertEqual(self.bs.sent_count, 6)
        self.assertEqual(self.bs.send_errors, 2)

    def test_refused_reply_skipped_after_one_retry(self) -> None:
        script = [(3, 0), (-1, errno.ECONNREFUSED), (-1, errno.EINVAL), (6, 0)]
        self.assertEqual(self.send(script), (1, [10, 7, 7, 6]))

    def test_one_failure_is_retried(self) -> None:
        """A queued ICMP error reported on send is consumed: the retry goes out."""
        self.assertEqual(self.send([(-1, errno.ECONNREFUSED), (10, 0)]), (0, [10, 10]))

    def test_socket_errors_raise(self) -> None:
        kernel = FakeKernel([(-1, errno.EBADF)])
        kernel.install(self.bs)
        self.assertRaises(OSError, self.bs.send, [b"r"])


class Collector(DatagramProtocol):
    """A client that sends datagrams and fires once it has *expected* replies."""

    noisy = False

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.replies: list[bytes] = []
        self.done: defer.Deferred[list[bytes]] = defer.Deferred()

    def send(self, datagram: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.write(datagram, (LOCAL4, port))

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.append(datagram)
        if len(self.replies) == self.expected:
            self.done.callback(self.replies)


Handler = Callable[[Receiver, int], "Sequence[bytes | None]"]


class HandlerProtocol(DatagramProtocol):
    """A batch protocol answering with a plain function; records what happens."""

    def __init__(
        self, handler: Handler, stamp: Callable[[], bytes] | None = None
    ) -> None:
        self.handler = handler
        self.stamp = stamp
        self.batches: list[int] = []
        self.errors: list[BaseException] = []

    def batch_received(self, receiver: Receiver, sender: Sender, n: int) -> None:
        self.batches.append(n)
        sender.send(self.handler(receiver, n), self.stamp)

    def batch_failed(self, error: BaseException) -> None:
        self.errors.append(error)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        raise AssertionError("Twisted's own read path was used")


class BatchPortTests(unittest.TestCase):
    skip = SKIP

    def serve(
        self, handler: Handler, stamp: Callable[[], bytes] | None = None
    ) -> tuple[BatchPort, HandlerProtocol, int]:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind((LOCAL4, 0))
        server.setblocking(False)
        protocol = HandlerProtocol(handler, stamp)
        port = adopt(
            reactor,
            server,
            protocol,
            timestamps=True,
            clock_ns=time.time_ns,
            max_packet_size=65535,
        )
        server.close()  # the port holds its own duplicate: one owner
        self.addCleanup(port.stopListening)
        return port, protocol, port.getHost().port

    def client(self, expected: int) -> tuple[Collector, Any]:
        collector = Collector(expected)
        port = reactor.listenUDP(0, collector, interface=LOCAL4)
        self.addCleanup(port.stopListening)
        return collector, port

    def test_answers_datagrams_from_the_reactor(self) -> defer.Deferred[None]:
        def handler(receiver: Receiver, n: int) -> list[bytes | None]:
            return [
                b"%s at %d" % (data, rx // 1_000_000_000)
                for data, rx in zip(receiver.data(n), receiver.received_ns(n))
            ]

        port, protocol, number = self.serve(handler)
        collector, _ = self.client(50)
        start = int(time.time())
        for i in range(50):
            collector.send(b"q%02d" % i, number)

        def check(replies: list[bytes]) -> None:
            self.assertEqual(
                sorted(r.split(b" at ")[0] for r in replies),
                [b"q%02d" % i for i in range(50)],
            )
            for reply in replies:
                self.assertIn(int(reply.split(b" at ")[1]), (start, start + 1))
            self.assertEqual(sum(protocol.batches), 50)
            self.assertEqual(port.sender.sent_count, 50)

        return collector.done.addCallback(check)

    def test_stamp_written_last(self) -> defer.Deferred[None]:
        _, _, number = self.serve(
            lambda r, n: [b"0123456789abcdef"] * n, stamp=lambda: b"ZZZZZZZZ"
        )
        collector, _ = self.client(2)
        collector.send(b"1", number)
        collector.send(b"2", number)
        return collector.done.addCallback(self.assertEqual, [b"01234567ZZZZZZZZ"] * 2)

    def test_failing_batch_costs_only_itself(self) -> defer.Deferred[None]:
        def handler(receiver: Receiver, n: int) -> list[bytes | None]:
            if receiver.data(n)[0] == b"boom":
                raise ValueError("bad batch")
            return [b"fine"] * n

        _, protocol, number = self.serve(handler)
        collector, _ = self.client(1)
        collector.send(b"boom", number)
        # Wait for the failing batch by reactor turns, not sleeps.
        waiting: defer.Deferred[None] = defer.Deferred()

        def poll() -> None:
            if protocol.errors:
                waiting.callback(None)
            else:
                reactor.callLater(0.001, poll)

        reactor.callLater(0, poll)

        def second(_: object) -> defer.Deferred[list[bytes]]:
            collector.send(b"ok", number)
            return collector.done

        def check(replies: list[bytes]) -> None:
            self.assertEqual(replies, [b"fine"])
            self.assertEqual([type(e) for e in protocol.errors], [ValueError])

        return waiting.addCallback(second).addCallback(check)

    def test_bounded_work_per_read(self) -> None:
        """One doRead handles at most max_batches batches, then yields."""
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind((LOCAL4, 0))
        server.setblocking(False)
        protocol = HandlerProtocol(lambda r, n: [None] * n)
        port = adopt(
            reactor,
            server,
            protocol,
            timestamps=False,
            clock_ns=time.time_ns,
            max_packet_size=65535,
        )
        self.addCleanup(port.stopListening)
        port.stopReading()
        port.max_batches = 3
        port.receiver = Receiver(port.socket, batch=2, clock_ns=time.time_ns)
        port.sender = Sender(port.receiver)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(client.close)
        for _ in range(10):
            client.sendto(b"x", server.getsockname())
        select.select([server], [], [], 2.0)
        self.assertIsNone(port.doRead())
        self.assertEqual(protocol.batches, [2, 2, 2])

    def test_broken_socket_ends_reading(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind((LOCAL4, 0))
        protocol = HandlerProtocol(lambda r, n: [None] * n)
        port = adopt(
            reactor,
            server,
            protocol,
            timestamps=False,
            clock_ns=time.time_ns,
            max_packet_size=65535,
        )
        port.stopReading()
        server.close()
        port.socket.close()
        why = port.doRead()
        assert why is not None
        error = why.value
        assert isinstance(error, OSError)
        self.assertEqual(error.errno, errno.EBADF)
