"""NTS command-line options, their checks, and the services they build."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.python import usage
from twisted.trial import unittest

from tests.test_nts_support import make_certificate
from udptime.config import Config, NtsConfig
from udptime.ntp import ServerState
from udptime.nts.certificate import CertificateService
from udptime.nts.cookies import DEFAULT_ROTATE
from udptime.nts.ke import DEFAULT_KE_RATE_LIMIT, DEFAULT_MAX_CONNECTIONS
from udptime.nts.keyfile import KeyFileService
from udptime.nts.options import (
    KE_BACKLOG,
    KeService,
    nts_services,
    parse_ke_address,
)
from udptime.nts.responder import NtsResponder
from udptime.policy import RateLimit
from udptime.responders.ntp import NtpResponder
from udptime.tap import Options


def with_nts(config: Config, **changes: Any) -> Config:
    assert config.nts is not None
    return dataclasses.replace(config, nts=dataclasses.replace(config.nts, **changes))


class AddressTests(unittest.TestCase):
    def test_good(self) -> None:
        self.assertEqual(parse_ke_address("4460"), ("", 4460))
        self.assertEqual(parse_ke_address("127.0.0.1:4460"), ("127.0.0.1", 4460))
        self.assertEqual(parse_ke_address("[::1]:4460"), ("::1", 4460))
        self.assertEqual(parse_ke_address("[::]:0"), ("::", 0))

    def test_bad(self) -> None:
        for text in (
            "host:1",
            ":4460",
            "::1:4460",
            "[::1]4460",
            "99999",
            "[1.2.3.4]:1",
            "x",
        ):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_ke_address(text)
            self.assertTrue(str(caught.exception).startswith(f"--nts-ke {text!r}: "))


class CheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="udptime-nts-options-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cert, self.key = make_certificate(self.dir)
        self.keys = self.dir / "keys.json"

    def parse(self, *args: str) -> Config:
        options = Options()
        options.parseOptions(["--listen", "ntp@127.0.0.1:0", *args])
        return options.config

    def nts(self, *args: str) -> list[str]:
        return [
            "--nts-ke",
            "127.0.0.1:0",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
            "--nts-keys",
            str(self.keys),
            *args,
        ]

    def test_off_by_default(self) -> None:
        config = self.parse()
        self.assertIsNone(config.nts)
        self.assertEqual(nts_services(config, reactor, 123), ([], None))

    def test_defaults(self) -> None:
        self.assertEqual(
            self.parse(*self.nts()).nts,
            NtsConfig(
                ke_host="127.0.0.1",
                ke_port=0,
                tls_cert=str(self.cert),
                tls_key=str(self.key),
                keys_file=str(self.keys),
                server_name=None,
                rotate=DEFAULT_ROTATE,
                ke_rate_limit=DEFAULT_KE_RATE_LIMIT,
                ke_connections=DEFAULT_MAX_CONNECTIONS,
            ),
        )

    def test_on(self) -> None:
        options = self.parse(
            *self.nts(
                "--nts-server",
                "ntp.example",
                "--nts-rotate",
                "3600",
                "--nts-ke-rate-limit",
                "1/5",
                "--nts-ke-connections",
                "7",
                "--nts-ke-timeout",
                "2.5",
                "--nts-ke-first-byte-timeout",
                "0.5",
                "--nts-ke-handshake-timeout",
                "1.5",
                "--nts-ke-per-source",
                "2",
            )
        )
        nts = options.nts
        assert nts is not None
        self.assertEqual((nts.ke_host, nts.ke_port), ("127.0.0.1", 0))
        self.assertEqual(nts.rotate, 3600.0)
        self.assertEqual(nts.ke_rate_limit, RateLimit(1.0, 5))
        self.assertEqual(nts.ke_connections, 7)
        self.assertEqual(nts.ke_timeout, 2.5)
        self.assertEqual(
            (nts.ke_first_byte_timeout, nts.ke_handshake_timeout), (0.5, 1.5)
        )
        self.assertEqual(nts.ke_per_source, 2)
        ke = nts_services(options, reactor, 123)[0][1]
        assert isinstance(ke, KeService)
        self.assertEqual(
            (ke.factory.ke.first_byte_timeout, ke.factory.ke.handshake_timeout),
            (0.5, 1.5),
        )
        slots = ke.factory.slots
        self.assertEqual((slots.total, slots.per_address, slots.per_network), (7, 2, 8))
        self.assertEqual(nts.server_name, "ntp.example")
        off = self.parse(*self.nts("--nts-ke-rate-limit", "off")).nts
        assert off is not None
        self.assertIsNone(off.ke_rate_limit)

    def test_refused_combinations(self) -> None:
        bad = [
            ["--tls-cert", str(self.cert)],
            ["--nts-server", "x"],
            ["--nts-ke", "4460"],
            ["--nts-ke", "4460", "--tls-cert", str(self.cert)],
            self.nts("--nts-server", "has space"),
            self.nts("--nts-server", ""),
            self.nts("--nts-rotate", "0"),
            self.nts("--nts-rotate", "nan"),
            self.nts("--nts-rotate", "soon"),
            self.nts("--nts-ke-connections", "0"),
            self.nts("--nts-ke-connections", "many"),
            self.nts("--nts-ke-rate-limit", "fast"),
            self.nts("--nts-keys", str(self.dir / "missing" / "keys.json")),
            self.nts("--nts-keys", ""),
            self.nts("--tls-cert", str(self.dir / "nope.pem")),
            self.nts("--tls-key", str(self.cert)),
            self.nts("--nts-ke-first-byte-timeout", "0"),
            self.nts("--nts-ke-handshake-timeout", "soon"),
            self.nts("--nts-ke-per-source", "0"),
        ]
        for args in bad:
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                self.parse(*args)
            # every message starts with an option it is about
            self.assertRegex(str(caught.exception), r"^--[a-z-]+[ :,]", args)

    def test_cross_option_messages(self) -> None:
        bad = {
            ("--tls-cert", str(self.cert)): "--tls-cert: only used with --nts-ke",
            ("--tls-key", "k", "--nts-server", "x"): (
                "--tls-key, --nts-server: only used with --nts-ke"
            ),
            ("--nts-ke", "4460"): "--nts-ke needs --tls-cert and --tls-key",
        }
        for args, message in bad.items():
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                self.parse(*args)
            self.assertEqual(str(caught.exception), message)

    def test_corrupt_keys_file(self) -> None:
        self.keys.write_bytes(b"{}")
        with self.assertRaises(usage.UsageError) as caught:
            self.parse(*self.nts())
        self.assertTrue(str(caught.exception).startswith("--nts-keys "))

    def test_needs_an_ntp_listener(self) -> None:
        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--listen", "time@127.0.0.1:0", *self.nts()])
        self.assertEqual(
            str(caught.exception), "--nts-ke needs an ntp listener (--listen ntp@...)"
        )

    def test_services(self) -> None:
        options = self.parse(*self.nts())
        services, cookies = nts_services(options, reactor, 20123)
        self.assertEqual(
            [s.name for s in services], ["nts-keys", "nts-ke", "nts-certificate"]
        )
        keys, ke, certificate = services
        assert isinstance(keys, KeyFileService) and isinstance(ke, KeService)
        assert isinstance(certificate, CertificateService)
        assert cookies is not None
        local = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", None)
        ntp = NtpResponder(lambda: local, lambda: 0)
        self.assertIsInstance(NtsResponder(ntp, cookies), NtsResponder)
        top = MultiService()
        for service in services:
            service.setServiceParent(top)
        top.privilegedStartService()
        self.assertFalse(self.keys.exists())  # not before privileges drop
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(stat.S_IMODE(os.stat(self.keys).st_mode), 0o600)
        self.assertEqual(len(keys.holder.key_set.keys), 2)  # current and next
        self.assertIs(ke.factory.ke.keys, keys.holder)
        self.assertGreater(ke.bound_port, 0)
        self.assertEqual(ke.kwargs["backlog"], KE_BACKLOG)
        # A reload installs the pair where new handshakes take their context.
        context = ke.factory.creator.context
        self.assertIn("new handshakes present CN=localhost", certificate.reload())
        self.assertIsNot(ke.factory.creator.context, context)

    def test_unusable_keys_file_at_start(self) -> None:
        options = self.parse(*self.nts())
        services, _ = nts_services(options, reactor, 123, serve_ke=False)
        self.keys.write_bytes(b"garbage")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            services[0].startService()
        self.assertIn(f"udptime: NTS keys file {self.keys}: ", stderr.getvalue())

    def test_unreadable_tls_key_at_service_time(self) -> None:
        options = with_nts(self.parse(*self.nts()), tls_key=str(self.dir / "gone.pem"))
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            nts_services(options, reactor, 123)
        self.assertEqual(
            stderr.getvalue(),
            f"udptime: --tls-key {str(self.dir / 'gone.pem')!r}: cannot read it: "
            "No such file or directory\n",
        )

    def test_workers_get_no_ke(self) -> None:
        options = self.parse(*self.nts())
        services, cookies = nts_services(options, reactor, 123, serve_ke=False)
        self.assertEqual([s.name for s in services], ["nts-keys"])
        self.assertIsNotNone(cookies)

    def test_bind_failure_is_one_line(self) -> None:
        options = self.parse(*self.nts())
        first, _ = nts_services(options, reactor, 123)
        first[1].privilegedStartService()
        self.addCleanup(first[1].stopService)
        assert isinstance(first[1], KeService)
        options = with_nts(options, ke_port=first[1].bound_port)
        second, _ = nts_services(options, reactor, 123)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit):
            second[1].privilegedStartService()
        self.assertIn("udptime: cannot listen on TCP 127.0.0.1:", stderr.getvalue())
        self.assertIn("(NTS-KE)", stderr.getvalue())
