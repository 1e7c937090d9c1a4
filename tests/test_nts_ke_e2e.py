"""The NTS-KE server as operators meet it, end to end with real twistd: bad
certificates at start-up, a renewal by SIGHUP while NTP is being served,
the key-exchange counters, and a legitimate client served while silent
connections try to take every slot."""

from __future__ import annotations

import datetime
import json
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.trial import unittest

from tests.support import Twistd, free_udp_port
from tests.test_metrics import scrape
from tests.test_nts_e2e import NtsServer
from tests.test_nts_support import (
    client_header,
    default_request,
    free_tcp_port,
    ke_session,
    make_certificate,
)
from udptime.nts import records as rec
from udptime.nts.ke import ALPN

T = TypeVar("T")


def wait_for_log(server: NtsServer, text: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := server.twistd.log_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{log}")
        time.sleep(0.05)
    return log


class CertificateStartupTests(unittest.TestCase):
    """Each broken set-up: exit 1 before serving, with one line that names the
    file and says what is wrong (no OpenSSL error tuple, no prompt)."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udptime-ke-cert-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.cert, self.key = make_certificate(self.directory)

    def refused(self, cert: Path, key: Path) -> str:
        """The one line twistd ends with when refusing *cert*/*key*."""
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"ntp@127.0.0.1:{free_udp_port()}",
                "--nts-ke",
                f"127.0.0.1:{free_tcp_port()}",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                "--nts-keys",
                str(self.directory / "keys.json"),
            ],
        )
        # Never waits for a pass phrase or anything else: out within seconds.
        self.assertEqual(server.wait(30), 1)
        output = server.log_text()
        self.assertNotIn("Traceback", output)
        self.assertNotIn("routines", output)  # OpenSSL's error tuples
        self.assertNotIn("Enter PEM pass phrase", output)
        mentions = [
            line for line in output.splitlines() if "--tls-" in line and "'" in line
        ]
        self.assertEqual(len(mentions), 1, output)
        return mentions[0]

    def test_missing_file(self) -> None:
        missing = self.directory / "gone.pem"
        line = self.refused(missing, self.key)
        self.assertIn(
            f"--tls-cert {str(missing)!r}: cannot read it: No such file or directory",
            line,
        )

    def test_encrypted_key(self) -> None:
        secret = self.directory / "secret"
        secret.mkdir()
        cert, key = make_certificate(secret, passphrase=b"hunter2")
        line = self.refused(cert, key)
        self.assertIn(f"--tls-key {str(key)!r}: the key is encrypted", line)

    def test_mismatched_pair(self) -> None:
        other = self.directory / "other"
        other.mkdir()
        _, other_key = make_certificate(other)
        line = self.refused(self.cert, other_key)
        self.assertIn(
            f"--tls-key {str(other_key)!r} is not the key of the certificate in "
            f"--tls-cert {str(self.cert)!r}",
            line,
        )

    def test_expired_certificate_served_with_a_warning(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        make_certificate(
            self.directory,
            valid_from=now - datetime.timedelta(days=90),
            valid_until=now - datetime.timedelta(days=1),
        )
        server = NtsServer(self, self.directory)
        log = server.twistd.log_text()
        warnings = [line for line in log.splitlines() if "has expired" in line]
        self.assertEqual(len(warnings), 1, log)
        self.assertIn(str(self.cert), warnings[0])
        self.assertIn("renew it and send SIGHUP", warnings[0])
        # Which is what clients then see.
        with self.assertRaises(SSL.Error) as raised:
            ke_session(server.ke_port, server.cert, timeout=5)
        self.assertIn("certificate verify failed", str(raised.exception))


def der(cert: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


def expiry(cert: Path) -> float:
    return x509.load_pem_x509_certificate(
        cert.read_bytes()
    ).not_valid_after_utc.timestamp()


class NtpPoller:
    """Queries the NTP port one request at a time until stopped, from a thread,
    counting what is sent and what is answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3.0)
            sock.connect(("127.0.0.1", self.port))
            while not self._stop.is_set():
                request = client_header()
                sock.send(request)
                self.sent += 1
                try:
                    while True:
                        reply = sock.recv(1024)
                        if reply[24:32] == request[40:48]:
                            self.answered += 1
                            break
                except TimeoutError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class TlsSession:
    """An NTS-KE connection whose handshake is done now and request sent later."""

    def __init__(self, port: int, cafile: Path) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(str(cafile))
        context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        context.set_alpn_protos([ALPN])
        self.sock = socket.create_connection(("127.0.0.1", port), 5)
        self.sock.setblocking(False)
        self.tls = SSL.Connection(context, self.sock)
        self.tls.set_tlsext_host_name(b"localhost")
        self.tls.set_connect_state()
        self._until_done(self.tls.do_handshake)

    def _until_done(self, step: Callable[[], T]) -> T:
        deadline = time.monotonic() + 5
        while True:
            try:
                return step()
            except SSL.WantReadError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("NTS-KE server silent") from None
                select.select([self.sock], [], [], left)

    def exchange(self) -> list[rec.Record]:
        self.tls.sendall(default_request())
        raw = b""
        try:
            while chunk := self._until_done(lambda: self.tls.recv(65536)):
                raw += chunk
        except SSL.ZeroReturnError:
            pass
        finally:
            self.sock.close()
        parsed = rec.parse_message(raw)
        assert parsed is not None, raw
        return parsed[0]


class ReloadTests(unittest.TestCase):
    def test_sighup_renewal(self) -> None:
        """A renewed pair is served to new handshakes after SIGHUP; a session
        begun before finishes; no NTP query goes unanswered meanwhile; a bad
        pair afterwards is refused and the renewed one kept; the counters and
        the expiry gauge say so."""
        directory = Path(tempfile.mkdtemp(prefix="udptime-ke-reload-"))
        self.addCleanup(shutil.rmtree, directory, True)
        metrics = free_tcp_port()
        server = NtsServer(self, directory, extra=("--metrics", str(metrics)))
        old_der = der(server.cert)
        self.assertEqual(
            ke_session(server.ke_port, server.cert).peer_certificate, old_der
        )
        # Two failures to count: a wrong ALPN and a TLS 1.2 client.
        with self.assertRaises(SSL.Error):
            ke_session(server.ke_port, server.cert, alpn=[b"http/1.1"])
        context = ssl.create_default_context(cafile=str(server.cert))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            socket.create_connection(("127.0.0.1", server.ke_port), 5) as sock,
            self.assertRaises(ssl.SSLError),
            context.wrap_socket(sock, server_hostname="localhost"),
        ):
            pass

        in_flight = TlsSession(server.ke_port, server.cert)
        poller = NtpPoller(server.ntp_port)
        self.addCleanup(poller.stop)
        # An ACME client's renewal: new files moved into place.
        renewal = directory / "renewal"
        renewal.mkdir()
        new_cert, new_key = make_certificate(
            renewal,
            valid_until=datetime.datetime.now(datetime.UTC)
            + datetime.timedelta(days=90),
        )
        os.replace(new_key, directory / "key.pem")
        os.replace(new_cert, server.cert)
        server.twistd.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "SIGHUP: NTS certificate: new handshakes present")
        renewed = ke_session(server.ke_port, server.cert)
        self.assertEqual(renewed.peer_certificate, der(server.cert))
        self.assertNotEqual(renewed.peer_certificate, old_der)
        cookies = [r for r in in_flight.exchange() if r.type == rec.NEW_COOKIE]
        self.assertEqual(len(cookies), 8)

        # A bad pair (the key of another certificate) is refused, the renewed
        # one kept.
        stranger = directory / "stranger"
        stranger.mkdir()
        _, stranger_key = make_certificate(stranger)
        shutil.copy(stranger_key, directory / "key.pem")
        server.twistd.process.send_signal(signal.SIGHUP)
        log = wait_for_log(server, "NTS certificate not reloaded, keeping the old")
        refusal = next(line for line in log.splitlines() if "not reloaded" in line)
        self.assertIn("is not the key of the certificate", refusal)
        kept = ke_session(server.ke_port, server.cert)
        self.assertEqual(kept.peer_certificate, renewed.peer_certificate)

        poller.stop()
        self.assertGreater(poller.sent, 0)
        self.assertEqual(poller.answered, poller.sent)
        print(f"\n{poller.sent} NTP queries across two reloads", file=sys.stderr)

        samples = scrape(metrics)
        self.assertEqual(
            samples[("udptime_nts_certificate_expiry_timestamp_seconds", ())],
            expiry(server.cert),
        )
        self.assertEqual(samples[("udptime_nts_ke_sessions_total", ())], 4)
        failed = {
            dict(labels)["reason"]: value
            for (name, labels), value in samples.items()
            if name == "udptime_nts_ke_failed_total"
        }
        self.assertEqual(failed["alpn"], 1)
        self.assertEqual(failed["tls"], 1)
        self.assertEqual(sum(failed.values()), 2)


#: Silent sources: more than the server's 100 connection slots.
FLOOD_SOURCES = [f"127.0.{1 + n // 200}.{1 + n % 200}" for n in range(110)]
LEGITIMATE_SOURCE = "127.0.9.1"
FLOOD_WINDOW = 20.0
#: python -c FLOOD_SCRIPT PORT SECONDS SOURCE...: prints the FloodReport, JSON
FLOOD_SCRIPT = """
import json, sys
from udptime.nts.testing import silent_flood
port, seconds, sources = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
print(json.dumps(silent_flood("127.0.0.1", port, sources, seconds).__dict__))
"""


class StarvationTests(unittest.TestCase):
    def flood(
        self, rate_limit: str, window: float, sources: Callable[[int], str]
    ) -> tuple[list[float], dict[str, float], dict[str, int]]:
        """A legitimate NTS-KE every 0.2 s, from ``sources(n)`` for the n-th,
        for *window* seconds while 110 silent sources cycle: how long each
        took, the failure counters, the flood's report."""
        directory = Path(tempfile.mkdtemp(prefix="udptime-ke-flood-"))
        self.addCleanup(shutil.rmtree, directory, True)
        metrics = free_tcp_port()
        server = NtsServer(
            self,
            directory,
            extra=("--nts-ke-rate-limit", rate_limit, "--metrics", str(metrics)),
        )
        flood = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FLOOD_SCRIPT,
                str(server.ke_port),
                str(window + 8),
                *FLOOD_SOURCES,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(flood.kill)
        # The flood has filled the server once it refuses or pushes out.
        wait_for_log(server, "NTS-KE: 127.0.")

        durations: list[float] = []
        end = time.monotonic() + window
        while time.monotonic() < end:
            start = time.monotonic()
            result = ke_session(
                server.ke_port,
                server.cert,
                source=sources(len(durations)),
                timeout=5,
                strict=True,
            )
            durations.append(time.monotonic() - start)
            self.assertEqual(len(result.cookies), 8)
            time.sleep(0.2)  # pacing, not synchronisation
        self.assertIsNone(flood.poll(), "the flood ended before the window did")
        samples = scrape(metrics)
        output, _ = flood.communicate(timeout=60)
        report = json.loads(output)

        slow = [round(d, 3) for d in durations if d >= 1.0]
        self.assertGreaterEqual(len(durations), window)
        self.assertEqual(
            slow, [], f"{len(slow)} of {len(durations)} key exchanges took 1 s or more"
        )
        # The flood did press on the server: its connections were closed and
        # remade many times over.
        self.assertGreater(report["closed"], len(FLOOD_SOURCES))
        self.assertEqual(report["failed"], 0)
        failed = {
            dict(labels)["reason"]: value
            for (name, labels), value in samples.items()
            if name == "udptime_nts_ke_failed_total"
        }
        self.assertEqual(samples[("udptime_nts_ke_sessions_total", ())], len(durations))
        print(
            f"\n{len(durations)} key exchanges during the flood, slowest "
            f"{max(durations) * 1000:.0f} ms; flood: {report}, failed: {failed}",
            file=sys.stderr,
        )
        return durations, failed, report

    def test_legitimate_client_served_during_a_silent_flood(self) -> None:
        """With 110 silent sources cycling, a legitimate client completes
        NTS-KE in under 1 s, every time, over 20 s.

        Each source holds one TCP connection that never sends a byte and
        reconnects as soon as the server closes it. The rate limit is off, so
        only the deadlines, the caps and eviction stand between the flood and
        the 100 slots.
        """
        _, failed, _ = self.flood("off", FLOOD_WINDOW, lambda n: LEGITIMATE_SOURCE)
        self.assertGreater(failed["cap"], 0)  # evictions

    def test_with_the_default_rate_limit(self) -> None:
        """The same flood against the default per-source rate limit: sources
        over it are refused at connect and reconnect at once, a storm of
        SYNs the listen queue must absorb without dropping a real client's
        (a dropped SYN is resent after a second). Real clients do NTS-KE
        about once a day, so each exchange here comes from its own address."""
        _, failed, _ = self.flood(
            "0.2/20", FLOOD_WINDOW / 2, lambda n: f"127.0.9.{1 + n % 250}"
        )
        self.assertGreater(failed["rate"], 0)
