"""The NTS-KE certificate: one clear line per bad file, dates, reloads."""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest

from udptime.nts.certificate import (
    CertificateError,
    CertificatePair,
    CertificateService,
    load_pair,
    validity_problem,
)
from udptime.nts.ke import context_for
from udptime.nts.testing import make_certificate

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


class LoadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udptime-cert-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.cert, self.key = make_certificate(self.directory)

    def message(self, cert: Path, key: Path) -> str:
        with self.assertRaises(CertificateError) as raised:
            load_pair(str(cert), str(key))
        text = str(raised.exception)
        self.assertNotIn("\n", text)
        return text

    def test_good_pair(self) -> None:
        pair = load_pair(str(self.cert), str(self.key))
        self.assertEqual(len(pair.chain), 1)
        self.assertIn("CN=localhost", pair.describe())
        context_for(pair)  # OpenSSL takes it too

    def test_key_and_chain_in_one_file(self) -> None:
        both = self.directory / "both.pem"
        both.write_bytes(self.key.read_bytes() + self.cert.read_bytes())
        load_pair(str(both), str(both))

    def test_missing(self) -> None:
        missing = self.directory / "nope.pem"
        self.assertEqual(
            self.message(missing, self.key),
            f"--tls-cert {str(missing)!r}: cannot read it: No such file or directory",
        )
        self.assertIn("--tls-key", self.message(self.cert, missing))

    def test_unreadable(self) -> None:
        if os.geteuid() == 0:
            # root reads anything: a directory is unreadable as a file for all
            text = self.message(self.cert, self.directory)
            self.assertIn("cannot read it: Is a directory", text)
            return
        os.chmod(self.key, 0)  # pragma: no cover - not root
        self.assertIn("Permission denied", self.message(self.cert, self.key))

    def test_not_pem(self) -> None:
        junk = self.directory / "junk.pem"
        junk.write_text("hello\n")
        self.assertIn("no PEM certificate", self.message(junk, self.key))
        self.assertIn("no usable PEM private key", self.message(self.cert, junk))
        # The certificate given as the key.
        self.assertIn("no usable PEM private key", self.message(self.cert, self.cert))

    def test_encrypted_key_never_prompts(self) -> None:
        other = self.directory / "enc"
        other.mkdir()
        cert, key = make_certificate(other, passphrase=b"secret")
        text = self.message(cert, key)
        self.assertIn("encrypted with a pass phrase", text)
        self.assertIn(str(key), text)

    def test_mismatched_pair(self) -> None:
        other = self.directory / "other"
        other.mkdir()
        _, other_key = make_certificate(other)
        text = self.message(self.cert, other_key)
        self.assertIn("is not the key of the certificate", text)


def pair_valid(
    directory: Path, start: datetime.datetime, end: datetime.datetime
) -> CertificatePair:
    cert, key = make_certificate(directory, valid_from=start, valid_until=end)
    return load_pair(str(cert), str(key))


class DateTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udptime-cert-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def test_problems(self) -> None:
        now = NOW.timestamp()
        expired = pair_valid(self.directory, NOW - 30 * DAY, NOW - DAY)
        self.assertIn("has expired", validity_problem(expired, now) or "")
        early = pair_valid(self.directory, NOW + DAY, NOW + 30 * DAY)
        self.assertIn("is not valid until", validity_problem(early, now) or "")
        soon = pair_valid(self.directory, NOW - DAY, NOW + 10 * DAY)
        self.assertIn("expires in 10.0 days", validity_problem(soon, now) or "")
        fine = pair_valid(self.directory, NOW - DAY, NOW + 15 * DAY)
        self.assertIsNone(validity_problem(fine, now))
        self.assertIsNotNone(validity_problem(fine, now, warn_days=20))


class ServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="udptime-cert-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.installed: list[CertificatePair] = []

    def service(self, pair: CertificatePair) -> CertificateService:
        svc = CertificateService(pair, self.installed.append, self.clock)
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def test_warns_at_start_and_while_running(self) -> None:
        pair = pair_valid(self.directory, NOW - DAY, NOW + 20 * DAY)
        with capturedLogs() as events:
            svc = self.service(pair)
            self.assertEqual(events, [])  # 20 days left: quiet
            self.clock.advance(5 * 86400)  # 15 left
            self.assertEqual(events, [])
            self.clock.advance(1.5 * 86400)  # 13.5 left: the next check warns
        self.assertEqual(len(events), 1)
        self.assertIn("expires in 13.", formatEvent(events[0]))
        self.assertEqual(svc.expiry, pair.not_after)

    def test_expired_at_start(self) -> None:
        pair = pair_valid(self.directory, NOW - 30 * DAY, NOW - DAY)
        with capturedLogs() as events:
            self.service(pair)
        self.assertEqual(len(events), 1)
        self.assertIn("has expired", formatEvent(events[0]))

    def test_reload(self) -> None:
        old = pair_valid(self.directory, NOW - DAY, NOW + 10 * DAY)
        svc = self.service(old)
        renewed = make_certificate(self.directory, valid_until=NOW + 90 * DAY)
        self.assertEqual(renewed, (Path(old.cert_path), Path(old.key_path)))
        outcome = svc.reload()
        self.assertIn("new handshakes present CN=localhost", outcome)
        self.assertEqual(len(self.installed), 1)
        self.assertEqual(svc.pair, self.installed[0])
        self.assertGreater(svc.expiry, old.not_after + 70 * 86400)

    def test_bad_reload_keeps_the_old(self) -> None:
        old = pair_valid(self.directory, NOW - DAY, NOW + 30 * DAY)
        svc = self.service(old)
        Path(old.key_path).write_text("not a key\n")
        with self.assertRaises(CertificateError):
            svc.reload()
        self.assertIs(svc.pair, old)
        self.assertEqual(self.installed, [])

    def test_install_failure_keeps_the_old(self) -> None:
        old = pair_valid(self.directory, NOW - DAY, NOW + 30 * DAY)

        def refuse(pair: CertificatePair) -> None:
            raise CertificateError("OpenSSL refuses them")

        svc = CertificateService(old, refuse, self.clock)
        with self.assertRaises(CertificateError):
            svc.reload()
        self.assertIs(svc.pair, old)
