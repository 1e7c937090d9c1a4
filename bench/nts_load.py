"""NTS load for the benchmark: one NTS-KE session, then a file of
authenticated NTP requests for ``loadgen --payload-file``.

NTS servers keep no state about Unique Identifiers (RFC 8915, section 5.7:
replay protection is the client's job), and a cookie may be presented any
number of times, so replaying a fixed set of valid requests is a fair load:
the server opens the cookie, checks the authenticator and seals a reply with
a fresh cookie for every one of them.

The NTS-KE client is pyOpenSSL, as Python's ``ssl`` cannot export keying
material (RFC 5705); it, the certificate and the request building are
shared with the tests in :mod:`udptime.nts.testing`. Record and
extension-field encoding come from ``udptime.nts``; nothing here depends on
the test suite.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from OpenSSL import SSL

from udptime.nts import extensions as ext
from udptime.nts import records as rec
from udptime.nts import testing
from udptime.nts.cookies import CookieKeys

AEAD = rec.AEAD_AES_SIV_CMAC_256
#: Requests written to the payload file; the load generator cycles over them.
DEFAULT_REQUESTS = 64
#: The sample check sends each request from its own address in this /16, so
#: a per-source rate limiter never answers it with a KoD.
CHECK_SOURCE_BASE = "127.3.0.1"


class NtsLoadError(Exception):
    """NTS-KE or the authenticated check failed; the message says why."""


@dataclass
class KeSession:
    """What one NTS-KE session gave: records, cookies, the two AEAD keys."""

    records: list[rec.Record]
    keys: CookieKeys
    seconds: float

    @property
    def cookies(self) -> list[bytes]:
        return [r.body for r in self.records if r.type == rec.NEW_COOKIE]

    def record_bodies(self, kind: int) -> list[bytes]:
        return [r.body for r in self.records if r.type == kind]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """The server's self-signed certificate and key, named as the server
    configurations expect them."""
    return testing.make_certificate(
        directory, cert_name="nts-cert.pem", key_name="nts-key.pem"
    )


def ke_session(host: str, port: int, cafile: Path, timeout: float = 10.0) -> KeSession:
    """One NTS-KE session (TLS 1.3, ALPN ntske/1, NTPv4 and AES-SIV-CMAC-256)."""
    t0 = time.monotonic()
    try:
        result = testing.ke_session(
            port, cafile, host=host, timeout=timeout, strict=True
        )
    except testing.KeError as exc:
        raise NtsLoadError(str(exc)) from None
    return KeSession(result.records, result.keys, time.monotonic() - t0)


def check_session(session: KeSession, ntp_port: int) -> None:
    """Refuse a KE response the benchmark cannot use (errors, wrong choices)."""
    if session.record_bodies(rec.ERROR):
        codes = [int.from_bytes(b, "big") for b in session.record_bodies(rec.ERROR)]
        raise NtsLoadError(f"NTS-KE error record(s) {codes}")
    if session.record_bodies(rec.NEXT_PROTOCOL) != [rec.u16(rec.PROTOCOL_NTPV4)]:
        raise NtsLoadError("NTS-KE did not agree on NTPv4")
    if session.record_bodies(rec.AEAD_ALGORITHM) != [rec.u16(AEAD)]:
        raise NtsLoadError("NTS-KE did not agree on AES-SIV-CMAC-256")
    if not session.cookies:
        raise NtsLoadError("NTS-KE gave no cookies")
    ports = session.record_bodies(rec.NTPV4_PORT)
    if ports and ports != [rec.u16(ntp_port)]:
        told = [int.from_bytes(p, "big") for p in ports]
        raise NtsLoadError(f"NTS-KE names NTP port {told}, the server uses {ntp_port}")


def write_payload_file(path: Path, datagrams: list[bytes]) -> None:
    """``loadgen --payload-file`` format: 2-byte big-endian length, bytes."""
    path.write_bytes(b"".join(struct.pack("!H", len(d)) + d for d in datagrams))


def check_reply(
    host: str,
    port: int,
    session: KeSession,
    request: bytes,
    unique_id: bytes,
    source: str,
    timeout: float = 2.0,
) -> int:
    """Send *request* from *source*; the reply must authenticate and not be a
    NAK. Returns the reply's length."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(request, (host, port))
        try:
            reply = sock.recv(65535)
        except TimeoutError:
            raise NtsLoadError("no reply to an authenticated request") from None
    try:
        opened = ext.open_response(reply, AESSIV(session.keys.s2c), unique_id)
    except ext.ExtensionError as exc:
        raise NtsLoadError(
            f"reply of {len(reply)} bytes is not a valid NTS reply: {exc}"
        ) from None
    if opened.nak:
        raise NtsLoadError("the server answered with an NTS NAK (kiss NTSN)")
    if opened.header[0] & 7 != 4 or opened.header[1] == 0:
        raise NtsLoadError(f"reply header is not a server reply: {opened.header[:4]!r}")
    if not opened.cookies:
        raise NtsLoadError("authenticated reply carries no new cookie")
    return len(reply)


def prepare(
    host: str,
    ke_port: int,
    ntp_port: int,
    cafile: Path,
    out: Path,
    *,
    count: int = DEFAULT_REQUESTS,
    deadline: float = 15.0,
) -> dict[str, Any]:
    """NTS-KE against a running server, *count* requests written to *out*, all
    of them checked once; a summary for the results. :class:`NtsLoadError`
    with the reason when any step fails."""
    end = time.monotonic() + deadline
    session: KeSession | None = None
    last = ""
    while session is None:
        try:
            session = ke_session(
                host, ke_port, cafile, timeout=max(1.0, end - time.monotonic())
            )
        except (ConnectionRefusedError, ConnectionResetError) as exc:
            # The KE listener may come up after the NTP one (chronyd's helper).
            last = str(exc)
            if time.monotonic() > end:
                raise NtsLoadError(f"NTS-KE on {host}:{ke_port}: {last}") from None
            time.sleep(0.1)
        except (OSError, SSL.Error) as exc:
            raise NtsLoadError(f"NTS-KE on {host}:{ke_port}: {exc!r}") from None
    check_session(session, ntp_port)
    cookies = session.cookies
    requests: list[tuple[bytes, bytes]] = []
    for i in range(count):
        unique_id = os.urandom(32)
        requests.append(
            (
                testing.nts_request(session.keys, cookies[i % len(cookies)], unique_id),
                unique_id,
            )
        )
    base = int(ipaddress.IPv4Address(CHECK_SOURCE_BASE))
    reply_lengths: set[int] = set()
    try:
        for i, (request, unique_id) in enumerate(requests):
            source = str(ipaddress.IPv4Address(base + i))
            reply_lengths.add(
                check_reply(host, ntp_port, session, request, unique_id, source)
            )
    except OSError as exc:
        raise NtsLoadError(f"authenticated check: {exc!r}") from None
    write_payload_file(out, [r for r, _ in requests])
    return {
        "ke_seconds": round(session.seconds, 4),
        "cookies": len(cookies),
        "cookie_bytes": sorted({len(c) for c in cookies}),
        "requests": count,
        "request_bytes": sorted({len(r) for r, _ in requests}),
        "reply_bytes": sorted(reply_lengths),
        "checked": count,
        "payload_file": str(out),
    }
