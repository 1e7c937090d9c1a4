"""NTS end to end: real twistd with NTS-KE, chronyd as an NTS client, and
hand-made hostile clients (old TLS, wrong ALPN, forged packets, floods)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from OpenSSL import SSL
from twisted.trial import unittest

from tests.support import Twistd, free_udp_port, poll_until_answered
from tests.test_nts_support import (
    client_header,
    free_tcp_port,
    ke_session,
    make_certificate,
    nts_request,
    udp_exchange,
)
from udptime.nts import extensions as ext
from udptime.nts import records as rec
from udptime.nts.cookies import MasterKey, cookie_key_id, decode_keys_file

CHRONYD = shutil.which("chronyd") or "/usr/sbin/chronyd"
OFFSET = re.compile(r"System clock wrong by (-?\d+\.\d+) seconds")


class NtsServer:
    """``twistd -n udptime ... --nts-ke ...``: the real plugin with NTS on."""

    def __init__(
        self,
        test: unittest.TestCase,
        directory: Path,
        *,
        ntp_port: int | None = None,
        ke_port: int | None = None,
        keys: Path | None = None,
        extra: tuple[str, ...] = (),
        twistd_args: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.cert = directory / "cert.pem"
        if not self.cert.exists():
            make_certificate(directory)
        self.ntp_port = ntp_port or free_udp_port()
        self.ke_port = ke_port or free_tcp_port()
        self.keys = keys or directory / "keys.json"
        options = [
            "--listen",
            f"ntp@127.0.0.1:{self.ntp_port}",
            "--local-stratum",
            "10",
            "--rate-limit",
            "off",
            "--nts-ke",
            f"127.0.0.1:{self.ke_port}",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(directory / "key.pem"),
            "--nts-keys",
            str(self.keys),
            *extra,
        ]
        self.twistd = Twistd(test, [*twistd_args, "udptime", *options])
        poll_until_answered(
            "127.0.0.1",
            self.ntp_port,
            client_header(),
            process=self.twistd.process,
        )
        deadline = time.monotonic() + 10
        while "serving NTS-KE on TCP" not in self.twistd.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"no NTS-KE listener:\n{self.twistd.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.twistd.terminate()

    def key_ids(self) -> set[int]:
        return {key.key_id for key in decode_keys_file(self.keys.read_bytes())}


def chronyd_nts(
    server_line: str,
    cert: Path,
    dump: Path,
    *,
    timeout: int = 20,
    maxsamples: int = 4,
    debug: bool = False,
) -> tuple[float | None, str]:
    """chronyd -Q (never disciplining the clock) as an NTS client of the
    ``server`` line *server_line*: the offset it prints (or None), its output."""
    workdir = Path(tempfile.mkdtemp(prefix="udptime-chrony-nts-"))
    try:
        conf = workdir / "chrony.conf"
        conf.write_text(
            f"server {server_line} nts iburst minpoll -6 maxpoll -6 "
            f"maxsamples {maxsamples}\n"
            f"ntstrustedcerts {cert}\n"
            f"ntsdumpdir {dump}\n"
            f"pidfile {workdir}/chronyd.pid\n"
            "cmdport 0\n"
        )
        done = subprocess.run(
            [CHRONYD, "-Q", *(["-d"] if debug else []), "-f", str(conf)]
            + ["-t", str(timeout), "-u", "root"],
            capture_output=True,
            check=False,
            timeout=timeout + 40,
            text=True,
        )
    finally:
        shutil.rmtree(workdir, True)
    output = done.stdout + done.stderr
    found = OFFSET.search(output)
    return (float(found.group(1)) if found else None), output


def run_chronyd(
    server: NtsServer, dump: Path, *, ke_port: int | None = None, timeout: int = 20
) -> tuple[float | None, str]:
    """chronyd -Q against *server* over NTS: the offset it prints (or None)."""
    line = f"127.0.0.1 port {server.ntp_port} ntsport {ke_port or server.ke_port}"
    return chronyd_nts(line, server.cert, dump, timeout=timeout)


def dumped_cookies(dump: Path) -> list[bytes]:
    """The cookies chronyd saved for 127.0.0.1 (its NNC0 dump format)."""
    lines = (dump / "127.0.0.1.nts").read_text().splitlines()
    assert lines[0] == "NNC0", lines[:1]
    # identifier, name, context time, address + port, context (id aead s2c c2s)
    return [bytes.fromhex(line) for line in lines[5:] if line]


class ChronyNtsTests(unittest.TestCase):
    """chronyd 4.x, an independent NTS implementation, against udptime."""

    def test_chronyd_nts_and_cookies_survive_restart(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-e2e-"))
        dump = directory / "chrony-dump"
        dump.mkdir(mode=0o700)
        first = NtsServer(self, directory)

        offset, output = run_chronyd(first, dump)
        self.assertIsNotNone(offset, output)
        assert offset is not None
        # One host, one clock: what chronyd measures is our stamping error,
        # plus the reply's encryption after the transmit stamp.
        self.assertLess(abs(offset), 500e-6, f"offset {offset * 1e6:.1f} us")
        cookies = dumped_cookies(dump)
        self.assertGreater(len(cookies), 0)
        # They are ours: sealed under a key in our keys file.
        self.assertTrue({cookie_key_id(c) for c in cookies} <= first.key_ids())
        first.stop()

        # Same keys file, same NTP port, NTS-KE moved away: chronyd still
        # dials the old KE port, where nothing listens, so only the cookies
        # it saved can get it authenticated replies.
        elsewhere = free_tcp_port()
        while elsewhere == first.ke_port:
            elsewhere = free_tcp_port()
        second = NtsServer(
            self, directory, ntp_port=first.ntp_port, ke_port=elsewhere, keys=first.keys
        )
        offset, output = run_chronyd(second, dump, ke_port=first.ke_port)
        self.assertIsNotNone(offset, f"saved cookies refused after restart:\n{output}")
        self.assertNotIn("Could not connect", output)  # no NTS-KE was tried
        second.stop()

        # Control: a server with fresh keys cannot open those cookies (NTS
        # NAK), and with no NTS-KE to fall back on chronyd gets no time.
        fresh = NtsServer(
            self,
            directory,
            ntp_port=first.ntp_port,
            ke_port=elsewhere,
            keys=directory / "other.json",
        )
        offset, output = run_chronyd(fresh, dump, ke_port=first.ke_port, timeout=6)
        self.assertIsNone(offset, output)
        fresh.stop()


class KeEndToEndTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udptime-nts-e2e-"))
        self.server = NtsServer(self, self.directory, extra=("--verbose",))

    def session(self) -> tuple[ext.NtsReply, bytes, bytes]:
        """KE, then one authenticated NTS exchange: (reply, request, unique id)."""
        result = ke_session(self.server.ke_port, self.server.cert)
        self.assertEqual(result.records[0], rec.next_protocol([0]))
        self.assertEqual(result.records[1], rec.aead_algorithm([15]))
        self.assertIn(rec.ntpv4_port(self.server.ntp_port), result.records)
        self.assertEqual(len(result.cookies), 8)
        self.keys = result.keys
        self.cookies = result.cookies
        unique_id = os.urandom(32)
        request = nts_request(result.keys, result.cookies[0], unique_id, placeholders=2)
        reply = udp_exchange(self.server.ntp_port, request)
        assert reply is not None
        opened = ext.open_response(reply, AESSIV(result.keys.s2c), unique_id)
        return opened, request, reply

    def test_ke_then_authenticated_ntp(self) -> None:
        opened, request, reply = self.session()
        self.assertFalse(opened.nak)
        self.assertEqual(len(opened.cookies), 3)
        self.assertEqual(len(reply), len(request))
        self.assertEqual(reply[1], 10)
        self.assertEqual(reply[24:32], request[40:48])
        # A cookie from the reply works in turn.
        unique_id = os.urandom(32)
        again = udp_exchange(
            self.server.ntp_port, nts_request(self.keys, opened.cookies[0], unique_id)
        )
        assert again is not None
        self.assertFalse(ext.open_response(again, AESSIV(self.keys.s2c), unique_id).nak)
        # Plain NTP is still served on the same port.
        plain = udp_exchange(self.server.ntp_port, client_header())
        assert plain is not None
        self.assertEqual(len(plain), 48)
        self.assertEqual(plain[1], 10)

    def assertNak(self, reply: bytes | None, request: bytes, unique_id: bytes) -> None:
        assert reply is not None
        self.assertEqual(reply[1], 0)
        self.assertEqual(reply[12:16], b"NTSN")
        self.assertEqual(reply[24:32], request[40:48])
        self.assertTrue(ext.open_response(reply, AESSIV(self.keys.s2c), unique_id).nak)

    def test_tampered_authenticator_nak(self) -> None:
        self.session()
        unique_id = os.urandom(32)
        request = bytearray(nts_request(self.keys, self.cookies[1], unique_id))
        request[-5] ^= 0x80
        reply = udp_exchange(self.server.ntp_port, bytes(request))
        self.assertNak(reply, bytes(request), unique_id)

    def test_unknown_key_cookie_nak(self) -> None:
        self.session()
        stranger = MasterKey(0xDEADBEEF, os.urandom(64), time.time())
        cookie = stranger.seal(self.keys, os.urandom(16))
        unique_id = os.urandom(32)
        request = nts_request(self.keys, cookie, unique_id)
        self.assertNak(udp_exchange(self.server.ntp_port, request), request, unique_id)

    def test_cookie_for_other_keys_nak(self) -> None:
        """A genuine cookie with an authenticator made with the wrong key."""
        self.session()
        unique_id = os.urandom(32)
        request = ext.build_request(
            client_header(),
            unique_id,
            self.cookies[2],
            AESSIV(self.keys.s2c),  # S2C instead of C2S
            os.urandom(16),
        )
        self.assertNak(udp_exchange(self.server.ntp_port, request), request, unique_id)

    def test_tls12_refused(self) -> None:
        context = ssl.create_default_context(cafile=str(self.server.cert))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["ntske/1"])
        with (
            socket.create_connection(("127.0.0.1", self.server.ke_port), 5) as sock,
            self.assertRaises(ssl.SSLError),
            context.wrap_socket(sock, server_hostname="localhost"),
        ):
            pass

    def test_tls13_with_python_ssl(self) -> None:
        """Python's ssl (no key export) still completes a session."""
        context = ssl.create_default_context(cafile=str(self.server.cert))
        context.set_alpn_protocols(["ntske/1"])
        request = rec.encode_records(
            [rec.next_protocol([0]), rec.aead_algorithm([15]), rec.end_of_message()]
        )
        with (
            socket.create_connection(("127.0.0.1", self.server.ke_port), 5) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            self.assertEqual(tls.version(), "TLSv1.3")
            self.assertEqual(tls.selected_alpn_protocol(), "ntske/1")
            tls.sendall(request)
            raw = b""
            while chunk := tls.recv(4096):
                raw += chunk
        parsed = rec.parse_message(raw)
        assert parsed is not None
        self.assertEqual(len([r for r in parsed[0] if r.type == rec.NEW_COOKIE]), 8)

    def test_wrong_alpn_refused(self) -> None:
        with self.assertRaises(SSL.Error):
            ke_session(self.server.ke_port, self.server.cert, alpn=[b"http/1.1"])

    def test_no_alpn_closed(self) -> None:
        try:
            result = ke_session(self.server.ke_port, self.server.cert, alpn=[])
        except SSL.Error:
            return
        self.assertEqual(result.raw, b"")

    def test_oversized_request_closed(self) -> None:
        result = ke_session(
            self.server.ke_port,
            self.server.cert,
            rec.Record(0x1234, bytes(1100)).encode(),
        )
        self.assertEqual(result.raw, b"")
        self.assertEqual(result.records, [])
        # The server is fine afterwards.
        self.assertEqual(
            len(ke_session(self.server.ke_port, self.server.cert).cookies), 8
        )

    def test_bad_request_gets_error(self) -> None:
        request = rec.encode_records(
            [
                rec.Record(0x3000, b"", True),
                rec.next_protocol([0]),
                rec.end_of_message(),
            ]
        )
        result = ke_session(self.server.ke_port, self.server.cert, request)
        self.assertEqual(result.records, [rec.error(0), rec.end_of_message()])

    def test_keys_file_private(self) -> None:
        self.session()
        self.assertEqual(os.stat(self.server.keys).st_mode & 0o777, 0o600)
        document = json.loads(self.server.keys.read_text())
        self.assertEqual(document["format"], "udptime-nts-keys")


class KeLimitsEndToEndTests(unittest.TestCase):
    def test_per_source_rate_limit(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-e2e-"))
        server = NtsServer(self, directory, extra=("--nts-ke-rate-limit", "0.01/2"))
        for _ in range(2):
            self.assertEqual(len(ke_session(server.ke_port, server.cert).cookies), 8)
        with self.assertRaises((SSL.Error, OSError)):
            ke_session(server.ke_port, server.cert, timeout=3)
        self.assertIn("rate limit", server.twistd.log_text())

    def test_session_timeout(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-e2e-"))
        server = NtsServer(self, directory, extra=("--nts-ke-timeout", "0.5"))
        with socket.create_connection(("127.0.0.1", server.ke_port), 5) as sock:
            sock.settimeout(5)
            start = time.monotonic()
            try:
                self.assertEqual(sock.recv(100), b"")  # no handshake needed
            except ConnectionResetError:
                pass  # aborted: a reset is as good as a close
            self.assertLess(time.monotonic() - start, 3)
