"""Roughtime end to end: a real ``twistd -n udptime --listen
roughtime@127.0.0.1:0`` (a kernel-chosen port, read back from its start-up
line) verified by ``udptime query -f roughtime`` and, when
``UDPTIME_ROUGHTIME_PEER`` names a Python with ``roughly`` (see
tests/test_roughtime_interop.py), by roughly's own client; a fleet host's
delegation reloaded by SIGHUP; an expired delegation refused at start-up.

``--local-stratum`` makes the server answer whether or not this machine's
kernel clock is synchronised (CI containers' often is not).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial import unittest

from tests.support import REPO, Twistd
from tests.test_roughtime_interop import PEER_ENV
from udptime.roughtime import keys, verify

SERVING = re.compile(r"serving roughtime on UDP 127\.0\.0\.1 port (\d+)")


def serving_port(server: Twistd, deadline: float = 20.0) -> int:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        found = SERVING.search(server.log_text())
        if found:
            return int(found.group(1))
        if server.process.poll() is not None:
            raise AssertionError(f"twistd exited:\n{server.log_text()}")
        time.sleep(0.05)
    raise AssertionError(f"not serving:\n{server.log_text()}")


def wait_for(server: Twistd, text: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while text not in server.log_text():
        if time.monotonic() > end:
            raise AssertionError(f"{text!r} not in:\n{server.log_text()}")
        time.sleep(0.05)


def udptime_query(port: int, public: bytes) -> dict[str, object]:
    done = subprocess.run(
        [
            sys.executable, "-m", "udptime", "query", "-f", "roughtime", "127.0.0.1",
            "-p", str(port), "--public-key", base64.b64encode(public).decode(),
            "--json", "-t", "2",
        ],
        check=False, capture_output=True, text=True, timeout=60, cwd=str(REPO),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


class RoughtimeServerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)
        self.root = keys.generate_key()
        self.public = keys.public_bytes(self.root)

    def root_server(self) -> tuple[Twistd, int]:
        key = self.dir / "root.pem"
        keys.write_root_key(key, self.root)
        server = Twistd(
            self,
            [
                "udptime", "--listen", "roughtime@127.0.0.1:0",
                "--roughtime-key", str(key), "--local-stratum", "10",
            ],
        )  # fmt: skip
        return server, serving_port(server)

    def test_our_client_verifies_it(self) -> None:
        server, port = self.root_server()
        out = udptime_query(port, self.public)
        self.assertEqual(out["version"], 1)
        self.assertLess(abs(float(out["offset"])), 30)  # type: ignore[arg-type]
        response = base64.b64decode(str(out["response"]))
        request = base64.b64decode(str(out["request"]))
        self.assertLessEqual(len(response), len(request))
        verify.verify_response(request, response, self.public)
        self.assertIn("Roughtime: public key", server.log_text())
        self.assertLess(server.terminate(), 5.0)

    def test_roughly_verifies_it(self) -> None:
        peer = os.environ.get(PEER_ENV)
        if not peer:
            raise unittest.SkipTest(f"{PEER_ENV} not set")
        _, port = self.root_server()
        done = subprocess.run(
            [
                peer, "-c", "from roughly.cli import cli; cli()", "query",
                "127.0.0.1", str(port), base64.b64encode(self.public).decode(),
                "--timeout", "10",
            ],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        found = re.search(r"Current time: (\d+) ± (\d+) seconds", done.stdout)
        self.assertIsNotNone(found, done.stdout + done.stderr)
        assert found is not None
        self.assertLess(abs(int(found.group(1)) - time.time()), 30)
        self.assertGreaterEqual(int(found.group(2)), 3)

    def test_fleet_host_reloads_its_delegation(self) -> None:
        now = int(time.time())
        path = self.dir / "host.json"
        first = keys.delegate(self.root, now - 3600, now + 86_400)
        keys.write_delegation(path, first)
        server = Twistd(
            self,
            [
                "udptime", "--listen", "roughtime@127.0.0.1:0",
                "--roughtime-delegation", str(path), "--local-stratum", "10",
            ],
        )  # fmt: skip
        port = serving_port(server)
        out = udptime_query(port, self.public)
        self.assertEqual(
            out["online_key"],
            base64.b64encode(keys.public_bytes(first.online_key)).decode(),
        )
        second = keys.delegate(self.root, now - 3600, now + 7 * 86_400)
        keys.write_delegation(path, second)
        server.process.send_signal(signal.SIGHUP)
        wait_for(server, "SIGHUP: Roughtime delegation: online key")
        out = udptime_query(port, self.public)
        self.assertEqual(
            out["online_key"],
            base64.b64encode(keys.public_bytes(second.online_key)).decode(),
        )
        self.assertEqual(out["maxt"], second.maxt)

    def test_expired_delegation_refused_at_start(self) -> None:
        path = self.dir / "host.json"
        keys.write_delegation(path, keys.delegate(self.root, 0, int(time.time()) - 60))
        server = Twistd(
            self,
            [
                "udptime", "--listen", "roughtime@127.0.0.1:0",
                "--roughtime-delegation", str(path),
            ],
        )  # fmt: skip
        self.assertNotEqual(server.wait(30), 0)
        output = server.log_text()
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "expired at" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("--roughtime-delegation", lines[0])
