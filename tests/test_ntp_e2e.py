"""NTP end to end: real twistd, real clients (ntplib from PyPI, chronyd from Debian)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile

import ntplib
from twisted.trial import unittest

from tests.support import Twistd, free_udp_port, poll_until_answered, query
from udptime.clockstate import read_kernel_clock
from udptime.mmsg import libc as mmsg_libc
from udptime.ntp import to_ntp

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
OFFSET = re.compile(r"System clock wrong by (-?\d+\.\d+) seconds")


def client_request(version: int = 4, transmit: bytes = b"") -> bytes:
    """A 48-byte client (mode 3) request with the given transmit timestamp."""
    transmit = transmit or os.urandom(8)
    return bytes([version << 3 | 3]) + bytes(39) + transmit


def start_ntp(test: unittest.TestCase, *extra: str) -> int:
    port = free_udp_port()
    server = Twistd(
        test,
        ["udptime", "--listen", f"ntp@127.0.0.1:{port}", "--rate-limit", "off", *extra],
    )
    poll_until_answered("127.0.0.1", port, client_request(), process=server.process)
    return port


def chrony_offset(port: int, samples: int = 8) -> float:
    """The offset chronyd measures against 127.0.0.1:*port*, in seconds.

    ``chronyd -Q`` prints how wrong it thinks the system clock is against the
    server without touching it; the server shares this host's clock, so the
    true offset is zero and what it prints is the server's stamping error.
    """
    workdir = tempfile.mkdtemp(prefix="udptime-chrony-")
    try:
        conf = os.path.join(workdir, "chrony.conf")
        with open(conf, "w") as f:
            f.write(
                f"server 127.0.0.1 port {port} iburst minpoll -6 maxpoll -6 "
                f"maxsamples {samples}\n"
                f"pidfile {workdir}/chronyd.pid\ncmdport 0\n"
            )
        done = subprocess.run(
            [CHRONYD, "-Q", "-f", conf, "-t", "20", "-u", "root"],
            capture_output=True,
            check=False,
            timeout=60,
            text=True,
        )
    finally:
        shutil.rmtree(workdir, True)
    found = OFFSET.search(done.stdout + done.stderr)
    if not found:
        raise AssertionError(f"chronyd reported no offset:\n{done.stdout}{done.stderr}")
    return float(found.group(1))


class NtplibTests(unittest.TestCase):
    def test_local_stratum(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        client = ntplib.NTPClient()
        for version in (3, 4):
            stats = client.request("127.0.0.1", port=port, version=version, timeout=2)
            self.assertEqual(stats.mode, 4)
            self.assertEqual(stats.version, version)
            self.assertEqual(stats.stratum, 10)
            self.assertEqual(stats.ref_id, int.from_bytes(b"LOCL", "big"))
            self.assertEqual(stats.leap, 0)
            self.assertLess(abs(stats.offset), 0.005)
            self.assertGreater(stats.tx_time, stats.recv_time - 1e-6)

    def test_origin_is_our_transmit_bit_for_bit(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        for transmit in (os.urandom(8), bytes(8), b"\xff" * 8, to_ntp(2**32 + 0.5)):
            answer = query("127.0.0.1", port, client_request(4, transmit), timeout=2)
            assert answer is not None
            reply = answer[0]
            self.assertEqual(len(reply), 48)
            self.assertEqual(reply[24:32], transmit)
            self.assertEqual(reply[0] & 7, 4)

    def test_extension_fields_ignored_reply_stays_48(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        answer = query("127.0.0.1", port, client_request() + bytes(20) + b"\x01" * 28)
        assert answer is not None
        self.assertEqual(len(answer[0]), 48)

    def test_oversized_requests(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        answer = query("127.0.0.1", port, client_request() + bytes(1000))
        assert answer is not None
        self.assertEqual(len(answer[0]), 48)
        big = query("127.0.0.1", port, client_request() + bytes(3000), 0.3)
        if mmsg_libc.available():
            # Longer than the fast path's 2,048-byte slots: never half-read.
            self.assertIsNone(big)
        else:
            self.assertIsNotNone(big)

    def test_other_modes_ignored(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        for mode in (1, 2, 4, 5, 6, 7):
            request = bytes([4 << 3 | mode]) + bytes(47)
            self.assertIsNone(query("127.0.0.1", port, request, timeout=0.3), mode)
        self.assertIsNone(query("127.0.0.1", port, client_request()[:47], timeout=0.3))

    def test_clock_state_without_local_stratum(self) -> None:
        port = start_ntp(self)
        stats = ntplib.NTPClient().request("127.0.0.1", port=port, version=4, timeout=2)
        kernel = read_kernel_clock()
        if kernel is None or not kernel.synchronised:
            # An unsynchronised kernel clock is advertised as such.
            self.assertEqual((stats.leap, stats.stratum), (3, 16))
        else:
            self.assertEqual(stats.stratum, 2)
            self.assertIn(stats.leap, (0, 1, 2))
            self.assertAlmostEqual(
                stats.root_dispersion, kernel.maxerror / 1e6, delta=1 / 2**16
            )


class ChronyClientTests(unittest.TestCase):
    """chronyd, an independent implementation, accepts udptime as a source."""

    def test_chronyd_accepts_and_measures_small_offset(self) -> None:
        port = start_ntp(self, "--local-stratum", "10")
        offset = chrony_offset(port)
        # One host, one clock: the true offset is 0. The server stamps the
        # kernel's receive time and reads the clock just before sending, so
        # what chronyd sees is well inside 20 microseconds when idle.
        self.assertLess(abs(offset), 20e-6, f"offset {offset * 1e6:.1f} us")

    def test_chronyd_rejects_unsynchronised_server(self) -> None:
        port = start_ntp(self)
        kernel = read_kernel_clock()
        if kernel is not None and kernel.synchronised:
            raise unittest.SkipTest("kernel clock is synchronised here")
        with self.assertRaises(AssertionError):
            chrony_offset(port, samples=2)


class KissTests(unittest.TestCase):
    def test_rate_kiss_once_per_period(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            ["udptime", "--listen", f"ntp@127.0.0.1:{port}", "--rate-limit", "0.01/2"],
        )
        poll_until_answered("127.0.0.1", port, client_request(), process=server.process)
        replies = []
        for _ in range(6):
            answer = query("127.0.0.1", port, client_request(), timeout=0.3)
            if answer is not None:
                replies.append(answer[0])
        kisses = [r for r in replies if r[1] == 0]
        # One more normal reply fits the burst of 2 (the poll used the
        # first); after that the source is limited: exactly one RATE kiss.
        self.assertEqual(len(replies) - len(kisses), 1)
        self.assertEqual(len(kisses), 1)
        self.assertEqual(kisses[0][12:16], b"RATE")
        self.assertEqual(kisses[0][0] >> 6, 3)
        self.assertGreaterEqual(struct.unpack("!b", kisses[0][2:3])[0], 6)
