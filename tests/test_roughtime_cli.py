"""``udptime roughtime``: keygen, delegate, server-entry, and the blocking
query against our responder served on loopback (kernel-chosen port)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from udptime.roughtime import cli, keys, verify
from udptime.roughtime.responder import RoughtimeResponder


class ServedResponder:
    """A responder behind a blocking UDP socket on 127.0.0.1, in a thread.

    With *batch* > 1 it gathers that many datagrams (or what arrives within
    *gather* seconds) and answers them as one batch: one tree, one signature.
    """

    def __init__(
        self, responder: RoughtimeResponder, batch: int = 1, gather: float = 2.0
    ) -> None:
        self.responder = responder
        self.batch = batch
        self.gather = gather
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _receive(self, until: float) -> tuple[bytes, Any] | None:
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(min(left, 0.1))
            try:
                return self.sock.recvfrom(65535)
            except TimeoutError:
                continue
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._receive(time.monotonic() + 3600)
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.gather
            while len(batch) < self.batch:
                more = self._receive(deadline)
                if more is None:
                    break
                batch.append(more)
            replies, _ = self.responder.answer_batch(
                [data for data, _ in batch], [time.time_ns()] * len(batch)
            )
            for reply, (_, source) in zip(replies, batch):
                if reply is not None:
                    self.sock.sendto(reply, source)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def served(test: unittest.TestCase, batch: int = 1) -> tuple[ServedResponder, bytes]:
    root = keys.generate_key()
    now = int(time.time())
    delegation = keys.delegate(root, now - 3600, now + 3600)
    server = ServedResponder(
        RoughtimeResponder(delegation, lambda: (True, 20_000)), batch=batch
    )
    test.addCleanup(server.close)
    return server, keys.public_bytes(root)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class KeysCommandTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def test_keygen_delegate_entry(self) -> None:
        root = self.dir / "root.pem"
        code, out, err = run("keygen", "--out", str(root))
        self.assertEqual((code, err), (0, ""))
        public = base64.b64decode(out.strip())
        self.assertEqual(public, keys.public_bytes(keys.load_root_key(root)))
        self.assertEqual(stat.S_IMODE(os.stat(root).st_mode), 0o600)

        host = self.dir / "host.json"
        before = int(time.time())
        code, out, err = run(
            "delegate", "--root", str(root), "--out", str(host), "--days", "2"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("online key", out)
        delegation = keys.load_delegation(host)
        self.assertEqual(delegation.root_public_key, public)
        self.assertLessEqual(delegation.mint, before - cli.DEFAULT_BACKDATE + 5)
        self.assertGreaterEqual(delegation.maxt, before + 2 * cli.DAY)

        code, out, err = run(
            "server-entry",
            "--name",
            "here",
            "--address",
            "udp:127.0.0.1:5319",
            "--address",
            "udp:[::1]:5319",
            "--delegation",
            str(host),
        )
        self.assertEqual((code, err), (0, ""))
        entry = json.loads(out)
        listed = verify.parse_server_list(json.dumps({"servers": [entry]}))
        self.assertEqual(listed.servers[0].public_key, public)
        self.assertEqual(
            listed.servers[0].addresses[1], verify.Address("udp", "::1", 5319)
        )
        code, out, _ = run(
            "server-entry", "--name", "x", "--address", "udp:h:1", "--root", str(root)
        )
        self.assertEqual(
            json.loads(out)["publicKey"], base64.b64encode(public).decode()
        )

    def test_operator_errors(self) -> None:
        root = self.dir / "root.pem"
        self.assertEqual(run("keygen", "--out", str(root))[0], 0)
        cases = [
            ("keygen", "--out", str(root)),
            ("keygen", "--out", str(self.dir / "missing" / "root.pem")),
            ("delegate", "--root", str(self.dir / "nope"), "--out", "x", "--days", "1"),
            (
                "delegate",
                "--root",
                str(root),
                "--out",
                str(self.dir / "h"),
                "--days",
                "0",
            ),
            (
                "server-entry",
                "--name",
                "x",
                "--address",
                "sctp:h:1",
                "--root",
                str(root),
            ),
            (
                "server-entry",
                "--name",
                "x",
                "--address",
                "udp:h:1",
                "--public-key",
                "AAAA",
            ),
        ]
        for argv in cases:
            code, _, err = run(*argv)
            self.assertEqual(code, 1, argv)
            self.assertEqual(err.count("\n"), 1, argv)
            self.assertTrue(err.startswith("udptime roughtime "), err)


class QueryTests(unittest.TestCase):
    def test_query(self) -> None:
        server, public = served(self)
        result = cli.query("127.0.0.1", server.port, public, timeout=2.0)
        self.assertEqual(result.verified.radius, 3)
        self.assertGreaterEqual(result.received_ns, result.sent_ns)
        self.assertLess(abs(result.offset), 5)
        verify.verify_response(result.request, result.response, public)
        code, out, err = run(
            "query", "127.0.0.1", str(server.port), base64.b64encode(public).decode()
        )
        self.assertEqual((code, err), (0, ""))
        self.assertIn("version 0x1", out)

    def test_wrong_key_gets_no_reply(self) -> None:
        server, _ = served(self)
        other = keys.public_bytes(keys.generate_key())
        with self.assertRaises(cli.QueryError):
            cli.query("127.0.0.1", server.port, other, timeout=0.1, attempts=2)
        self.assertEqual(server.responder.counters.wrong_server, 2)

    def test_batched_replies_verify(self) -> None:
        """Three clients in one batch: each reply's PATH and INDX check out."""
        server, public = served(self, batch=3)
        results: list[cli.QueryResult] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    cli.query("127.0.0.1", server.port, public, timeout=5.0, attempts=1)
                )
            )
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(len(results), 3)
        self.assertEqual(sorted(r.verified.response.index for r in results), [0, 1, 2])
        self.assertEqual({len(r.verified.response.path) for r in results}, {2})
        self.assertEqual(server.responder.counters.signatures, 1)
        self.assertEqual(len({r.verified.response.root for r in results}), 1)
