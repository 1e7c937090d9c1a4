"""Options parsing, usage errors, the config they build, and the service built from it."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.python import usage
from twisted.trial import unittest

from udptime import __version__
from udptime.config import Config, MetricsConfig
from udptime.formats import encode_time
from udptime.listener import TimeListener
from udptime.listenspec import ListenSpec
from udptime.tap import Options, WorkerRole, build_service, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionTests(unittest.TestCase):
    def test_defaults(self) -> None:
        self.assertEqual(parse().config.listeners, (ListenSpec("ctime", "", 20000),))

    def test_defaults_are_the_config_defaults(self) -> None:
        # The option table and the record agree on every default.
        self.assertEqual(parse().config, Config())

    def test_version_in_help(self) -> None:
        self.assertIn(f"udptime {__version__}", str(Options()))

    def test_port_interface_format(self) -> None:
        self.assertEqual(
            parse(
                "--port", "37", "--interface", "::", "--format", "time"
            ).config.listeners,
            (ListenSpec("time", "::", 37),),
        )
        self.assertEqual(
            parse("-p", "13", "-i", "127.0.0.1", "-f", "daytime").config.listeners,
            (ListenSpec("daytime", "127.0.0.1", 13),),
        )

    def test_listen_forms(self) -> None:
        options = parse(
            "--listen",
            "ctime@20000",
            "--listen",
            "time@127.0.0.1:20037",
            "--listen",
            "daytime@[::1]:20013",
            "--port",
            "9",
        )
        self.assertEqual(
            options.config.listeners,
            (
                ListenSpec("ctime", "", 20000),
                ListenSpec("time", "127.0.0.1", 20037),
                ListenSpec("daytime", "::1", 20013),
            ),
        )

    def test_usage_errors(self) -> None:
        bad = {
            ("--port", "65536"): "out of range",
            ("--port", "-1"): "out of range",
            ("--port", "http"): "must be a number",
            ("--format", "nope"): "unknown format 'nope'",
            ("--interface", "localhost"): "IPv4 or IPv6 address",
            ("--listen", "ctime"): "expected FORMAT@PORT",
            ("--listen", "@20000"): "expected FORMAT@PORT",
            ("--listen", "ctime@"): "expected FORMAT@PORT",
            ("--listen", "nope@20000"): "unknown format 'nope'",
            ("--listen", "ctime@::1:20000"): "brackets",
            ("--listen", "ctime@[::1]20000"): "[ADDRESS]:PORT",
            ("--listen", "ctime@[127.0.0.1]:20000"): "is not IPv6",
            ("--listen", "ctime@:20000"): "empty address",
            ("--listen", "ctime@127.0.0.1:99999"): "out of range",
            ("--listen", "ctime@host.example:1"): "IPv4 or IPv6 address",
            ("--listen", "ctime@1", "--listen", "time@1"): "address given twice",
            ("--workers", "2", "--listen", "ntp@systemd:0"): "systemd sockets",
        }
        for argv, message in bad.items():
            with self.assertRaises(usage.UsageError, msg=str(argv)) as caught:
                parse(*argv)
            self.assertIn(message, str(caught.exception), argv)
            self.assertNotIn("\n", str(caught.exception))
            # the option given first or last is the one the error is about
            self.assertTrue(
                str(caught.exception).startswith((argv[0], argv[-2])), caught.exception
            )

    def test_typed_values(self) -> None:
        config = parse(
            "--listen", "ntp@127.0.0.1:123", "--stratum", "3", "--local-stratum", "10",
            "--refid", "192.0.2.1", "--rate-limit", "off", "--loop-ports", "7, 9",
            "--allow", "::ffff:10.0.0.0/104", "--deny", "10.1.0.0/16", "--deny-kiss",
            "--metrics", "9100", "--workers", "3", "--receive-buffer", "0",
            "--no-batch", "--verbose", "--summary-interval", "0",
            "--rate-limit-leak", "4", "--rate-limit-table", "100",
        ).config  # fmt: skip
        self.assertEqual(config.ntp.stratum, 3)
        self.assertEqual(config.ntp.local_stratum, 10)
        self.assertEqual(config.ntp.refid, bytes([192, 0, 2, 1]))
        self.assertIsNone(config.policy.rate_limit)
        self.assertEqual(config.policy.loop_ports, frozenset({7, 9}))
        self.assertEqual([str(n) for n in config.policy.allow], ["10.0.0.0/8"])
        self.assertEqual([str(n) for n in config.policy.deny], ["10.1.0.0/16"])
        self.assertTrue(config.policy.deny_kiss)
        self.assertEqual((config.policy.leak, config.policy.table_size), (4, 100))
        self.assertEqual(config.metrics, MetricsConfig("127.0.0.1", 9100))
        self.assertEqual((config.workers, config.receive_buffer), (3, 0))
        self.assertEqual((config.batch, config.verbose), (False, True))
        self.assertEqual(config.summary_interval, 0)
        self.assertIsNone(config.nts)


#: A bad value for every option that takes one; the error must start with the
#: option's name. ``test_every_option_covered`` keeps this complete.
BAD_VALUES: dict[str, str] = {
    "--allow": "10.0.0.1/8",
    "--allow-file": "/nonexistent/allow.txt",
    "--deny-file": "",
    "--deny": "not-a-network",
    "--format": "nope",
    "--interface": "localhost",
    "--listen": "ctime@",
    "--local-stratum": "0",
    "--loop-ports": "7,x",
    "--metrics": "host:",
    "--nts-ke": "host:1",
    "--nts-ke-connections": "0",
    "--nts-ke-first-byte-timeout": "0",
    "--nts-ke-handshake-timeout": "-1",
    "--nts-ke-per-source": "0",
    "--nts-ke-rate-limit": "1",
    "--nts-ke-timeout": "inf",
    "--nts-keys": "",
    "--nts-key-secret": "",
    "--nts-key-secret-accept": "",
    "--nts-rotate": "0",
    "--nts-server": "has space",
    "--port": "65536",
    "--rate-limit": "fast",
    "--rate-limit-leak": "-1",
    "--rate-limit-table": "0",
    "--receive-buffer": "big",
    "--refid": "TOOLONG",
    "--roughtime-delegation": "",
    "--roughtime-key": "",
    "--roughtime-radius": "0",
    "--stratum": "16",
    "--summary-interval": "-5",
    "--tls-cert": "",
    "--tls-key": "",
    "--workers": "0",
}


class OptionNamedTests(unittest.TestCase):
    """Every option's bad value is a one-line UsageError starting with its name."""

    def test_every_option_covered(self) -> None:
        options = Options()
        takes_value = {f"--{o[:-1]}" for o in options.longOpt if o.endswith("=")}
        self.assertEqual(set(BAD_VALUES), takes_value)

    def test_workers_message(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse("--workers", "0")
        self.assertEqual(
            str(caught.exception), "--workers: expected a number >= 1, not '0'"
        )


def _bad_value_test(option: str, value: str) -> Callable[[OptionNamedTests], None]:
    def test(self: OptionNamedTests) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(option, value)
        message = str(caught.exception)
        self.assertTrue(
            message.startswith((f"{option}:", f"{option} {value!r}:")),
            message,
        )
        self.assertNotIn("\n", message)

    return test


for _option, _value in BAD_VALUES.items():
    setattr(
        OptionNamedTests,
        "test_" + _option.lstrip("-").replace("-", "_"),
        _bad_value_test(_option, _value),
    )


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.replies: defer.Deferred[bytes] = defer.Deferred()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.replies.callback(datagram)


class ServiceTests(unittest.TestCase):
    def test_one_listener_per_spec(self) -> None:
        service = makeService(
            parse("--listen", "ctime@127.0.0.1:0", "--listen", "time@[::1]:0"),
            reactor=reactor,
        )
        listeners = [s for s in service if isinstance(s, TimeListener)]
        self.assertEqual(len(listeners), 2)
        self.assertEqual(
            [s.name for s in listeners], ["ctime@127.0.0.1:0", "time@[::1]:0"]
        )

    @defer.inlineCallbacks
    def test_serves_after_privileged_start(self) -> Any:
        service = makeService(parse("--listen", "time@127.0.0.1:0"), reactor=reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        (listener,) = [s for s in service if isinstance(s, TimeListener)]
        client = Collector()
        port = cast(Any, reactor).listenUDP(0, client, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.write(b"", ("127.0.0.1", listener.bound_port))
        reply = yield client.replies
        self.assertEqual(len(reply), 4)
        self.assertLess(
            abs(
                int.from_bytes(reply, "big")
                - int.from_bytes(encode_time(reactor.seconds()), "big")
            ),
            3,
        )

    def test_address_in_use_is_one_line(self) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        service = makeService(
            parse("--listen", f"ctime@127.0.0.1:{port}"), reactor=reactor
        )
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        self.assertEqual(caught.exception.code, 1)


class RoleTests(unittest.TestCase):
    """The twistd process and a worker differ only as ``build_service`` says."""

    config = Config(
        listeners=(ListenSpec("time", "127.0.0.1", 0), ListenSpec("ctime", "", 0)),
        metrics=MetricsConfig("127.0.0.1", 0),
        workers=2,
    )

    def test_twistd_process(self) -> None:
        service = build_service(self.config, reactor)
        self.assertEqual(
            [type(s).__name__ for s in service],
            [
                "TimeListener",
                "TimeListener",
                "WorkerSupervisor",
                "SignalService",
                "MetricsService",
                "SummaryService",
            ],
        )
        self.assertIsNotNone(service.supervisor)
        for listener in service.listeners:
            self.assertEqual(listener.stats.worker, "0")
            self.assertIs(listener.protocol.latency, listener.stats.latency)

    def test_worker(self) -> None:
        sockets = []
        for _ in self.config.listeners:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sock.close)
            sockets.append(sock)
        service = build_service(
            self.config, reactor, worker=WorkerRole(3, tuple(sockets))
        )
        # no metrics, no supervisor: only listeners and the summary
        self.assertEqual(
            [type(s).__name__ for s in service],
            ["TimeListener", "TimeListener", "SignalService", "SummaryService"],
        )
        self.assertIsNone(service.supervisor)
        for listener in service.listeners:
            self.assertEqual(listener.stats.worker, "3")
            self.assertIsNone(listener.protocol.latency)

    def test_worker_needs_a_socket_per_listener(self) -> None:
        with self.assertRaises(ValueError):
            build_service(self.config, reactor, worker=WorkerRole(1, ()))
