"""A fleet on one machine: four udptime processes on four loopback
addresses, each in its own working directory, sharing only what an operator
distributes (the fleet secret, the TLS certificate of the NTS-KE host, each
host's own Roughtime delegation).

Host 1 (127.0.1.1) serves NTS-KE only and hands out hosts 2 and 3; hosts 2-4
serve NTP with NTS, and Roughtime under a delegation that ``udptime roughtime
delegate`` signed with a root key no host ever sees. Every host serves the
text formats. chronyd (``-Q``: it never touches the clock) gets cookies from
host 1, authenticates with the host it was handed, and, once that host is
stopped and a rotation period has passed, authenticates with the other one
using the same cookies: host 1 counts one NTS-KE session in all. A host with
another secret NAKs those cookies and counts the NAKs. ``udptime query -f
roughtime`` and, when ``UDPTIME_ROUGHTIME_PEER`` names a Python with
``roughly`` (an independent implementation; see
tests/test_roughtime_interop.py), roughly's client query hosts 2-4 in a chain
from the fleet's server list (one entry per host, the one root public key)
and verify every reply under that key.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from tests.support import Twistd, query
from tests.test_nts_e2e import chronyd_nts
from tests.test_roughtime_interop import PEER_ENV
from udptime.nts import extensions as ext
from udptime.nts.cookies import cookie_key_id
from udptime.nts.derivedkeys import derive_key, period_of
from udptime.nts.testing import client_header, ke_session, make_certificate, nts_request
from udptime.roughtime import keys, verify

ROTATE = 6.0
TEXT_FORMATS = ("ctime", "daytime", "time")
_SERVING = re.compile(r"serving (\S+) on (UDP|TCP) (\S+) port (\d+)")
NTP_HOSTS = (2, 3, 4)
#: What each NTP host's delegation is called in its own directory.
DELEGATION = "roughtime.json"

# roughly's chain over the fleet's server list, through its library: each
# server queried in turn (each nonce derived from the reply before), each
# reply verified under the list's public key before it is kept, then the
# whole chain checked again (signatures, nonces) as its malfeasance check
# does. Prints the chain as a report and the verdict.
ROUGHLY_CHAIN = """
import asyncio, json, sys
from pathlib import Path
import roughly.ecosystem as eco

servers = eco.load_ecosystem(Path(sys.argv[1]))
responses = asyncio.run(asyncio.wait_for(eco.query_servers(servers), 60))
report = eco.malfeasance_report(responses, servers)
print(json.dumps({"malfeasance": eco.confirm_malfeasance(report), "report": report}))
"""


def loopback_usable(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


class Host:
    """One udptime process with its own working directory; every port is
    chosen by the kernel and read back from the log."""

    def __init__(
        self,
        test: unittest.TestCase,
        address: str,
        listens: tuple[str, ...],
        options: tuple[str, ...],
        expect_ke: bool = False,
        distributed: Mapping[str, Path] | None = None,
    ) -> None:
        self.address = address
        self.directory = Path(tempfile.mkdtemp(prefix=f"udptime-fleet-{address}-"))
        test.addCleanup(shutil.rmtree, self.directory, True)
        # Files the operator installs on this host only (mode kept: 0600).
        for name, source in (distributed or {}).items():
            shutil.copy(source, self.directory / name)
        args = ["udptime"]
        for fmt in listens:
            args += ["--listen", f"{fmt}@{address}:0"]
        args += ["--metrics", f"{address}:0", "--summary-interval", "0", *options]
        self.twistd = Twistd(test, args, cwd=self.directory)
        expected = {*listens, "metrics", *(["NTS-KE"] if expect_ke else [])}
        self.ports: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while set(self.ports) != expected:
            if self.twistd.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{address} did not start:\n{self.log()}")
            time.sleep(0.05)
            for name, _, _, port in _SERVING.findall(self.log()):
                self.ports[name] = int(port)

    def log(self) -> str:
        return self.twistd.log_text()

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples by name, and udptime_role as role:NAME."""
        samples = scrape_at(self.address, self.ports["metrics"])
        values: dict[str, float] = {}
        for (name, labels), value in samples.items():
            if name == "udptime_role":
                values[f"role:{dict(labels)['role']}"] = value
            elif not labels:
                values[name] = value
        return values

    def total(self, name: str) -> float:
        """A sample summed over its labels (per listener, per reason)."""
        samples = scrape_at(self.address, self.ports["metrics"])
        return sum(v for (n, _), v in samples.items() if n == name)

    def roles(self) -> set[str]:
        return {k[5:] for k, v in self.metrics().items() if k.startswith("role:") and v}

    def stop(self) -> None:
        self.twistd.terminate()


