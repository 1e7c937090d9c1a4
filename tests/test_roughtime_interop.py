"""Interoperability with an independent Roughtime implementation: ``roughly``
(PyPI, asyncio, RFC 10049 version 1; needs Python 3.12+).

Skipped unless ``UDPTIME_ROUGHTIME_PEER`` names a Python interpreter that
can import ``roughly``, for instance::

    PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/rt312
    /tmp/rt312/bin/pip install 'roughly[cli]==0.3.0'
    UDPTIME_ROUGHTIME_PEER=/tmp/rt312/bin/python python -m pytest tests/test_roughtime_interop.py

Both directions, on 127.0.0.1 with kernel-chosen ports only: roughly's
client (its CLI and its library, three queries batched into one tree)
verifies our replies, and our client verifies roughly's server, greased
replies included.
"""

from __future__ import annotations

import base64
import os
import select
import subprocess
import time

from twisted.trial import unittest

from tests.test_roughtime_cli import served
from udptime.roughtime import cli

PEER_ENV = "UDPTIME_ROUGHTIME_PEER"

# Three concurrent queries through roughly's library, which verifies each
# reply (signatures, MINT/MAXT, Merkle path) before returning it.
CLIENT = """
import asyncio, base64, sys
import roughly.client

async def main():
    host, port, key = sys.argv[1], int(sys.argv[2]), base64.b64decode(sys.argv[3])
    replies = await asyncio.wait_for(asyncio.gather(*[
        roughly.client.send_request(host, port, key) for _ in range(3)
    ]), 20)
    for r in replies:
        print(r.version, r.signed_response.midpoint, r.signed_response.radius,
              r.index, len(r.path))

asyncio.run(main())
"""

# roughly's own server on 127.0.0.1, a kernel-chosen port; prints
# "PORT PUBLIC_KEY" and serves for argv[1] seconds or until stdin closes.
SERVER = """
import asyncio, base64, sys
import roughly.server as rs

async def main():
    server = rs.Server.create(grease=sys.argv[2] == "grease", grease_probability=1.0)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: rs.UDPHandler(server), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    key = base64.b64encode(rs.public_key_bytes(server.long_term_key)).decode()
    print(port, key, flush=True)
    closed = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), closed.set)
    try:
        await asyncio.wait_for(closed.wait(), float(sys.argv[1]))
    except TimeoutError:
        pass
    transport.close()

asyncio.run(main())
"""


class InteropTests(unittest.TestCase):
    def setUp(self) -> None:
        peer = os.environ.get(PEER_ENV)
        if not peer:
            raise unittest.SkipTest(f"{PEER_ENV} not set")
        self.peer = peer
        check = subprocess.run(
            [peer, "-c", "import roughly.client, roughly.server"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(check.returncode, 0, check.stderr)

    def peer_server(self, grease: bool = False) -> tuple[int, bytes]:
        process = subprocess.Popen(
            [self.peer, "-c", SERVER, "60", "grease" if grease else "plain"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        def stop() -> None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

        self.addCleanup(stop)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        self.assertTrue(ready, "roughly's server did not start")
        port, key = process.stdout.readline().split()
        return int(port), base64.b64decode(key)

    def test_their_cli_verifies_us(self) -> None:
        server, public = served(self)
        result = subprocess.run(
            [
                self.peer,
                "-c",
                "from roughly.cli import cli; cli()",
                "query",
                "127.0.0.1",
                str(server.port),
                base64.b64encode(public).decode(),
                "--timeout",
                "10",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertIn("Current time:", result.stdout, result.stderr)
        self.assertIn("± 3 seconds", result.stdout)
        self.assertEqual(server.responder.counters.answered, 1)

    def test_their_library_verifies_a_batch(self) -> None:
        server, public = served(self, batch=3)
        result = subprocess.run(
            [
                self.peer,
                "-c",
                CLIENT,
                "127.0.0.1",
                str(server.port),
                base64.b64encode(public).decode(),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = [line.split() for line in result.stdout.splitlines()]
        self.assertEqual(len(lines), 3)
        self.assertEqual({line[0] for line in lines}, {"1"})
        self.assertEqual(sorted(int(line[3]) for line in lines), [0, 1, 2])
        self.assertEqual({line[4] for line in lines}, {"2"})
        self.assertEqual(server.responder.counters.signatures, 1)
        now = time.time()
        for line in lines:
            self.assertLess(abs(int(line[1]) - now), 60)

    def test_we_verify_their_server(self) -> None:
        port, public = self.peer_server()
        result = cli.query("127.0.0.1", port, public, timeout=5.0)
        self.assertEqual(result.verified.version, 1)
        self.assertIn(1, result.verified.response.versions)
        self.assertLess(abs(result.offset), 60)

    def test_we_survive_their_grease(self) -> None:
        """Every reply greased: each is either rejected or, if accepted,
        tells the right time (grease never pairs a wrong time with a valid
        signature)."""
        port, public = self.peer_server(grease=True)
        accepted = rejected = 0
        for _ in range(10):
            try:
                result = cli.query("127.0.0.1", port, public, timeout=0.5, attempts=1)
            except cli.QueryError:
                rejected += 1
                continue
            accepted += 1
            self.assertLess(abs(result.offset), 60)
        self.assertEqual(accepted + rejected, 10)
        self.assertGreater(rejected, 0)
