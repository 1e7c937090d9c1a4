"""Foreign time servers on the well-known ports, to prove the tests own theirs.

Run as root while running tests::

    sudo .venv/bin/python tests/foreign_servers.py &
    .venv/bin/python -m pytest tests/test_e2e.py ...

It holds UDP 13, 37, 123 and 20000 and TCP 4460 on every address (IPv6 and
IPv4) and answers in each port's own format, but 25 years late (2001-09-09):
a test that reached one of them instead of its own server would see
plausible replies with the wrong time. Each datagram or connection is
counted and logged on standard error; SIGINT or SIGTERM prints the counts
as one JSON object and exits.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from types import FrameType

#: When the foreign servers think it is.
WRONG = 1_000_000_000.0
EPOCH_1900 = 2_208_988_800

UDP_PORTS = (13, 37, 123, 20000)
TCP_PORTS = (4460,)


def reply(port: int, datagram: bytes) -> bytes:
    """What a (wrong) server of each kind sends back."""
    if port == 13:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ\r\n", time.gmtime(WRONG)).encode()
    if port == 37:
        return int(WRONG + EPOCH_1900).to_bytes(4, "big")
    if port == 123:
        stamp = int(WRONG + EPOCH_1900).to_bytes(4, "big") + bytes(4)
        origin = datagram[40:48] if len(datagram) >= 48 else bytes(8)
        # LI 0, version 4, server mode; stratum 1, refid FRGN; the client's
        # transmit stamp as origin, so even a careful client would accept it.
        head = bytes([0x24, 1, 6, 0xEC]) + bytes(8) + b"FRGN"
        return head + stamp + origin + stamp + stamp
    return time.ctime(WRONG).encode()


def listening(kind: int, port: int) -> socket.socket:
    """A dual-stack socket on every address; exits if the port is taken."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("::", port))
    except OSError as exc:
        sys.exit(f"foreign_servers: cannot bind port {port}: {exc.strerror}")
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    sock.setblocking(False)
    return sock


def main() -> None:
    counts: Counter[str] = Counter()
    selector = selectors.DefaultSelector()
    for port in UDP_PORTS:
        selector.register(listening(socket.SOCK_DGRAM, port), selectors.EVENT_READ)
    for port in TCP_PORTS:
        selector.register(listening(socket.SOCK_STREAM, port), selectors.EVENT_READ)

    def stop(signum: int, frame: FrameType | None) -> None:
        print(json.dumps(dict(sorted(counts.items()))), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            port = sock.getsockname()[1]
            if sock.type == socket.SOCK_DGRAM:
                try:
                    datagram, addr = sock.recvfrom(65535)
                except OSError:
                    continue
                counts[f"udp/{port}"] += 1
                print(f"udp/{port} from {addr[0]} port {addr[1]}", file=sys.stderr)
                try:
                    sock.sendto(reply(port, datagram), addr)
                except OSError:
                    pass
            else:
                try:
                    conn, addr = sock.accept()
                except OSError:
                    continue
                counts[f"tcp/{port}"] += 1
                print(f"tcp/{port} from {addr[0]} port {addr[1]}", file=sys.stderr)
                with conn:
                    try:
                        conn.sendall(b"\x15\x03\x03\x00\x02\x02\x28")  # TLS alert
                    except OSError:
                        pass


if __name__ == "__main__":
    main()
