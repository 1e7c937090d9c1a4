"""NTS end to end with NTPsec's ntpd as the client, and RFC 8915 corner
cases over real UDP against the real plugin.

NTPsec is an independent NTS implementation (chronyd is the other one the
suite talks to). Debian's ``ntpsec`` conflicts with ``chrony``, so it is
never installed: ``.ci/run`` unpacks the package into ``build/ntpsec/``
(``apt-get download`` + ``dpkg -x``), where this test finds ``ntpd``; the
``UDPTIME_NTPSEC_NTPD`` environment variable names another one. The test is
skipped only when there is no such binary (or when not root: ntpd always
binds port 123).

ntpd never disciplines the clock here: its configuration says ``disable
ntp`` and ``disable kernel``, and it runs without ``CAP_SYS_TIME``
(``setpriv`` drops it from the bounding and inheritable sets, so not even
root keeps it). It runs with the server in a private network namespace, so
its port 123 cannot collide with a foreign server's; the ports udptime uses
there are kernel-chosen. The offsets it measures are read from its
``peerstats`` file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from twisted.trial import unittest

from tests.support import REPO, twistd_command
from tests.test_nts_e2e import NtsServer
from tests.test_nts_support import ke_session, make_certificate, udp_exchange
from udptime.nts import extensions as ext
from udptime.nts.testing import client_header

NTPD_ENV = "UDPTIME_NTPSEC_NTPD"
BUILT_NTPD = REPO / "build" / "ntpsec" / "usr" / "sbin" / "ntpd"
#: ntpsec's peer status word: bit 0x2000 is CTL_PST_AUTHENTIC << 8.
AUTHENTIC = 0x2000
SAMPLES = 6


def ntpsec_ntpd() -> Path | None:
    """NTPsec's ntpd: the environment's, the one .ci/run unpacked, or the system's."""
    named = os.environ.get(NTPD_ENV)
    candidates = [Path(named)] if named else [BUILT_NTPD, Path("/usr/sbin/ntpd")]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            done = subprocess.run(
                [str(path), "--version"], capture_output=True, text=True, check=False
            )
            if "ntpsec" in done.stdout + done.stderr:
                return path
    return None


NTPD = ntpsec_ntpd()

_LO_UP = """
import fcntl, socket, struct
s = socket.socket()
ifreq = struct.pack("16sH14x", b"lo", 0)
flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 1))  # SIOCSIFFLAGS, UP
for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        print(probe.getsockname()[1])
"""


class Namespace:
    """A private network namespace (held by a sleeping process) to run in,
    or the host's when ``unshare`` is not there."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.holder: subprocess.Popen[bytes] | None = None
        if shutil.which("unshare") and shutil.which("nsenter"):
            self.holder = subprocess.Popen(
                ["unshare", "--net", "--", "sleep", "600"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            test.addCleanup(self.stop)
            self._wait_until_unshared()
        # Loopback up, and two kernel-chosen ports (UDP for NTP, TCP for KE).
        done = subprocess.run(
            self.command([sys.executable, "-c", _LO_UP]),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        self.ntp_port, self.ke_port = (int(x) for x in done.stdout.split())

    def _wait_until_unshared(self) -> None:
        """Popen returns before ``unshare`` has made the namespace: entering
        the holder's namespace before then would enter the host's."""
        assert self.holder is not None
        ours = os.readlink("/proc/self/ns/net")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if os.readlink(f"/proc/{self.holder.pid}/ns/net") != ours:
                    return
            except OSError:
                pass
            if self.holder.poll() is not None:
                raise AssertionError("unshare --net exited")
            time.sleep(0.01)
        raise AssertionError("unshare --net made no namespace within 10 s")

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.holder is None:
            return list(argv)
        return ["nsenter", "--target", str(self.holder.pid), "--net", "--", *argv]

    def stop(self) -> None:
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(5)


def start(
    test: unittest.TestCase, argv: list[str], log: Path
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    test.addCleanup(stop)
    return proc


def wait_for(
    what: str, ready: Callable[[], bool], deadline: float, *logs: Path
) -> None:
    """Poll *ready* until true; fail with the logs after *deadline*."""
    end = time.monotonic() + deadline
    while not ready():
        if time.monotonic() > end:
            text = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')}" for p in logs)
            raise AssertionError(f"{what} within {deadline} s\n{text}")
        time.sleep(0.1)


@dataclass(frozen=True)
class PeerStat:
    status: int
    offset: float
    delay: float


def peerstats(path: Path) -> list[PeerStat]:
    """ntpd's peerstats lines: MJD, seconds, peer, status (hex), offset, delay..."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6:
            out.append(PeerStat(int(parts[3], 16), float(parts[4]), float(parts[5])))
    return out


