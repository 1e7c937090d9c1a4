"""The NTS-KE server: the session protocol with fakes, then real TLS in-process."""

from __future__ import annotations

import hashlib
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL
from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.test_nts_support import default_request, ke_session, make_certificate
from udptime.nts import records as rec
from udptime.nts.ke import (
    ALPN,
    AlpnRefused,
    KeFactory,
    KeProtocol,
    KeSettings,
    KeTlsFactory,
    TlsServerCreator,
    export_keys,
    tls_context,
)
from udptime.nts.slots import Stage
from udptime.nts.testing import memory_keys
from udptime.policy import Policy, RateLimit


def exporter(label: bytes, length: int, context: bytes) -> bytes:
    return hashlib.sha512(label + context).digest()[:length]


class FakeTls:
    def __init__(self, alpn: bytes | None = ALPN, fail: bool = False) -> None:
        self.alpn = alpn
        self.fail = fail

    def get_alpn_proto_negotiated(self) -> bytes | None:
        return self.alpn

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def export_keying_material(
        self, label: bytes, length: int, context: bytes
    ) -> bytes:
        if self.fail:
            raise SSL.Error("no")
        return exporter(label, length, context)


class FakeTlsTransport(StringTransport):
    def __init__(self, tls: FakeTls) -> None:
        super().__init__()
        self.tls = tls
        self.aborted = False

    def getHandle(self) -> FakeTls:
        return self.tls

    def abortConnection(self) -> None:
        self.aborted = True


PEER = IPv4Address("TCP", "192.0.2.1", 40000)


class SessionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = memory_keys(1_700_000_000.0)
        self.factory = KeFactory(
            self.store, self.clock, KeSettings(ntp_port=20123), timeout=10.0
        )

    def connect(
        self, tls: FakeTls | None = None
    ) -> tuple[KeProtocol, FakeTlsTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = FakeTlsTransport(tls or FakeTls())
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        return protocol, transport

    def response(self, transport: FakeTlsTransport) -> list[rec.Record]:
        parsed = rec.parse_message(transport.value())
        assert parsed is not None
        return parsed[0]

    def test_session_byte_by_byte(self) -> None:
        protocol, transport = self.connect()
        for byte in default_request():
            protocol.dataReceived(bytes([byte]))
        records = self.response(transport)
        self.assertEqual(records[0], rec.next_protocol([0]))
        self.assertIn(rec.ntpv4_port(20123), records)
        cookies = [r.body for r in records if r.type == rec.NEW_COOKIE]
        self.assertEqual(len(cookies), 8)
        keys = export_keys(exporter, 15)
        self.assertTrue(all(self.store.key_set.open(c) == keys for c in cookies))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.counters.completed, 1)
        # Anything after the response is ignored.
        protocol.dataReceived(default_request())
        self.assertEqual(transport.value().count(b"\x80\x01\x00\x02"), 1)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(sum(self.factory.counters.failed.values()), 0)

    def test_timeout(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(default_request()[:3])
        self.clock.advance(9.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.counters.failed["timeout"], 1)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.factory.counters.failed["timeout"], 1)
        self.assertEqual(sum(self.factory.counters.failed.values()), 1)

    def test_oversized_request_closes(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(rec.Record(0x1234, bytes(1021)).encode())
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.counters.failed["records"], 1)

    def test_large_request_under_the_limit(self) -> None:
        protocol, transport = self.connect()
        data = rec.encode_records(
            [
                rec.Record(0x1234, bytes(900)),
                rec.next_protocol([0]),
                rec.aead_algorithm([15]),
                rec.end_of_message(),
            ]
        )
        protocol.dataReceived(data)
        self.assertEqual(self.response(transport)[0], rec.next_protocol([0]))

    def test_malformed_end_of_message(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x80\x00\x00\x02xx")
        self.assertEqual(
            self.response(transport),
            [rec.error(rec.ERROR_BAD_REQUEST), rec.end_of_message()],
        )
        self.assertEqual(self.factory.counters.failed["records"], 1)

    def test_unknown_critical(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(
            rec.Record(0x2000, b"", True).encode() + default_request()
        )
        self.assertEqual(self.response(transport)[0], rec.error(0))

    def test_no_alpn_aborts(self) -> None:
        protocol, transport = self.connect(FakeTls(alpn=b""))
        self.assertTrue(transport.aborted)
        protocol.dataReceived(default_request())
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.counters.failed["alpn"], 1)

    def test_export_failure_is_internal_error(self) -> None:
        protocol, transport = self.connect(FakeTls(fail=True))
        protocol.dataReceived(default_request())
        self.assertEqual(self.response(transport)[0], rec.error(rec.ERROR_INTERNAL))
        self.assertEqual(len(self.flushLoggedErrors(SSL.Error)), 1)
        self.assertEqual(self.factory.counters.failed["internal"], 1)

    @given(st.lists(st.binary(max_size=300), max_size=6))
    def test_any_bytes(self, chunks: list[bytes]) -> None:
        counters = self.factory.counters
        before = counters.completed + sum(counters.failed.values())
        protocol, transport = self.connect()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        written = transport.value()
        if written:
            parsed = rec.parse_message(written)
            assert parsed is not None
            self.assertTrue(transport.disconnecting)
        protocol.connectionLost(connectionDone)
        # One outcome per connection, whatever the bytes.
        after = counters.completed + sum(counters.failed.values())
        self.assertEqual(after - before, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_agreement_counted(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(
            rec.encode_records([rec.next_protocol([7]), rec.end_of_message()])
        )
        self.assertEqual(self.response(transport)[0], rec.next_protocol([]))
        self.assertEqual(self.factory.counters.failed["records"], 1)
        self.assertEqual(self.factory.counters.completed, 0)

    def test_verbose_notes(self) -> None:
        self.factory.verbose = True
        protocol, transport = self.connect()
        protocol.dataReceived(default_request())
        self.assertTrue(transport.disconnecting)


class DeadlineTests(unittest.TestCase):
    """First byte, end of handshake, response: each from connect, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(500)
        self.factory = KeFactory(memory_keys(1_700_000_000.0), self.clock)

    def connect(self) -> tuple[KeProtocol, FakeTlsTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = FakeTlsTransport(FakeTls())
        protocol.makeConnection(transport)
        return protocol, transport

    def expires_at(self, transport: FakeTlsTransport, seconds: float) -> None:
        """Not aborted just before *seconds* after connecting, aborted at it."""
        self.clock.advance(seconds - self.clock.seconds() + 500 - 0.01)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.01)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.counters.failed["timeout"], 1)

    def test_silent_connection(self) -> None:
        _, transport = self.connect()
        self.expires_at(transport, 2.0)

    def test_handshake_unfinished(self) -> None:
        protocol, transport = self.connect()
        self.clock.advance(1.5)
        protocol.first_byte_received()
        self.expires_at(transport, 4.0)

    def test_request_incomplete(self) -> None:
        protocol, transport = self.connect()
        self.clock.advance(0.1)
        protocol.first_byte_received()
        self.clock.advance(0.1)
        protocol.handshakeCompleted()
        protocol.dataReceived(default_request()[:5])
        self.expires_at(transport, 10.0)

    def test_deadlines_never_beyond_the_session(self) -> None:
        self.factory.timeout = 1.0
        _, transport = self.connect()
        self.expires_at(transport, 1.0)

    def test_answered_but_never_read(self) -> None:
        """The response is out but the client does not read it: the session
        deadline still frees the slot, and the exchange still counts as done."""
        protocol, transport = self.connect()
        protocol.first_byte_received()
        protocol.handshakeCompleted()
        protocol.dataReceived(default_request())
        self.assertEqual(self.factory.counters.completed, 1)
        self.clock.advance(10.0)
        self.assertTrue(transport.aborted)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.factory.counters.completed, 1)
        self.assertEqual(sum(self.factory.counters.failed.values()), 0)

    def test_client_leaves_mid_handshake(self) -> None:
        protocol, _ = self.connect()
        protocol.first_byte_received()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.factory.counters.failed["tls"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_leaves_before_its_request(self) -> None:
        protocol, _ = self.connect()
        protocol.handshakeCompleted()
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.factory.counters.failed["records"], 1)

    def test_alpn_refusal_counted(self) -> None:
        protocol, _ = self.connect()
        protocol.first_byte_received()
        protocol.connectionLost(Failure(AlpnRefused()))
        self.assertEqual(self.factory.counters.failed["alpn"], 1)


class AdmissionTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-ke-"))
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = make_certificate(directory)
        self.clock = Clock()
        self.clock.advance(1000)
        self.ke = KeFactory(memory_keys(1_700_000_000.0), self.clock)
        self.creator = TlsServerCreator(tls_context(str(cert), str(key)))

    def connect(
        self, factory: KeTlsFactory, host: str = "192.0.2.1"
    ) -> tuple[Any, StringTransport] | None:
        """A connection made through the factory, as the TCP port makes it."""
        address: Any = IPv6Address if ":" in host else IPv4Address
        wrapper = factory.buildProtocol(address("TCP", host, 40000))
        if wrapper is None:
            return None
        transport = StringTransport()
        wrapper.makeConnection(transport)
        return wrapper, transport

    def test_full_server_evicts_the_oldest_silent(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, max_connections=2)
        first = self.connect(factory, "192.0.2.1")
        second = self.connect(factory, "192.0.2.2")
        assert first is not None and second is not None
        self.assertEqual(factory.active, 2)
        third = self.connect(factory, "192.0.2.3")
        self.assertIsNotNone(third)
        self.assertTrue(first[1].disconnecting)
        self.assertFalse(second[1].disconnecting)
        self.assertEqual(self.ke.counters.failed["cap"], 1)
        self.assertEqual(self.ke.counters.evicted, 1)
        self.assertEqual(factory.active, 2)
        # The evicted connection closing later changes nothing.
        first[0].connectionLost(Failure(ConnectionLost()))
        self.assertEqual(factory.active, 2)
        self.assertEqual(self.ke.counters.failed["cap"], 1)

    def test_silent_go_before_handshakes(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, max_connections=2)
        talking = self.connect(factory, "192.0.2.1")
        silent = self.connect(factory, "192.0.2.2")
        assert talking is not None and silent is not None
        talking[0].dataReceived(b"\x16\x03\x01")  # the start of a ClientHello
        third = self.connect(factory, "192.0.2.3")
        assert third is not None
        self.assertTrue(silent[1].disconnecting)
        self.assertFalse(talking[1].disconnecting)
        third[0].dataReceived(b"\x16\x03\x01")
        # Nothing silent left: now the oldest unfinished handshake goes.
        self.connect(factory, "192.0.2.4")
        self.assertTrue(talking[1].disconnecting)
        self.assertFalse(third[1].disconnecting)
        self.assertEqual(self.ke.counters.evicted, 2)

    def test_a_failed_connection_frees_its_slot_at_once(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, max_connections=1)
        made = self.connect(factory)
        assert made is not None
        self.clock.advance(2.0)  # no first byte
        self.assertTrue(made[1].disconnecting)
        self.assertEqual(factory.active, 0)
        self.assertIsNotNone(self.connect(factory, "192.0.2.2"))
        self.assertEqual(self.ke.counters.evicted, 0)
        self.assertEqual(self.ke.counters.failed["timeout"], 1)

    def test_sessions_are_never_evicted(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, max_connections=2)
        for host in ("192.0.2.1", "192.0.2.2"):
            made = self.connect(factory, host)
            assert made is not None
            made[0].wrappedProtocol.slot.advance(Stage.SESSION)
        self.assertIsNone(self.connect(factory, "192.0.2.3"))
        self.assertEqual(self.ke.counters.failed["cap"], 1)
        self.assertEqual(self.ke.counters.evicted, 0)

    def test_per_address_cap(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, per_address=2)
        made = [self.connect(factory, "192.0.2.1") for _ in range(3)]
        self.assertEqual([m is not None for m in made], [True, True, False])
        self.assertIsNotNone(self.connect(factory, "192.0.2.2"))
        assert made[0] is not None
        made[0][0].connectionLost(Failure(ConnectionLost()))
        self.assertIsNotNone(self.connect(factory, "192.0.2.1"))
        self.assertEqual(self.ke.counters.failed["cap"], 1)

    def test_per_network_cap(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, per_address=2, per_network=3)
        made = [self.connect(factory, f"2001:db8::{n}") for n in range(1, 5)]
        self.assertEqual([m is not None for m in made], [True, True, True, False])
        self.assertIsNotNone(self.connect(factory, "2001:db8:0:1::1"))
        # An IPv4-mapped address is its IPv4 address.
        self.assertIsNotNone(self.connect(factory, "::ffff:192.0.2.9"))
        self.assertIsNotNone(self.connect(factory, "::ffff:192.0.2.9"))
        self.assertIsNone(self.connect(factory, "192.0.2.9"))

    def test_rate_limit_per_source(self) -> None:
        policy = Policy(rate_limit=RateLimit(1.0, 3), loop_ports=())
        factory = KeTlsFactory(self.creator, self.ke, policy=policy, per_address=10)
        built = [factory.buildProtocol(PEER) is not None for _ in range(5)]
        self.assertEqual(built, [True, True, True, False, False])
        other = IPv4Address("TCP", "192.0.2.2", 1)
        self.assertIsNotNone(factory.buildProtocol(other))
        self.clock.advance(1.0)
        self.assertIsNotNone(factory.buildProtocol(PEER))
        self.assertEqual(self.ke.counters.failed["rate"], 2)
        self.assertEqual(self.ke.counters.accepted, 5)

    def test_access_lists_and_odd_addresses(self) -> None:
        policy = Policy(rate_limit=None, deny=["192.0.2.0/24"], loop_ports=())
        factory = KeTlsFactory(self.creator, self.ke, policy=policy)
        self.assertIsNone(factory.buildProtocol(PEER))
        self.assertIsNone(factory.buildProtocol(UNIXAddress(b"/tmp/x")))
        self.assertIsNotNone(
            factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 1))
        )
        self.assertEqual(self.ke.counters.failed["denied"], 2)

    def test_summary_line(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, per_address=1)
        self.connect(factory)
        self.connect(factory)
        with capturedLogs() as events:
            factory.summarise(60)
            factory.summarise(60)
        lines = [formatEvent(e) for e in events]
        self.assertEqual(
            lines,
            [
                "NTS-KE: 0 completed, 1 failed (cap 1), 1 open now, in the last 60 s",
                "NTS-KE: 0 completed, 0 failed, 1 open now, in the last 60 s",
            ],
        )


def plaintext_alert(port: int, alpn: list[bytes]) -> tuple[int, int] | None:
    """Send a real ClientHello offering *alpn*; the (level, description) of the
    alert record the server answers with, or ``None`` if it sends none.

    An alert sent before the ServerHello is a plaintext TLS record: type 21,
    legacy version, length 2, then level and description (RFC 8446 6)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_alpn_protos(alpn)
    client = SSL.Connection(context, None)
    client.set_connect_state()
    try:
        client.do_handshake()
    except SSL.WantReadError:
        pass
    hello = client.bio_read(65536)
    received = b""
    with socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.settimeout(5)
        sock.sendall(hello)
        while chunk := sock.recv(65536):
            received += chunk
    offset = 0
    while offset + 5 <= len(received):
        kind = received[offset]
        length = int.from_bytes(received[offset + 3 : offset + 5], "big")
        body = received[offset + 5 : offset + 5 + length]
        if kind == 21 and len(body) == 2:
            return body[0], body[1]
        offset += 5 + length
    return None


class TlsTests(unittest.TestCase):
    """Real TLS over loopback against the factory the service uses."""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-tls-"))
        self.addCleanup(shutil.rmtree, directory, True)
        self.cert, key = make_certificate(directory)
        self.store = memory_keys(1_700_000_000.0)
        self.ke = KeFactory(self.store, reactor, KeSettings(ntp_port=123))
        factory: Any = KeTlsFactory(
            TlsServerCreator(tls_context(str(self.cert), str(key))), self.ke
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address: Any = port.getHost()
        self.port_number = int(address.port)

    def test_session(self) -> defer.Deferred[None]:
        d = threads.deferToThread(ke_session, self.port_number, self.cert)

        def check(result: Any) -> None:
            self.assertEqual(result.records[0], rec.next_protocol([0]))
            self.assertEqual(result.records[1], rec.aead_algorithm([15]))
            self.assertEqual(len(result.cookies), 8)
            for cookie in result.cookies:
                self.assertEqual(self.store.key_set.open(cookie), result.keys)

        return d.addCallback(check)

    def test_wrong_alpn_refused(self) -> defer.Deferred[None]:
        d = threads.deferToThread(
            ke_session, self.port_number, self.cert, alpn=[b"http/1.1"]
        )
        return self.assertFailure(d, SSL.Error).addCallback(lambda _: None)

    def test_wrong_alpn_gets_no_application_protocol(self) -> defer.Deferred[None]:
        """RFC 7301 3.2: a fatal (2) no_application_protocol (120) alert."""
        d = threads.deferToThread(plaintext_alert, self.port_number, [b"http/1.1"])

        def check(alert: tuple[int, int] | None) -> None:
            self.assertEqual(alert, (2, 120))
            self.assertEqual(self.ke.counters.failed["alpn"], 1)
            self.assertEqual(self.ke.counters.failed["tls"], 0)

        return d.addCallback(check)

    def test_no_alpn_closed(self) -> defer.Deferred[None]:
        d = threads.deferToThread(ke_session, self.port_number, self.cert, alpn=[])

        def check(result: Any) -> None:
            self.assertEqual(result.raw, b"")

        def refused(failure: Any) -> None:
            failure.trap(SSL.Error)

        return d.addCallbacks(check, refused)

    def test_tls12_refused(self) -> defer.Deferred[None]:
        def connect() -> None:
            context = ssl.create_default_context(cafile=str(self.cert))
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_alpn_protocols(["ntske/1"])
            address = ("127.0.0.1", self.port_number)
            with (
                socket.create_connection(address, 5) as sock,
                context.wrap_socket(sock, server_hostname="localhost"),
            ):
                pass

        d = threads.deferToThread(connect)
        return self.assertFailure(d, ssl.SSLError).addCallback(lambda _: None)
