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
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tests.test_nts_support import default_request, ke_session, make_certificate
from udptime.nts import records as rec
from udptime.nts.ke import (
    ALPN,
    KeFactory,
    KeProtocol,
    KeSettings,
    KeTlsFactory,
    TlsServerCreator,
    export_keys,
    tls_context,
)
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
        self.assertEqual(self.factory.active, 1)
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
        self.assertEqual(self.factory.counters.sessions, 1)
        # Anything after the response is ignored.
        protocol.dataReceived(default_request())
        self.assertEqual(transport.value().count(b"\x80\x01\x00\x02"), 1)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timeout(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(default_request()[:3])
        self.clock.advance(9.9)
        self.assertFalse(transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.factory.counters.timeouts, 1)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.factory.active, 0)

    def test_oversized_request_closes(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(rec.Record(0x1234, bytes(1021)).encode())
        self.assertTrue(transport.aborted)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.factory.counters.oversized, 1)

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
        self.assertEqual(self.factory.counters.errors_sent, 1)

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
        self.assertEqual(self.factory.counters.bad_alpn, 1)

    def test_export_failure_is_internal_error(self) -> None:
        protocol, transport = self.connect(FakeTls(fail=True))
        protocol.dataReceived(default_request())
        self.assertEqual(self.response(transport)[0], rec.error(rec.ERROR_INTERNAL))
        self.assertEqual(len(self.flushLoggedErrors(SSL.Error)), 1)

    @given(st.lists(st.binary(max_size=300), max_size=6))
    def test_any_bytes(self, chunks: list[bytes]) -> None:
        protocol, transport = self.connect()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        written = transport.value()
        if written:
            parsed = rec.parse_message(written)
            assert parsed is not None
            self.assertTrue(transport.disconnecting)
        protocol.connectionLost(connectionDone)
        self.assertEqual(self.factory.active, 0)

    def test_no_agreement_counted(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(
            rec.encode_records([rec.next_protocol([7]), rec.end_of_message()])
        )
        self.assertEqual(self.response(transport)[0], rec.next_protocol([]))
        self.assertEqual(self.factory.counters.no_agreement, 1)
        self.assertEqual(self.factory.counters.sessions, 0)

    def test_verbose_notes(self) -> None:
        self.factory.verbose = True
        protocol, transport = self.connect()
        protocol.dataReceived(default_request())
        self.assertTrue(transport.disconnecting)


class AdmissionTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-ke-"))
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = make_certificate(directory)
        self.clock = Clock()
        self.clock.advance(1000)
        self.ke = KeFactory(memory_keys(1_700_000_000.0), self.clock)
        self.creator = TlsServerCreator(tls_context(str(cert), str(key)))

    def test_connection_cap(self) -> None:
        factory = KeTlsFactory(self.creator, self.ke, max_connections=2)
        self.assertIsNotNone(factory.buildProtocol(PEER))
        self.ke.active = 2
        self.assertIsNone(factory.buildProtocol(PEER))
        self.assertEqual(self.ke.counters.refused_busy, 1)
        self.ke.active = 1
        self.assertIsNotNone(factory.buildProtocol(PEER))

    def test_rate_limit_per_source(self) -> None:
        policy = Policy(rate_limit=RateLimit(1.0, 3), loop_ports=())
        factory = KeTlsFactory(self.creator, self.ke, policy=policy)
        built = [factory.buildProtocol(PEER) is not None for _ in range(5)]
        self.assertEqual(built, [True, True, True, False, False])
        other = IPv4Address("TCP", "192.0.2.2", 1)
        self.assertIsNotNone(factory.buildProtocol(other))
        self.clock.advance(1.0)
        self.assertIsNotNone(factory.buildProtocol(PEER))
        self.assertEqual(self.ke.counters.refused_policy, 2)

    def test_access_lists_and_odd_addresses(self) -> None:
        policy = Policy(rate_limit=None, deny=["192.0.2.0/24"], loop_ports=())
        factory = KeTlsFactory(self.creator, self.ke, policy=policy)
        self.assertIsNone(factory.buildProtocol(PEER))
        self.assertIsNone(factory.buildProtocol(UNIXAddress(b"/tmp/x")))
        self.assertIsNotNone(
            factory.buildProtocol(IPv4Address("TCP", "198.51.100.1", 1))
        )


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
