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
    Twistd,
    free_udp_port,
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


def run_recipe_client() -> str:
    done = subprocess.run(
        [sys.executable, "-c", RECIPE_CLIENT],
        capture_output=True,
        timeout=10,
        check=True,
    )
    return done.stdout.decode()


def assert_seconds_near(test: unittest.TestCase, reply: bytes) -> None:
    seconds = int.from_bytes(reply, "big")
    now = (int(time.time()) + EPOCH_1900_TO_1970) % 2**32
    test.assertLess(abs(seconds - now), 3)


class RecipeClientTests(unittest.TestCase):
    def check_recipe_client(self, server: Twistd) -> None:
        poll_until_answered("127.0.0.1", 20000, process=server.process)
        printed = run_recipe_client()
        data, addr = eval(printed)  # the snippet prints a (bytes, address) tuple
        self.assertRegex(data, CTIME)
        self.assertEqual(addr, ("127.0.0.1", 20000))
        served = time.mktime(time.strptime(data.decode("ascii")))
        self.assertLess(abs(served - time.time()), 3)
        self.assertLess(server.terminate(), 1.0)

    def test_plugin_default(self) -> None:
        self.check_recipe_client(Twistd(self, ["udptime", "--port", "20000"]))

    def test_tac_default(self) -> None:
        server = Twistd(self, ["-y", "udptime.tac"], env={"UDPTIME_OPTIONS": ""})
        self.check_recipe_client(server)


class PluginTests(unittest.TestCase):
    def test_every_format_and_startup_lines(self) -> None:
        ports = [free_udp_port() for _ in range(3)]
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"ctime@127.0.0.1:{ports[0]}",
                "--listen",
                f"daytime@127.0.0.1:{ports[1]}",
                "--listen",
                f"time@127.0.0.1:{ports[2]}",
            ],
        )
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
        port = free_udp_port("::1")
        server = Twistd(
            self,
            ["udptime", "--interface", "::1", "--port", str(port), "-f", "daytime"],
        )
        self.assertRegex(
            poll_until_answered("::1", port, process=server.process), DAYTIME
        )
        self.assertLess(server.terminate(), 1.0)

    def test_ipv6_any_serves_ipv4_too(self) -> None:
        port = free_udp_port("::1")
        server = Twistd(
            self, ["udptime", "--interface", "::", "--port", str(port), "-f", "time"]
        )
        assert_seconds_near(
            self, poll_until_answered("::1", port, process=server.process)
        )
        answer = query("127.0.0.1", port)
        self.assertIsNotNone(answer)

    def test_large_datagram_answered(self) -> None:
        port = free_udp_port()
        server = Twistd(self, ["udptime", "--listen", f"time@127.0.0.1:{port}"])
        poll_until_answered("127.0.0.1", port, process=server.process)
        answer = query("127.0.0.1", port, b"\0" * 65_507, timeout=2)
        self.assertIsNotNone(answer)
        assert answer is not None
        assert_seconds_near(self, answer[0])

    def test_tac_reads_environment(self) -> None:
        port = free_udp_port()
        server = Twistd(
            self,
            ["-y", "udptime.tac"],
            env={
                "UDPTIME_OPTIONS": f"--port {port} --interface 127.0.0.1 --format time"
            },
        )
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
