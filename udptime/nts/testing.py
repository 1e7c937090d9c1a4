"""Helpers for tests and benchmarks of NTS, not used by the server itself
(like :mod:`twisted.internet.testing`): a self-signed certificate, a blocking
NTS-KE client on pyOpenSSL (it can export keying material, Python's ``ssl``
cannot) and authenticated NTP requests."""

from __future__ import annotations

import datetime
import ipaddress
import os
import select
import selectors
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from udptime.nts import extensions as ext
from udptime.nts import records as rec
from udptime.nts.cookies import DEFAULT_ROTATE, CookieKeys
from udptime.nts.ke import ALPN, EXPORTER_LABEL
from udptime.nts.keyset import KeyHolder, KeySet


class KeError(Exception):
    """A strict :func:`ke_session` refused the exchange; the message says why."""


def make_certificate(
    directory: Path,
    *,
    cert_name: str = "cert.pem",
    key_name: str = "key.pem",
    addresses: Sequence[str] = ("127.0.0.1",),
    valid_from: datetime.datetime | None = None,
    valid_until: datetime.datetime | None = None,
    passphrase: bytes | None = None,
) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and *addresses*, and its
    key, written to *directory* as *cert_name* and *key_name*.

    Valid from a day ago for 30 days unless *valid_from*/*valid_until* say
    otherwise; the key is encrypted when a *passphrase* is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from or now - datetime.timedelta(days=1))
        .not_valid_after(valid_until or now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    *(x509.IPAddress(ipaddress.ip_address(a)) for a in addresses),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / cert_name
    key_path = directory / key_name
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()
            if passphrase is None
            else serialization.BestAvailableEncryption(passphrase),
        )
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def memory_keys(now: float | None = None, rotate: float = DEFAULT_ROTATE) -> KeyHolder:
    """Master keys that live in memory only, for the NTS-KE server and the
    NTS responder in tests and benchmarks (a server always has a keys file)."""
    return KeyHolder(
        KeySet.new(time.time() if now is None else now, os.urandom, rotate)
    )


def default_request() -> bytes:
    """A client's KE request: NTPv4, AES-SIV-CMAC-256, End of Message."""
    return rec.encode_records(
        [
            rec.next_protocol([rec.PROTOCOL_NTPV4]),
            rec.aead_algorithm([rec.AEAD_AES_SIV_CMAC_256]),
            rec.end_of_message(),
        ]
    )


@dataclass
class KeResult:
    """What a KE session gave: the raw response, its records, exported keys."""

    raw: bytes
    records: list[rec.Record]
    keys: CookieKeys
    #: the server's leaf certificate, DER
    peer_certificate: bytes = b""

    @property
    def cookies(self) -> list[bytes]:
        return [r.body for r in self.records if r.type == rec.NEW_COOKIE]


def _wait(sock: socket.socket, deadline: float, write: bool = False) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("NTS-KE client timed out")
    if write:
        select.select([], [sock], [], remaining)
    else:
        select.select([sock], [], [], remaining)


def ke_session(
    port: int,
    cafile: Path,
    request: bytes | None = None,
    *,
    alpn: list[bytes] | None = None,  # [] offers no ALPN at all
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    strict: bool = False,
    source: str | None = None,
) -> KeResult:
    """One NTS-KE session as a client; ``SSL.Error`` when TLS refuses it.

    The response is read until the server closes. With *strict*, a server
    that did not select ALPN ``ntske/1`` or whose response is incomplete is a
    :class:`KeError`, and reading stops at End of Message. *source* is the
    local address to connect from (any 127.x address on loopback)."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.load_verify_locations(str(cafile))
    context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    offered = [ALPN] if alpn is None else alpn
    if offered:
        context.set_alpn_protos(offered)
    sock = socket.create_connection(
        (host, port), timeout, None if source is None else (source, 0)
    )
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    conn = SSL.Connection(context, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    try:
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                _wait(sock, deadline)
        if strict and conn.get_alpn_proto_negotiated() != ALPN:
            raise KeError("the NTS-KE server did not select ALPN ntske/1")
        data = default_request() if request is None else request
        while data:
            try:
                sent = conn.send(data)
            except SSL.WantWriteError:
                _wait(sock, deadline, write=True)
                continue
            except SSL.WantReadError:
                _wait(sock, deadline)
                continue
            data = data[sent:]
        raw = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except SSL.WantReadError:
                _wait(sock, deadline)
                continue
            except (SSL.ZeroReturnError, SSL.SysCallError):
                break
            if not chunk:
                break
            raw += chunk
            if strict and rec.parse_message(raw) is not None:
                break  # End of Message seen: no need to wait for the close
        context_bytes = rec.u16(rec.PROTOCOL_NTPV4) + rec.u16(rec.AEAD_AES_SIV_CMAC_256)
        keys = CookieKeys(
            rec.AEAD_AES_SIV_CMAC_256,
            conn.export_keying_material(EXPORTER_LABEL, 32, context_bytes + b"\x00"),
            conn.export_keying_material(EXPORTER_LABEL, 32, context_bytes + b"\x01"),
        )
        peer = conn.get_peer_certificate(as_cryptography=True)
        der = b"" if peer is None else peer.public_bytes(serialization.Encoding.DER)
    finally:
        sock.close()
    parsed = rec.parse_message(raw)
    if strict and parsed is None:
        raise KeError(f"incomplete NTS-KE response ({len(raw)} bytes)")
    records = parsed[0] if parsed is not None else []
    return KeResult(raw, records, keys, der)


def client_header(transmit: bytes = b"") -> bytes:
    """An NTPv4 client header; a random transmit timestamp unless given."""
    return bytes([4 << 3 | 3, 0, 6]) + bytes(37) + (transmit or os.urandom(8))


def nts_request(
    keys: CookieKeys, cookie: bytes, unique_id: bytes, placeholders: int = 0
) -> bytes:
    """An authenticated NTPv4 client request carrying *cookie*."""
    return ext.build_request(
        client_header(),
        unique_id,
        cookie,
        AESSIV(keys.c2s),
        os.urandom(16),
        placeholders=placeholders,
    )


@dataclass
class FloodReport:
    """What :func:`silent_flood` did."""

    #: connections made, the first ones included
    connects: int = 0
    #: connections the server closed (each was made again at once)
    closed: int = 0
    #: connect attempts that failed outright (refused, no port)
    failed: int = 0


def silent_flood(
    host: str, port: int, sources: list[str], duration: float
) -> FloodReport:
    """Hold one TCP connection from each of *sources* to *host*:*port*, never
    sending a byte, and reconnect each as soon as the server closes it, for
    *duration* seconds: the cheapest attack on a TLS server's connection
    slots. For loopback tests (bind the sources among 127.0.0.0/8)."""
    report = FloodReport()
    selector = selectors.DefaultSelector()

    def connect(source: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            sock.connect_ex((host, port))
        except OSError:
            report.failed += 1
            sock.close()
            return
        report.connects += 1
        selector.register(sock, selectors.EVENT_READ, source)

    for source in sources:
        connect(source)
    end = time.monotonic() + duration
    try:
        while (left := end - time.monotonic()) > 0:
            for key, _ in selector.select(min(left, 0.2)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if data:
                    continue  # never expected: the server speaks second
                selector.unregister(sock)
                sock.close()
                report.closed += 1
                connect(key.data)
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
    return report
