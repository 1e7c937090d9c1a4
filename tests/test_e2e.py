"""End to end: real twistd processes on loopback, real UDP."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

from twisted.trial import unittest

from tests.support import (
    REPO,
    NetworkNamespace,
    Twistd,
    poll_until_answered,
    query,
    twistd_command,
)
from udptime.formats import EPOCH_1900_TO_1970

CTIME = re.compile(rb"^[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}$")
DAYTIME = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\r\n$")

# The client from the recipe, verbatim (it needs the server on port 20000).
RECIPE_CLIENT = """
from socket import socket, AF_INET, SOCK_DGRAM
s = socket(AF_INET, SOCK_DGRAM)
s.sendto(b'', ('localhost', 20000))
print(s.recvfrom(8192))
"""


def assert_seconds_near(test: unittest.TestCase, reply: bytes) -> None:
    seconds = int.from_bytes(reply, "big")
    now = (int(time.time()) + EPOCH_1900_TO_1970) % 2**32
    test.assertLess(abs(seconds - now), 3)


class RecipeClientTests(unittest.TestCase):
    """The recipe's client dials port 20000, so server and client both run in
    a private network namespace: there port 20000 is ours, and no server the
    machine runs on 20000 can answer in our place."""

    def check_recipe_client(
        self, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        namespace = NetworkNamespace(self)
        server = Twistd(self, args, env=env, prefix=namespace.prefix)
        namespace.poll_until_answered("127.0.0.1", 20000, process=server.process)
        self.assertIn("serving ctime on UDP 0.0.0.0 port 20000", server.log_text())
        printed = namespace.run([sys.executable, "-c", RECIPE_CLIENT]).stdout
        data, addr = eval(printed)  # the snippet prints a (bytes, address) tuple
        self.assertRegex(data, CTIME)
        self.assertEqual(addr, ("127.0.0.1", 20000))
        served = time.mktime(time.strptime(data.decode("ascii")))
        self.assertLess(abs(served - time.time()), 3)
        self.assertLess(server.terminate(), 1.0)

    def test_plugin_default(self) -> None:
        self.check_recipe_client(["udptime", "--port", "20000"])

    def test_tac_default(self) -> None:
        self.check_recipe_client(["-y", "udptime.tac"], env={"UDPTIME_OPTIONS": ""})


class PluginTests(unittest.TestCase):
    def test_every_format_and_startup_lines(self) -> None:
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                "ctime@127.0.0.1:0",
                "--listen",
                "daytime@127.0.0.1:0",
                "--listen",
                "time@127.0.0.1:0",
            ],
        )
        ports = server.serving(3)
        self.assertRegex(
            poll_until_answered("127.0.0.1", ports[0], process=server.process), CTIME
        )
        self.assertRegex(poll_until_answered("127.0.0.1", ports[1]), DAYTIME)
        assert_seconds_near(self, poll_until_answered("127.0.0.1", ports[2]))
        log = server.log_text()
        for name, port in zip(("ctime", "daytime", "time"), ports):
            self.assertIn(f"serving {name} on UDP 127.0.0.1 port {port}", log)
        self.assertLess(server.terminate(), 1.0)

    def test_ipv6_loopback(self) -> None:
        server = Twistd(
            self, ["udptime", "--interface", "::1", "--port", "0", "-f", "daytime"]
        )
        (port,) = server.serving()
        self.assertRegex(
            poll_until_answered("::1", port, process=server.process), DAYTIME
        )
        self.assertLess(server.terminate(), 1.0)

    def test_ipv6_any_serves_ipv4_too(self) -> None:
        server = Twistd(
            self, ["udptime", "--interface", "::", "--port", "0", "-f", "time"]
        )
        (port,) = server.serving()
        assert_seconds_near(
            self, poll_until_answered("::1", port, process=server.process)
        )
        answer = query("127.0.0.1", port)
        self.assertIsNotNone(answer)

    def test_large_datagram_answered(self) -> None:
        server = Twistd(self, ["udptime", "--listen", "time@127.0.0.1:0"])
        (port,) = server.serving()
        poll_until_answered("127.0.0.1", port, process=server.process)
        answer = query("127.0.0.1", port, b"\0" * 65_507, timeout=2)
        self.assertIsNotNone(answer)
        assert answer is not None
        assert_seconds_near(self, answer[0])

    def test_tac_reads_environment(self) -> None:
        server = Twistd(
            self,
            ["-y", "udptime.tac"],
            env={"UDPTIME_OPTIONS": "--port 0 --interface 127.0.0.1 --format time"},
        )
        (port,) = server.serving()
        assert_seconds_near(
            self, poll_until_answered("127.0.0.1", port, process=server.process)
        )


class UsageErrorTests(unittest.TestCase):
    """Bad command lines end twistd non-zero with one clear line, no traceback."""

    def run_twistd(
        self, *args: str, env: dict[str, str] | None = None
    ) -> tuple[int, str]:
        server = Twistd(self, list(args), env=env)
        code = server.wait(30)
        return code, server.log_text()

    def assert_clean_failure(
        self, message: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        code, output = self.run_twistd(*args, env=env)
        self.assertNotEqual(code, 0)
        self.assertIn(message, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if message in line]
        self.assertEqual(len(lines), 1, output)

    def test_port_out_of_range(self) -> None:
        self.assert_clean_failure(
            "port 70000 is out of range 0-65535", "udptime", "--port", "70000"
        )

    def test_unknown_format(self) -> None:
        self.assert_clean_failure(
            "unknown format 'bogus'", "udptime", "--format", "bogus"
        )

    def test_error_names_its_option(self) -> None:
        self.assert_clean_failure(
            "--workers: expected a number >= 1, not '0'", "udptime", "--workers", "0"
        )

    def test_malformed_listen(self) -> None:
        self.assert_clean_failure(
            "expected FORMAT@PORT", "udptime", "--listen", "ctime:1"
        )

    def test_address_in_use(self) -> None:
        holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        self.assert_clean_failure(
            f"cannot listen on UDP 127.0.0.1:{port} (ctime): Address already in use",
            "udptime",
            "--listen",
            f"ctime@127.0.0.1:{port}",
        )

    def test_tac_bad_environment(self) -> None:
        self.assert_clean_failure(
            "UDPTIME_OPTIONS: --port: port 99999 is out of range",
            "-y",
            "udptime.tac",
            env={"UDPTIME_OPTIONS": "--port 99999"},
        )


class HelpTests(unittest.TestCase):
    def test_plugin_listed_in_twistd_help(self) -> None:
        done = subprocess.run(
            [*twistd_command(), "--help"],
            capture_output=True,
            check=False,
            timeout=60,
            cwd=str(REPO),
        )
        self.assertIn(b"udptime", done.stdout)

    def test_plugin_help_has_no_empty_default(self) -> None:
        done = subprocess.run(
            [*twistd_command(), "udptime", "--help"],
            capture_output=True,
            check=False,
            timeout=60,
            cwd=str(REPO),
        )
        self.assertIn(b"--interface", done.stdout)
        self.assertNotIn(b"[default: ]", done.stdout)