class NtpsecNtsTests(unittest.TestCase):
    """NTPsec's ntpd as an NTS client (NTS-KE, then authenticated NTP) of udptime."""

    skip = (
        f"no NTPsec ntpd (set {NTPD_ENV}, or run .ci/run to unpack it)"
        if NTPD is None
        else "ntpd binds port 123: run as root"
        if os.geteuid() != 0
        else None
    )

    def test_ntpsec_gets_authenticated_time_from_udptime(self) -> None:
        assert NTPD is not None
        workdir = Path(tempfile.mkdtemp(prefix="udptime-ntpsec-"))
        make_certificate(workdir)
        space = Namespace(self)
        server_log = workdir / "twistd.log"
        server = start(
            self,
            space.command(
                [
                    *twistd_command(),
                    "-n",
                    "--pidfile=",
                    "udptime",
                    "--listen",
                    f"ntp@127.0.0.1:{space.ntp_port}",
                    "--local-stratum",
                    "10",
                    "--nts-ke",
                    f"127.0.0.1:{space.ke_port}",
                    "--tls-cert",
                    str(workdir / "cert.pem"),
                    "--tls-key",
                    str(workdir / "key.pem"),
                    "--nts-keys",
                    str(workdir / "keys.json"),
                    "--verbose",
                ]
            ),
            server_log,
        )
        wait_for(
            "udptime did not serve NTS-KE",
            lambda: (
                server.poll() is None
                and "serving NTS-KE on TCP" in server_log.read_text(errors="replace")
            ),
            20,
            server_log,
        )
        stats = workdir / "stats"
        stats.mkdir()
        conf = workdir / "ntp.conf"
        # The certificate names localhost; NTS-KE tells ntpd the NTP port.
        conf.write_text(
            f"server localhost:{space.ke_port} nts ca {workdir / 'cert.pem'} "
            "iburst minpoll 0 maxpoll 0\n"
            "disable ntp\n"
            "disable kernel\n"
            f"statsdir {stats}/\n"
            "statistics peerstats\n"
            "filegen peerstats file peerstats type none enable\n"
        )
        ntpd_log = workdir / "ntpd.log"
        start(
            self,
            space.command(
                [
                    "setpriv",
                    "--bounding-set",
                    "-sys_time",
                    "--inh-caps",
                    "-sys_time",
                    "--",
                    str(NTPD),
                    "-n",
                    "-c",
                    str(conf),
                    "-l",
                    str(ntpd_log),
                    "-f",
                    str(workdir / "ntp.drift"),
                    "-p",
                    str(workdir / "ntpd.pid"),
                ]
            ),
            workdir / "ntpd.out",
        )
        wait_for(
            f"ntpd recorded fewer than {SAMPLES} samples",
            lambda: len(peerstats(stats / "peerstats")) >= SAMPLES,
            60,
            ntpd_log,
            server_log,
        )
        samples = peerstats(stats / "peerstats")
        log = ntpd_log.read_text(errors="replace")
        # It could not have set the clock: no CAP_SYS_TIME.
        self.assertIn("Operation not permitted", log)
        self.assertIn("NTSc: Got 8 cookies", log)
        for sample in samples:
            self.assertTrue(sample.status & AUTHENTIC, f"{sample.status:#06x}")
            # One host, one clock: the offset is our stamping error only.
            self.assertLess(abs(sample.offset), 0.010, samples)
        # And what udptime saw were NTS requests, each answered.
        served = server_log.read_text(errors="replace")
        answered = [line for line in served.splitlines() if "ntp request of" in line]
        self.assertGreaterEqual(len(answered), SAMPLES)
        for line in answered:
            size = int(line.split("ntp request of ")[1].split()[0])
            self.assertGreater(size, 48, line)
            self.assertTrue(line.endswith("answered"), line)


class WireConformanceTests(unittest.TestCase):
    """RFC 8915 corner cases as datagrams to ``twistd udptime`` with NTS on."""

    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-wire-"))
        self.server = NtsServer(self, directory)
        result = ke_session(self.server.ke_port, self.server.cert)
        self.keys = result.keys
        self.cookies = result.cookies

    def request(self, *, version: int = 4, extra_after: bytes = b"") -> bytes:
        header = bytes([version << 3 | 3]) + client_header()[1:]
        self.unique_id = os.urandom(32)
        request = ext.build_request(
            header,
            self.unique_id,
            self.cookies.pop(),
            AESSIV(self.keys.c2s),
            os.urandom(16),
        )
        return request + extra_after

    def test_unique_identifier_alone_is_echoed(self) -> None:
        field = ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        request = client_header() + ext.encode_field(0x2005, b"x" * 40) + field
        reply = udp_exchange(self.server.ntp_port, request)
        assert reply is not None
        self.assertEqual(reply[48:], field)
        self.assertEqual(reply[24:32], request[40:48])
        self.assertEqual((reply[0] & 7, reply[1]), (4, 10))

    def test_unauthenticated_field_after_the_authenticator_is_ignored(self) -> None:
        extra = ext.encode_field(0x2005, os.urandom(40))
        request = self.request(extra_after=extra)
        reply = udp_exchange(self.server.ntp_port, request)
        assert reply is not None
        opened = ext.open_response(reply, AESSIV(self.keys.s2c), self.unique_id)
        self.assertFalse(opened.nak)
        self.assertEqual(len(opened.cookies), 1)
        self.assertEqual(len(reply), len(request) - len(extra))

    def test_nts_in_an_ntpv3_header_is_dropped(self) -> None:
        self.assertIsNone(
            udp_exchange(self.server.ntp_port, self.request(version=3), timeout=0.5)
        )
        # The same request as NTPv4 is answered, authenticated.
        reply = udp_exchange(self.server.ntp_port, self.request())
        assert reply is not None
        ext.open_response(reply, AESSIV(self.keys.s2c), self.unique_id)