def scrape_at(
    address: str, port: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, labels); tests.test_metrics.scrape asks 127.0.0.1."""
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def write_secret(path: Path) -> bytes:
    secret = secrets.token_bytes(32)
    path.write_text(secret.hex() + "\n")
    path.chmod(0o600)
    return secret


def run_chronyd(
    ke_port: int, cert: Path, dump: Path, timeout: int = 20
) -> tuple[float | None, str]:
    """chronyd -Q, NTS with NTS-KE at 127.0.1.1: the offset it prints (or None)."""
    return chronyd_nts(f"127.0.1.1 ntsport {ke_port}", cert, dump, timeout=timeout)


class Dump:
    """chronyd's NTS dump for 127.0.1.1 (NNC0): the NTP address it was handed
    and the cookies it holds."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "127.0.1.1.nts"

    def lines(self) -> list[str]:
        lines = self.path.read_text().splitlines()
        assert lines[0] == "NNC0", lines[:1]
        return lines

    def address(self) -> tuple[str, int]:
        host, port = self.lines()[3].split()
        return host, int(port)

    def move_to(self, address: str, port: int) -> None:
        """What DNS or anycast do for a name: the same address, another host."""
        lines = self.lines()
        lines[3] = f"{address} {port}"
        self.path.write_text("\n".join(lines) + "\n")

    def cookies(self) -> list[bytes]:
        # identifier, name, context time, address + port, context, cookies
        return [bytes.fromhex(line) for line in self.lines()[5:] if line]


