"""``udptime query -f roughtime``: one verified measurement, chains over a
server list, malfeasance reports; against responders served on loopback
(kernel-chosen ports), through the library and the command line."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import REPO
from tests.test_roughtime_cli import ServedResponder
from udptime.client import NoReply
from udptime.roughtime import keys, query, verify, wire
from udptime.roughtime.responder import RoughtimeResponder

HOUR_NS = 3600 * 1_000_000_000


def serve(
    test: unittest.TestCase, skew_ns: int = 0, root: Any = None
) -> tuple[ServedResponder, bytes]:
    """A responder on 127.0.0.1 whose clock is *skew_ns* off."""
    root = root if root is not None else keys.generate_key()
    now = int(time.time())
    delegation = keys.delegate(root, now - 2 * 3600, now + 2 * 3600)
    server = ServedResponder(
        RoughtimeResponder(
            delegation,
            lambda: (True, 20_000),
            now_ns=lambda: time.time_ns() + skew_ns,
        )
    )
    test.addCleanup(server.close)
    return server, keys.public_bytes(root)


def server_list(*servers: tuple[str, bytes, int], extra: Any = ()) -> str:
    return json.dumps(
        {
            "servers": [
                verify.server_entry(name, key, [("udp", "127.0.0.1", port)])
                for name, key, port in servers
            ]
            + list(extra)
        }
    )


class QueryTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_verified(self) -> Any:
        server, public = serve(self)
        result = yield query.query(reactor, "127.0.0.1", server.port, public, 2.0)
        self.assertEqual(result.verified.radius, 3)
        self.assertEqual(result.tries, 1)
        self.assertLess(abs(result.offset), 5)
        self.assertGreaterEqual(result.rtt, 0)
        verify.verify_response(result.request, result.response, public)
        out = json.loads(json.dumps(result.as_dict()))
        self.assertEqual(out["format"], "roughtime")
        self.assertEqual(out["radius"], 3)
        self.assertEqual(out["public_key"], base64.b64encode(public).decode())
        text = query.describe(result, "localhost")
        self.assertIn("radius      3 s", text)
        self.assertIn("roughtime, answered after 1 try", text)

    @defer.inlineCallbacks
    def test_unverifiable_reply_is_no_time(self) -> Any:
        """A reply signed under another key is ignored, never a time."""
        server, _ = serve(self)
        other = keys.public_bytes(keys.generate_key())
        # Without SRV the server answers anyone; the reply then fails the
        # client's check against the key it pinned.
        codec = query.RoughtimeCodec(other)
        codec.packet = verify.make_request()
        with self.assertRaises(ValueError) as caught:
            codec.decode(
                server.responder.answer(codec.packet, time.time_ns()) or b"",
                time.time(),
            )
        self.assertIn("unverifiable", str(caught.exception))
        with self.assertRaises(NoReply) as failed:
            yield query.query(reactor, "127.0.0.1", server.port, other, 0.3, 1)
        # it names the key (SRV), so this server stays silent
        self.assertEqual(server.responder.counters.wrong_server, 1)
        self.assertIn("no valid roughtime reply", str(failed.exception))


class ChainTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    @defer.inlineCallbacks
    def test_consistent_chain_skips_what_it_cannot_use(self) -> Any:
        a, ka = serve(self)
        b, kb = serve(self)
        silent, ks = serve(self)
        silent.close()  # nobody answers there any more
        other_type = {
            "name": "p256",
            "version": 1,
            "publicKeyType": "ecdsa-p256",
            "publicKey": base64.b64encode(bytes(33)).decode(),
            "addresses": [{"protocol": "udp", "address": "127.0.0.1:1"}],
        }
        servers = verify.parse_server_list(
            server_list(
                ("a", ka, a.port),
                ("silent", ks, silent.port),
                ("b", kb, b.port),
                extra=[other_type],
            )
        )
        chain = yield defer.Deferred.fromCoroutine(
            query.query_chain(reactor, servers.servers, 0.3, 1)
        )
        self.assertEqual([e.server.name for e in chain.answered], ["a", "b"])
        self.assertEqual(chain.contradictions, ())
        errors = {e.server.name: e.error for e in chain.entries if e.error}
        self.assertIn("no valid roughtime reply", errors["silent"])
        self.assertIn("not usable", errors["p256"])
        # b's nonce is chained to a's reply, over the silent server
        links = chain.links()
        self.assertIsNone(links[0].rand)
        verify.verify_chain(links)

    @defer.inlineCallbacks
    def test_contradiction_makes_a_report(self) -> Any:
        honest, kh = serve(self)
        liar, kl = serve(self, skew_ns=HOUR_NS)
        late, kt = serve(self)
        servers = verify.parse_server_list(
            server_list(
                ("honest", kh, honest.port),
                ("liar", kl, liar.port),
                ("late", kt, late.port),
            )
        )
        chain = yield defer.Deferred.fromCoroutine(
            query.query_chain(reactor, servers.servers, 2.0, 2)
        )
        self.assertEqual(len(chain.answered), 3)
        # the liar's hour ahead contradicts the honest server that came after it
        self.assertEqual(chain.contradictions, ((1, 2),))
        report = json.loads(json.dumps(chain.report()))
        links = verify.parse_report(report)
        self.assertEqual([link.public_key for link in links], [kh, kl, kt])
        results = verify.verify_chain(links)
        self.assertEqual(verify.inconsistencies(results), [(1, 2)])


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "udptime", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(cwd),
    )


class CommandLineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def test_one_server(self) -> None:
        server, public = serve(self)
        key = base64.b64encode(public).decode()
        done = run_cli(
            "query", "-f", "roughtime", "127.0.0.1", "-p", str(server.port),
            "--public-key", key, "--json",
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout)
        self.assertEqual((out["radius"], out["version"]), (3, 1))
        verify.verify_response(
            base64.b64decode(out["request"]), base64.b64decode(out["response"]), public
        )
        done = run_cli(
            "query", "-f", "roughtime", "127.0.0.1", "-p", str(server.port),
            "--public-key", key,
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("radius      3 s", done.stdout)

        other = base64.b64encode(keys.public_bytes(keys.generate_key())).decode()
        done = run_cli(
            "query", "-f", "roughtime", "127.0.0.1", "-p", str(server.port),
            "--public-key", other, "-t", "0.3", "-r", "1",
        )  # fmt: skip
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)

    def test_usage_errors(self) -> None:
        key = base64.b64encode(bytes(32)).decode()
        missing = str(self.dir / "missing.json")
        for args in (
            ("query", "-f", "roughtime", "127.0.0.1"),
            ("query", "-f", "roughtime", "127.0.0.1", "--public-key", "AAAA"),
            ("query", "-f", "ntp", "127.0.0.1", "--public-key", key),
            ("query", "-f", "roughtime", "--servers", missing),
            ("query", "-f", "roughtime", "h", "--public-key", key, "--report", "r"),
            ("query", "-f", "roughtime", "h", "--servers", missing),
        ):
            done = run_cli(*args)
            self.assertEqual(done.returncode, 2, (args, done.stderr))
            self.assertIn("usage:", done.stderr)
            self.assertNotIn("Traceback", done.stderr)

    def test_servers_with_a_contradiction(self) -> None:
        honest, kh = serve(self)
        liar, kl = serve(self, skew_ns=HOUR_NS)
        listing = self.dir / "servers.json"
        # an hour ahead *after* an honest reply breaks no causal order
        listing.write_text(
            server_list(("honest", kh, honest.port), ("liar", kl, liar.port))
        )
        report = self.dir / "report.json"
        done = run_cli(
            "query", "-f", "roughtime", "--servers", str(listing),
            "--report", str(report), "--json",
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        out = json.loads(done.stdout)
        self.assertTrue(out["consistent"])
        self.assertEqual([s["name"] for s in out["chain"]], ["honest", "liar"])
        self.assertFalse(report.exists())

        # before one, it does
        listing.write_text(
            server_list(("liar", kl, liar.port), ("honest", kh, honest.port))
        )
        done = run_cli(
            "query",
            "-f",
            "roughtime",
            "--servers",
            str(listing),
            "--report",
            str(report),
        )
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("CONTRADICTORY", done.stdout)
        self.assertIn("liar vs honest", done.stderr)
        self.assertIn(str(report), done.stderr)
        links = verify.parse_report(json.loads(report.read_text()))
        self.assertEqual(verify.inconsistencies(verify.verify_chain(links)), [(0, 1)])
        self.assertEqual(len(links[1].rand or b""), 32)
        self.assertEqual(
            wire.decode_message(wire.decode_packet(links[1].request))[wire.NONC],
            verify.chained_nonce(links[0].response, links[1].rand or b""),
        )

    def test_server_entry(self) -> None:
        root = self.dir / "root.pem"
        keys.write_root_key(root, keys.generate_key())
        done = run_cli(
            "roughtime", "server-entry", "--name", "here", "--address",
            "udp:192.0.2.1:2002", "--root", str(root),
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        entry = verify.parse_server_list(
            json.dumps({"servers": [json.loads(done.stdout)]})
        )
        self.assertEqual(entry.servers[0].addresses[0].port, 2002)
        self.assertEqual(run_cli("roughtime", "--help").returncode, 0)
