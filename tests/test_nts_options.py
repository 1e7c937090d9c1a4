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
from udptime.nts.derivedkeys import derived_key_set
from udptime.nts.ke import (
    DEFAULT_KE_RATE_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    KeSettings,
    server_settings,
)
from udptime.nts.keyfile import KeyFileService
from udptime.nts.keysecret import KeySecretService
from udptime.nts.options import (
    KE_BACKLOG,
    KeService,
    nts_services,
    parse_ke_address,
    parse_ntp_server,
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
        self.assertEqual(nts.servers, (("ntp.example", None),))
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
            str(caught.exception),
            "--nts-ke needs an ntp listener (--listen ntp@...), or --nts-server "
            "naming the hosts that serve NTP",
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


SECRET = bytes(range(32))


class ServerListTests(unittest.TestCase):
    def test_parse(self) -> None:
        for text, expected in (
            ("ntp.example", ("ntp.example", None)),
            ("ntp.example:1123", ("ntp.example", 1123)),
            ("192.0.2.1:123", ("192.0.2.1", 123)),
            ("[2001:db8::1]:1123", ("2001:db8::1", 1123)),
            ("[2001:db8::1]", ("2001:db8::1", None)),
            ("2001:db8::1", ("2001:db8::1", None)),
        ):
            self.assertEqual(parse_ntp_server(text), expected, text)
        for text in ("", "a b", "host:", "host:x", "host:0", "host:70000", "[::1"):
            with self.assertRaises(ValueError, msg=text):
                parse_ntp_server(text)

    def test_choice_by_client_address(self) -> None:
        """Stable per client, spread over clients, and taking a server out
        moves only its own clients (rendezvous hashing)."""
        base = KeSettings(ntp_port=20123)
        servers = [("a.example", None), ("b.example", 1123), ("c.example", None)]
        clients = [f"192.0.2.{n}" for n in range(200)]
        chosen = {c: server_settings(base, servers, c) for c in clients}
        self.assertEqual(
            chosen, {c: server_settings(base, servers, c) for c in clients}
        )
        names = [s.ntp_server for s in chosen.values()]
        for name in ("a.example", "b.example", "c.example"):
            self.assertGreater(names.count(name), 30, name)
        for settings in chosen.values():
            expected = 1123 if settings.ntp_server == "b.example" else 20123
            self.assertEqual(settings.ntp_port, expected)
        without_b = [s for s in servers if s[0] != "b.example"]
        for client, settings in chosen.items():
            if settings.ntp_server != "b.example":
                self.assertEqual(server_settings(base, without_b, client), settings)
        self.assertIs(server_settings(base, [], "192.0.2.1"), base)


class RoleTests(unittest.TestCase):
    """NTS-KE only, NTS on NTP only, and the fleet secret instead of the file."""

    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="udptime-nts-roles-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.cert, self.key = make_certificate(self.dir)
        self.secret = self.dir / "fleet.secret"
        self.secret.write_text(SECRET.hex() + "\n")
        self.secret.chmod(0o600)

    def parse(self, *args: str) -> Config:
        options = Options()
        options.parseOptions(list(args))
        return options.config

    def ke(self, *args: str) -> list[str]:
        return [
            "--nts-ke",
            "127.0.0.1:0",
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
            *args,
        ]

    def test_ke_only(self) -> None:
        config = self.parse(
            "--listen",
            "daytime@127.0.0.1:0",
            *self.ke("--nts-key-secret", str(self.secret)),
            "--nts-keys",
            str(self.dir / "keys.json"),
            "--nts-server",
            "127.0.1.2:1123",
            "--nts-server",
            "ntp.example",
        )
        nts = config.nts
        assert nts is not None
        self.assertEqual(nts.servers, (("127.0.1.2", 1123), ("ntp.example", None)))
        self.assertEqual(Config.from_json(config.to_json()), config)
        services, cookies = nts_services(config, reactor, 123)
        keys, ke, _certificate = services
        assert isinstance(keys, KeySecretService) and isinstance(ke, KeService)
        self.assertEqual(ke.factory.ke.servers, nts.servers)
        keys.startService()
        self.addCleanup(keys.stopService)
        self.assertEqual(
            keys.holder.key_set,
            derived_key_set(SECRET, reactor.seconds(), rotate=nts.rotate),
        )
        self.assertIs(cookies, keys.holder)
        # The secret replaces the keys file: none is read or written.
        self.assertFalse((self.dir / "keys.json").exists())

    def test_ke_only_needs_servers(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--listen", "daytime@127.0.0.1:0", *self.ke())
        self.assertIn(
            "--nts-server naming the hosts that serve NTP", str(caught.exception)
        )

    def test_ntp_only(self) -> None:
        config = self.parse(
            "--listen", "ntp@127.0.0.1:0", "--nts", "--nts-key-secret", str(self.secret)
        )
        nts = config.nts
        assert nts is not None
        self.assertIsNone(nts.ke_port)
        self.assertIsNone(nts.tls_cert)
        self.assertEqual(Config.from_json(config.to_json()), config)
        services, cookies = nts_services(config, reactor, 123)
        self.assertEqual([s.name for s in services], ["nts-keys"])
        self.assertIsNotNone(cookies)

    def test_refused(self) -> None:
        bad_mode = self.dir / "open.secret"
        bad_mode.write_text(SECRET.hex())
        bad_mode.chmod(0o644)
        short = self.dir / "short.secret"
        short.write_text("abcd")
        short.chmod(0o600)
        ntp = ["--listen", "ntp@127.0.0.1:0"]
        cases = {
            ("--nts",): "--nts needs an ntp listener (--listen ntp@...)",
            (*ntp, "--nts-key-secret", str(self.secret)): (
                "--nts-key-secret: only used with --nts-ke or --nts"
            ),
            (*ntp, "--nts", "--tls-cert", str(self.cert)): (
                "--tls-cert: only used with --nts-ke"
            ),
            (
                *ntp,
                "--nts",
                "--nts-server",
                "x",
            ): "--nts-server: only used with --nts-ke",
            (*ntp, "--nts", "--nts-key-secret-accept", str(self.secret)): (
                "--nts-key-secret-accept needs --nts-key-secret"
            ),
        }
        for args, message in cases.items():
            with self.assertRaises(usage.UsageError, msg=args) as caught:
                self.parse(*args)
            self.assertEqual(str(caught.exception), message)
        for path, why in ((bad_mode, "mode 0644"), (short, "at least 32 bytes")):
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*ntp, "--nts", "--nts-key-secret", str(path))
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"--nts-key-secret {str(path)!r}: "))
            self.assertIn(why, message)
