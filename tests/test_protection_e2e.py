"""Protection end to end: floods, access lists, loops, least privilege.

Every flood here is bounded in count and time and aimed at loopback only.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from twisted.trial import unittest

from tests.support import (
    NetworkNamespace,
    Twistd,
    free_udp_port,
    poll_until_answered,
    query,
    twistd_command,
)
from udptime.formats import encode_ctime

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_from(
    source: str, port: int, count: int, payload: bytes = b""
) -> socket.socket:
    """*count* datagrams to 127.0.0.1:*port* from *source*; the socket keeps the replies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((source, 0))
    for _ in range(count):
        sock.sendto(payload, ("127.0.0.1", port))
    return sock


def drain(sock: socket.socket, quiet: float = 0.3) -> int:
    """Count replies until none has come for *quiet* seconds."""
    sock.settimeout(quiet)
    got = 0
    try:
        while True:
            sock.recv(2048)
            got += 1
    except TimeoutError:
        return got


def spoofed_udp(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """Send one UDP datagram with a forged IPv4 source (root, loopback only)."""
    assert dst[0].startswith("127.") and src[0].startswith("127.")
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(src[0]),
        socket.inet_aton(dst[0]),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (dst[0], 0))


def require_root() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root (CI runs as root)")


class FloodTests(unittest.TestCase):
    def test_defaults_limit_a_flood_and_serve_a_polite_client(self) -> None:
        port = free_udp_port()
        server = Twistd(self, ["udptime", "--listen", f"ctime@0.0.0.0:{port}"])
        poll_until_answered("127.0.0.1", port, process=server.process)
        polite_source = "127.0.0.77"
        start = time.monotonic()
        heavy = send_from("127.0.0.66", port, 2000)
        polite_answered = 0
        for _ in range(5):
            # A polite client retries, as the recipe advises: a flood can
            # overflow the server's receive queue and lose its datagram.
            for _try in range(3):
                answer = query("127.0.0.1", port, source=(polite_source, 0), timeout=1)
                if answer is not None:
                    polite_answered += 1
                    break
        heavy_got = drain(heavy)
        elapsed = time.monotonic() - start
        heavy.close()
        # Default 10/50: at most the burst plus the rate over the flood's life.
        self.assertLessEqual(heavy_got, 50 + 10 * elapsed + 1)
        self.assertGreaterEqual(heavy_got, 50)
        self.assertEqual(polite_answered, 5)

    def test_many_sources_bounded_table_and_memory(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"time@0.0.0.0:{port}",
                "--rate-limit",
                "5/5",
                "--rate-limit-table",
                "1000",
            ],
        )
        poll_until_answered("127.0.0.1", port, process=server.process)
        before = rss_kib(server.process.pid)
        # 4,000 distinct sources in 127.1.0.0/16, 3 datagrams each; every
        # 500th keeps its socket open so its replies can be counted.
        samples = []
        for n in range(4000):
            if n % 200 == 199:
                # Pace the flood: the server's queue is FIFO, so this reply
                # means every earlier datagram has been handled.
                poll_until_answered("127.0.0.1", port, deadline=10)
            sock = send_from(f"127.1.{n // 250}.{n % 250 + 1}", port, 3)
            if n % 500 == 0:
                samples.append(sock)
            else:
                sock.close()
        answered = 0
        for sock in samples:
            answered += drain(sock, quiet=1.0)
            sock.close()
        # a heavy source in the middle of it all stays limited
        heavy = send_from("127.2.0.1", port, 500)
        heavy_got = drain(heavy)
        heavy.close()
        self.assertLessEqual(heavy_got, 5 + 5 * 2)
        self.assertEqual(answered, 3 * 8)
        # Polite clients still served.
        self.assertIsNotNone(query("127.0.0.1", port, source=("127.3.0.1", 0)))
        after = rss_kib(server.process.pid)
        # 1,000 table entries are ~0.3 MB; leave room for allocator noise.
        self.assertLess(after - before, 8 * 1024, (before, after))


class AccessListTests(unittest.TestCase):
    def test_deny_wins_and_allow_restricts(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"daytime@0.0.0.0:{port}",
                "--allow",
                "127.0.0.0/24",
                "--deny",
                "127.0.0.9/32",
            ],
        )
        poll_until_answered("127.0.0.1", port, process=server.process)
        self.assertIsNotNone(query("127.0.0.1", port, source=("127.0.0.8", 0)))
        self.assertIsNone(
            query("127.0.0.1", port, source=("127.0.0.9", 0), timeout=0.3)
        )
        self.assertIsNone(
            query("127.0.0.1", port, source=("127.0.1.1", 0), timeout=0.3)
        )

    def test_ntp_deny_kiss(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"ntp@0.0.0.0:{port}",
                "--deny",
                "127.0.0.9/32",
                "--deny-kiss",
                "--local-stratum",
                "10",
            ],
        )
        request = bytes([0x23]) + bytes(39) + os.urandom(8)
        poll_until_answered("127.0.0.1", port, request, process=server.process)
        answer = query("127.0.0.1", port, request, source=("127.0.0.9", 0))
        assert answer is not None
        self.assertEqual(answer[0][1], 0)
        self.assertEqual(answer[0][12:16], b"DENY")
        self.assertEqual(answer[0][24:32], request[40:48])


