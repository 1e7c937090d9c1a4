"""Options parsing, usage errors, and the service makeService builds."""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.python import usage
from twisted.trial import unittest

from udptime.formats import encode_time
from udptime.listener import TimeListener
from udptime.listenspec import ListenSpec
from udptime.tap import Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionTests(unittest.TestCase):
    def test_defaults(self) -> None:
        self.assertEqual(parse().listeners, [ListenSpec("ctime", "", 20000)])

    def test_port_interface_format(self) -> None:
        self.assertEqual(
            parse("--port", "37", "--interface", "::", "--format", "time").listeners,
            [ListenSpec("time", "::", 37)],
        )
        self.assertEqual(
            parse("-p", "13", "-i", "127.0.0.1", "-f", "daytime").listeners,
            [ListenSpec("daytime", "127.0.0.1", 13)],
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
            options.listeners,
            [
                ListenSpec("ctime", "", 20000),
                ListenSpec("time", "127.0.0.1", 20037),
                ListenSpec("daytime", "::1", 20013),
            ],
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
        }
        for argv, message in bad.items():
            with self.assertRaises(usage.UsageError, msg=str(argv)) as caught:
                parse(*argv)
            self.assertIn(message, str(caught.exception), argv)
            self.assertNotIn("\n", str(caught.exception))


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