def udptime_cli(cwd: Path, *args: str) -> str:
    """``udptime ARGS`` as an operator runs it; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "udptime", *args],
        capture_output=True,
        check=False,
        cwd=str(cwd),
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"udptime {' '.join(args)}: {done.stderr}"
    return done.stdout


def periods_of(secret: bytes, cookies: list[bytes]) -> set[int]:
    """The rotation periods whose keys sealed *cookies* (near now)."""
    now = period_of(time.time(), ROTATE)
    ids = {derive_key(secret, n, ROTATE).key_id: n for n in range(now - 10, now + 2)}
    return {ids.get(cookie_key_id(c) or 0, -1) for c in cookies}


class FleetTests(unittest.TestCase):
    timeout = 240

    def setUp(self) -> None:
        for n in range(1, 5):
            if not loopback_usable(f"127.0.1.{n}"):
                raise unittest.SkipTest(f"cannot bind 127.0.1.{n}")
        # What the operator distributes: the fleet secret to every host, the
        # TLS certificate and key to the NTS-KE host.
        self.shared = Path(tempfile.mkdtemp(prefix="udptime-fleet-shared-"))
        self.addCleanup(shutil.rmtree, self.shared, True)
        self.secret_path = self.shared / "fleet.secret"
        self.secret = write_secret(self.secret_path)
        self.cert, self.key = make_certificate(self.shared, addresses=("127.0.1.1",))
        # The signing machine: the Roughtime root key is made here and never
        # leaves; it signs one delegation per NTP host, each copied to that
        # host only.
        self.signing = Path(tempfile.mkdtemp(prefix="udptime-fleet-signing-"))
        self.addCleanup(shutil.rmtree, self.signing, True)
        printed = udptime_cli(
            self.signing, "roughtime", "keygen", "--out", "root.pem"
        ).strip()
        self.root_public = base64.b64decode(printed, validate=True)
        self.online_keys: dict[int, str] = {}
        for n in NTP_HOSTS:
            printed = udptime_cli(
                self.signing, "roughtime", "delegate", "--root", "root.pem",
                "--out", f"host{n}.json", "--days", "30",
            )  # fmt: skip
            found = re.match(r"online key (\S+) valid ", printed)
            assert found is not None, printed
            self.online_keys[n] = found.group(1)

    def ntp_host(self, n: int) -> Host:
        return Host(
            self,
            f"127.0.1.{n}",
            ("ntp", "roughtime", *TEXT_FORMATS),
            (
                # CI's kernel clock is often unsynchronised: serve it anyway
                # (NTP at stratum 10, Roughtime with --roughtime-radius).
                "--local-stratum",
                "10",
                "--rate-limit",
                "off",
                "--nts",
                "--nts-key-secret",
                str(self.secret_path),
                "--nts-rotate",
                str(ROTATE),
                "--roughtime-delegation",
                DELEGATION,
            ),
            distributed={DELEGATION: self.signing / f"host{n}.json"},
        )

    def start_fleet(self) -> tuple[Host, dict[int, Host]]:
        """Hosts 2-4 (NTP, NTS, Roughtime), then host 1 (NTS-KE) naming 2 and 3."""
        ntp_hosts = {n: self.ntp_host(n) for n in NTP_HOSTS}
        ke_host = Host(
            self,
            "127.0.1.1",
            TEXT_FORMATS,
            (
                "--nts-ke",
                "127.0.1.1:0",
                "--tls-cert",
                str(self.cert),
                "--tls-key",
                str(self.key),
                "--nts-key-secret",
                str(self.secret_path),
                "--nts-rotate",
                str(ROTATE),
                "--nts-server",
                f"127.0.1.2:{ntp_hosts[2].ports['ntp']}",
                "--nts-server",
                f"127.0.1.3:{ntp_hosts[3].ports['ntp']}",
            ),
            expect_ke=True,
        )
        return ke_host, ntp_hosts

    def test_chrony_moves_between_hosts_with_its_cookies(self) -> None:
        ke_host, ntp_hosts = self.start_fleet()
        hosts = [ke_host, *ntp_hosts.values()]
        # Plain NTP and the text formats answer from every host.
        for host in hosts:
            for fmt in TEXT_FORMATS:
                answer = query(host.address, host.ports[fmt], b"?", timeout=2)
                self.assertIsNotNone(answer, f"{fmt} on {host.address}")
        for host in ntp_hosts.values():
            answer = query(host.address, host.ports["ntp"], client_header(), timeout=2)
            assert answer is not None, host.address
            self.assertEqual(len(answer[0]), 48)
            self.assertEqual(answer[0][1], 10)  # --local-stratum
        self.assertNotIn("ntp", ke_host.ports)
        # Each host says which roles it serves.
        self.assertEqual(ke_host.roles(), {*TEXT_FORMATS, "nts-ke"})
        for host in ntp_hosts.values():
            self.assertEqual(host.roles(), {*TEXT_FORMATS, "ntp", "nts", "roughtime"})

        dump_dir = Path(tempfile.mkdtemp(prefix="udptime-fleet-dump-"))
        self.addCleanup(shutil.rmtree, dump_dir, True)
        dump_dir.chmod(0o700)
        dump = Dump(dump_dir)

        # 1. Key exchange with host 1, NTP with the host it names.
        offset, output = run_chronyd(ke_host.ports["NTS-KE"], self.cert, dump_dir)
        self.assertIsNotNone(offset, output)
        self.assertEqual(ke_host.metrics()["udptime_nts_ke_sessions_total"], 1)
        address, port = dump.address()
        first = next(n for n, h in ntp_hosts.items() if h.address == address)
        self.assertIn(first, (2, 3))
        self.assertEqual(port, ntp_hosts[first].ports["ntp"])
        self.assertIn(f"changed to {address}", output)
        self.assertGreater(
            ntp_hosts[first].metrics()["udptime_nts_authenticated_total"], 0
        )
        # Host 1 sealed the first cookies; the host chronyd talked to sent
        # fresh ones, in a later period if chronyd's run crossed a boundary.
        sealed = periods_of(self.secret, dump.cookies())
        period = min(sealed)
        self.assertGreaterEqual(period, 0, sealed)
        self.assertLessEqual(max(sealed) - period, 1, sealed)

        # 2. That host goes away; the name now reaches the other one, and a
        # rotation period passes.
        ntp_hosts[first].stop()
        second = 5 - first
        other = ntp_hosts[second]
        dump.move_to(other.address, other.ports["ntp"])
        deadline = time.monotonic() + 2 * ROTATE
        while period_of(time.time(), ROTATE) <= period:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        offset, output = run_chronyd(ke_host.ports["NTS-KE"], self.cert, dump_dir)
        self.assertIsNotNone(offset, output)
        self.assertIn(f"changed to {other.address}", output)
        # No second key exchange: the cookies host 1 sealed opened on host N.
        self.assertEqual(ke_host.metrics()["udptime_nts_ke_sessions_total"], 1)
        counts = other.metrics()
        self.assertGreater(counts["udptime_nts_authenticated_total"], 0)
        self.assertEqual(counts["udptime_nts_naks_total"], 0)
        # Host N sent it fresh cookies, of the later period; any it has not
        # spent yet are still those host 1 sealed.
        now_held = periods_of(self.secret, dump.cookies())
        self.assertGreater(max(now_held), period)
        self.assertGreaterEqual(min(now_held), period)

    def test_roughtime_chain_across_hosts_verifies_under_one_root(self) -> None:
        _, ntp_hosts = self.start_fleet()
        root = base64.b64encode(self.root_public).decode()
        for n, host in ntp_hosts.items():
            # Each host serves under its own delegation from the one root.
            self.assertIn(
                f"Roughtime: public key {root}, online key {self.online_keys[n]} ",
                host.log(),
            )
            delegation = keys.load_delegation(self.signing / f"host{n}.json")
            self.assertEqual(
                host.metrics()["udptime_roughtime_delegation_expiry_timestamp_seconds"],
                delegation.maxt,
            )
        self.assertEqual(len(set(self.online_keys.values())), len(NTP_HOSTS))

        # The fleet's server list: one entry per host, each made by
        # `udptime roughtime server-entry` with the root's public key.
        client = Path(tempfile.mkdtemp(prefix="udptime-fleet-client-"))
        self.addCleanup(shutil.rmtree, client, True)
        entries = [
            json.loads(
                udptime_cli(
                    client, "roughtime", "server-entry", "--name", f"host{n}",
                    "--public-key", root,
                    "--address", f"udp:{host.address}:{host.ports['roughtime']}",
                )
            )
            for n, host in ntp_hosts.items()
        ]  # fmt: skip
        server_list = client / "fleet-roughtime.json"
        server_list.write_text(json.dumps({"servers": entries}, indent=2))
        self.assertEqual({e["publicKey"] for e in entries}, {root})

        # Our client: a chain over the list, every reply verified under the
        # root key and signed by that host's online key.
        out = json.loads(
            udptime_cli(
                client, "query", "-f", "roughtime", "--servers", str(server_list),
                "--json", "-t", "2",
            )
        )  # fmt: skip
        self.assertTrue(out["consistent"], out)
        self.assertIsNone(out["report"])
        chain = out["chain"]
        self.assertEqual([c["name"] for c in chain], [f"host{n}" for n in ntp_hosts])
        links = []
        for n, link in zip(ntp_hosts, chain, strict=True):
            host = ntp_hosts[n]
            self.assertNotIn("error", link)
            self.assertEqual(
                (link["host"], link["port"]), (host.address, host.ports["roughtime"])
            )
            self.assertEqual(link["public_key"], root)
            self.assertEqual(link["online_key"], self.online_keys[n])
            self.assertLess(abs(link["time"] - time.time()), 60)
            links.append(
                verify.ChainLink(
                    self.root_public,
                    base64.b64decode(link["request"]),
                    base64.b64decode(link["response"]),
                    None if link["rand"] is None else base64.b64decode(link["rand"]),
                )
            )
        self.assertIsNone(chain[0]["rand"])
        # The chain as a report would carry it proves itself: each nonce
        # derived from the reply before, each reply under the root key.
        self.assertEqual(len(verify.verify_chain(links)), len(NTP_HOSTS))

        # roughly, the independent client, the same list.
        peer = os.environ.get(PEER_ENV)
        if peer:
            done = subprocess.run(
                [peer, "-c", ROUGHLY_CHAIN, str(server_list)],
                capture_output=True,
                check=False,
                text=True,
                timeout=120,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            theirs = json.loads(done.stdout)
            self.assertIs(theirs["malfeasance"], False)
            report = theirs["report"]
            self.assertEqual(len(report), len(NTP_HOSTS))
            self.assertEqual({r["publicKey"] for r in report}, {root})
            # Their chain checks out with our verifier too.
            ours = verify.verify_chain(verify.parse_report({"responses": report}))
            self.assertEqual(
                [v.response.public_key for v in ours],
                [base64.b64decode(self.online_keys[n]) for n in ntp_hosts],
            )
        for host in ntp_hosts.values():
            # Every request got its reply: nothing dropped, nothing refused.
            self.assertEqual(host.total("udptime_roughtime_unanswered_total"), 0)
            self.assertGreaterEqual(
                host.total("udptime_roughtime_signatures_total"), 2 if peer else 1
            )
        if not peer:
            raise unittest.SkipTest(
                f"{PEER_ENV} not set: roughly's client not run (ours was)"
            )


class SecretMismatchTests(unittest.TestCase):
    """Hosts that do not share the secret: NAKs, counted where the cookie
    does not open, and nowhere else."""

    timeout = 60

    def test_naks_counted_on_the_host_with_another_secret(self) -> None:
        shared = Path(tempfile.mkdtemp(prefix="udptime-fleet-mismatch-"))
        self.addCleanup(shutil.rmtree, shared, True)
        cert, key = make_certificate(shared)
        right, wrong = shared / "fleet.secret", shared / "stale.secret"
        write_secret(right)
        write_secret(wrong)
        nts = ("--nts-key-secret", str(right), "--rate-limit", "off")
        ke_host = Host(
            self,
            "127.0.0.1",
            ("ntp",),
            (
                "--nts-ke",
                "127.0.0.1:0",
                "--tls-cert",
                str(cert),
                "--tls-key",
                str(key),
                *nts,
            ),
            expect_ke=True,
        )
        good = Host(self, "127.0.0.1", ("ntp",), ("--nts", *nts))
        bad = Host(
            self,
            "127.0.0.1",
            ("ntp",),
            ("--nts", "--nts-key-secret", str(wrong), "--rate-limit", "off"),
        )
        session = ke_session(ke_host.ports["NTS-KE"], cert)
        for host, nak in ((good, False), (bad, True), (ke_host, False)):
            for cookie in session.cookies[:2]:
                unique_id = os.urandom(32)
                request = nts_request(session.keys, cookie, unique_id)
                answer = query("127.0.0.1", host.ports["ntp"], request, timeout=2)
                assert answer is not None, host.ports
                reply = ext.open_response(
                    answer[0], AESSIV(session.keys.s2c), unique_id
                )
                self.assertEqual(reply.nak, nak)
                if nak:
                    self.assertEqual(answer[0][12:16], b"NTSN")
            counts = host.metrics()
            self.assertEqual(counts["udptime_nts_naks_total"], 2 if nak else 0)
            self.assertEqual(counts["udptime_nts_authenticated_total"], 0 if nak else 2)
        # The fingerprints in the logs tell the operator which host differs.
        fingerprint = re.compile(r"fleet secret \S+ \(([0-9a-f]{8})\)")
        prints = [fingerprint.findall(h.log()) for h in (ke_host, good, bad)]
        self.assertEqual(prints[0], prints[1])
        self.assertNotEqual(prints[0], prints[2])