class LoopTests(unittest.TestCase):
    def test_two_text_servers_do_not_ping_pong(self) -> None:
        require_root()
        port_a, port_b = free_udp_port(), free_udp_port()
        a = Twistd(self, ["udptime", "--listen", f"ctime@127.0.0.1:{port_a}", "-v"])
        b = Twistd(self, ["udptime", "--listen", f"daytime@127.0.0.1:{port_b}", "-v"])
        poll_until_answered("127.0.0.1", port_a, process=a.process)
        poll_until_answered("127.0.0.1", port_b, process=b.process)
        # A datagram that looks as if server A sent it to server B.
        spoofed_udp(("127.0.0.1", port_a), ("127.0.0.1", port_b), b"hello")
        deadline = time.monotonic() + 10
        pattern = f"from 127.0.0.1 port {port_b} ignored"
        while pattern not in a.log_text():
            self.assertLess(time.monotonic(), deadline, a.log_text())
            time.sleep(0.05)
        # B answered the forged datagram once; A heard a time reply and stayed
        # silent, so B never heard from A again.
        self.assertEqual(b.log_text().count(f"port {port_a} answered"), 1)
        self.assertEqual(a.log_text().count(f"port {port_b} answered"), 0)

    def test_echo_ports_and_port_zero_not_answered(self) -> None:
        require_root()
        port = free_udp_port()
        server = Twistd(self, ["udptime", "--listen", f"ctime@127.0.0.1:{port}", "-v"])
        poll_until_answered("127.0.0.1", port, process=server.process)
        for source_port in (0, 7, 13, 17, 19, 37):
            spoofed_udp(("127.0.0.5", source_port), ("127.0.0.1", port), b"x")
        spoofed_udp(("127.0.0.5", 40000), ("127.0.0.1", port), b"x")
        deadline = time.monotonic() + 10
        while "port 40000 answered" not in server.log_text():
            self.assertLess(time.monotonic(), deadline, server.log_text())
            time.sleep(0.05)
        log = server.log_text()
        for source_port in (0, 7, 13, 17, 19, 37):
            self.assertIn(
                f"127.0.0.5 port {source_port} refused by the loop guard", log
            )


class PrivilegeTests(unittest.TestCase):
    def test_uid_gid_drop_after_binding_port_37(self) -> None:
        require_root()
        # Port 37 in a namespace of our own: free, and only our server answers.
        namespace = NetworkNamespace(self)
        server = Twistd(
            self,
            [
                "--uid",
                "nobody",
                "--gid",
                "nogroup",
                "udptime",
                "--listen",
                "time@127.0.0.1:37",
            ],
            prefix=namespace.prefix,
        )
        namespace.poll_until_answered("127.0.0.1", 37, process=server.process)
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.MULTILINE)
        assert uids is not None
        import pwd

        nobody = pwd.getpwnam("nobody").pw_uid
        self.assertEqual({int(u) for u in uids.groups()}, {nobody})
        self.assertLess(server.terminate(), 1.0)

    def test_systemd_socket_activation(self) -> None:
        self.assertIsNotNone(
            SOCKET_ACTIVATE, "systemd-socket-activate missing: .ci/run installs systemd"
        )
        assert SOCKET_ACTIVATE is not None
        port = free_udp_port()
        proc = subprocess.Popen(
            [
                SOCKET_ACTIVATE,
                "--datagram",
                "-l",
                f"127.0.0.1:{port}",
                *twistd_command(),
                "-n",
                "--pidfile=",
                "udptime",
                "--listen",
                "ctime@systemd:0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            proc.terminate()
            proc.wait(5)

        self.addCleanup(stop)
        # The first datagram makes systemd-socket-activate start udptime,
        # which then finds that datagram waiting on the adopted socket.
        reply = poll_until_answered("127.0.0.1", port, deadline=20)
        self.assertEqual(len(reply), len(encode_ctime(time.time())))

    def test_systemd_listen_without_sockets_is_a_clean_error(self) -> None:
        server = Twistd(self, ["udptime", "--listen", "ctime@systemd:0"])
        self.assertNotEqual(server.wait(30), 0)
        self.assertIn("no sockets were passed", server.log_text())
        self.assertNotIn("Traceback", server.log_text())
