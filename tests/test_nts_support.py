"""Helpers for the NTS tests (no tests here): UDP queries and free ports, and
what :mod:`udptime.nts.testing` gives (certificates, a blocking NTS-KE client,
NTS requests) under the names the tests import from here."""

from __future__ import annotations

import socket

from udptime.nts.testing import (
    client_header,
    default_request,
    ke_session,
    make_certificate,
    nts_request,
)

__all__ = [
    "client_header",
    "default_request",
    "free_tcp_port",
    "ke_session",
    "make_certificate",
    "nts_request",
    "udp_exchange",
]


def udp_exchange(port: int, datagram: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(datagram, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
