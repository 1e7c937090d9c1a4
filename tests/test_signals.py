"""Signals: SIGHUP reloads access-list files, SIGUSR1/SIGUSR2 harm nothing.

Units with plain values, then a real twistd with --workers 2 that is sent
every signal a service manager or log rotator would send.
"""

from __future__ import annotations

import ipaddress
import re
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial import unittest

from tests.support import Twistd
from udptime.aclfiles import AclFiles, parse_acl
from udptime.policy import ANSWER, DENY, Policy
from udptime.signals import SignalService

LOCAL = socket.inet_aton("127.0.0.1")


class ParseTests(unittest.TestCase):
    def test_comments_blanks_and_networks(self) -> None:
        text = "# office\n192.0.2.0/24  # lab\n\n  2001:db8::/32\n"
        self.assertEqual(
            parse_acl(text, "f"),
            (
                ipaddress.ip_network("192.0.2.0/24"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
        )

    def test_bad_line_is_named(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_acl("10.0.0.0/8\nnot a network\n", "deny.txt")
        self.assertIn("deny.txt line 2", str(caught.exception))


class AclFilesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.deny = self.dir / "deny.txt"
        self.deny.write_text("# nothing yet\n")
        self.policy = Policy(rate_limit=None)
        self.files = AclFiles([self.policy], (), (), None, str(self.deny))
        self.files.apply(*self.files.lists())

    def admit(self) -> object:
        return self.policy.admit(LOCAL, 4000, 0.0, False, False)

    def test_reload_applies_a_changed_file(self) -> None:
        self.assertIs(self.admit(), ANSWER)
        self.assertEqual(self.files.reload(), "access lists unchanged")
        self.deny.write_text("127.0.0.0/8\n")
        self.assertIn("deny file 0 -> 1", self.files.reload())
        self.assertIs(self.admit(), DENY)

    def test_bad_file_keeps_the_lists_in_force(self) -> None:
        self.deny.write_text("127.0.0.0/8\n")
        self.files.reload()
        self.deny.write_text("127.0.0.0/33\n")
        self.assertRaises(ValueError, self.files.reload)
        self.assertIs(self.admit(), DENY)
        self.deny.unlink()
        self.assertRaises(ValueError, self.files.reload)
        self.assertIs(self.admit(), DENY)

    def test_reload_drops_newly_refused_sources_from_the_table(self) -> None:
        policy = Policy()  # rate limited: admitted sources enter the table
        files = AclFiles([policy], (), (), None, str(self.deny))
        self.assertIs(policy.admit(LOCAL, 4000, 0.0, False, False), ANSWER)
        self.deny.write_text("127.0.0.1\n")
        files.reload()
        self.assertIs(policy.admit(LOCAL, 4000, 0.1, False, False), DENY)


class Events:
    def __init__(self, test: unittest.TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]


class SignalServiceTests(unittest.TestCase):
    def test_sighup_runs_every_reloader_and_survives_a_bad_one(self) -> None:
        log = Events(self)
        calls: list[str] = []

        def broken() -> str:
            raise ValueError("bad file")

        def one() -> str:
            calls.append("one")
            return "fine"

        passed_on: list[int] = []
        service = SignalService(
            Clock(),
            {"one": one, "two": broken},
            also=[passed_on.append],
        )
        service.handle(signal.SIGHUP)
        self.assertEqual(calls, ["one"])
        self.assertEqual(passed_on, [signal.SIGHUP])
        texts = log.texts()
        self.assertIn("SIGHUP: one: fine", texts)
        self.assertIn("SIGHUP: two not reloaded, keeping the old: bad file", texts)

    def test_usr_signals_are_logged_and_ignored(self) -> None:
        log = Events(self)
        service = SignalService(Clock(), {"x": lambda: "reloaded"})
        service.handle(signal.SIGUSR1)
        service.handle(signal.SIGUSR2)
        self.assertEqual(service.reloads, 0)
        self.assertIn("SIGUSR2 received: ignored (SIGHUP reloads)", log.texts())

    def test_handlers_installed_while_running_only(self) -> None:
        before = signal.getsignal(signal.SIGHUP)
        service = SignalService(Clock())
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), before)
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


def answers(port: int, tries: int = 8) -> int:
    """How many of *tries* queries from fresh source ports got a reply."""
    got = 0
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            sock.sendto(b"", ("127.0.0.1", port))
            try:
                sock.recvfrom(100)
            except TimeoutError:
                continue
            got += 1
    return got


def wait_for(twistd: Twistd, pattern: str, count: int = 1, within: float = 15.0) -> str:
    end = time.monotonic() + within
    while time.monotonic() < end:
        text = twistd.log_text()
        if len(re.findall(pattern, text)) >= count:
            return text
        if twistd.process.poll() is not None:
            raise AssertionError(f"twistd exited:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in the log:\n{twistd.log_text()}")


class SignalsEndToEndTests(unittest.TestCase):
    def test_workers_survive_signals_and_reload_the_deny_file(self) -> None:
        directory = Path(tempfile.mkdtemp())
        deny = directory / "deny.txt"
        deny.write_text("192.0.2.0/24\n")
        twistd = Twistd(
            self,
            [
                "udptime",
                "--listen",
                "ctime@127.0.0.1:0",
                "--workers",
                "2",
                "--rate-limit",
                "off",
                "--deny-file",
                str(deny),
            ],
        )
        text = wait_for(twistd, r"worker 1 started as pid")
        port = int(re.findall(r"serving ctime on UDP 127\.0\.0\.1 port (\d+)", text)[0])
        wait_for(twistd, rf"serving ctime on UDP 127\.0\.0\.1 port {port}", count=2)
        self.assertEqual(answers(port), 8)

        for number in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            twistd.process.send_signal(number)
        # The parent and the worker each reload once.
        wait_for(twistd, r"SIGHUP: access lists: access lists unchanged", count=2)
        self.assertIsNone(twistd.process.poll())
        self.assertEqual(answers(port), 8)

        deny.write_text("192.0.2.0/24\n127.0.0.0/8\n")
        twistd.process.send_signal(signal.SIGHUP)
        wait_for(twistd, r"deny file 1 -> 2 networks", count=2)
        self.assertEqual(answers(port), 0)

        deny.write_text("127.0.0.0/33\n")
        twistd.process.send_signal(signal.SIGHUP)
        wait_for(twistd, r"access lists not reloaded, keeping the old", count=2)
        self.assertEqual(answers(port), 0)
        self.assertIsNone(twistd.process.poll())
        twistd.terminate()
