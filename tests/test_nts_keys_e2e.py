"""The NTS keys file end to end: real twistd running as ``nobody`` after
``--uid``, with the keys file (or its directory) taken away from it.

Root may write anywhere, so these tests make a file unwritable the way an
operator would by mistake: the server drops to nobody/nogroup and the file
and its directory belong to root.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from twisted.trial import unittest

from tests.support import REPO, free_udp_port, query, twistd_command
from tests.test_metrics import scrape
from tests.test_nts_e2e import NtsServer
from tests.test_nts_support import (
    client_header,
    free_tcp_port,
    ke_session,
    make_certificate,
    nts_request,
    udp_exchange,
)
from udptime.nts import extensions as ext
from udptime.nts.cookies import (
    CookieKeys,
    MasterKey,
    cookie_key_id,
    decode_keys_file,
    encode_keys_file,
)

AS_NOBODY = ("--uid", "nobody", "--gid", "nogroup")
FAILURES = "udptime_nts_key_save_failures_total"


def nobody() -> tuple[int, int]:
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


def skip_unless_root() -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest("needs root, to run the server as nobody")
    try:
        nobody()
    except KeyError:
        raise unittest.SkipTest("no user nobody or group nogroup") from None


def give(path: Path, owner: tuple[int, int], mode: int) -> None:
    os.chown(path, *owner)
    os.chmod(path, mode)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(5)


def key_ids(path: Path) -> list[int]:
    return [key.key_id for key in decode_keys_file(path.read_bytes())]


class UnwritableAtStartTests(unittest.TestCase):
    """Refused before serving: exit 1, one line naming the file and why."""

    def setUp(self) -> None:
        skip_unless_root()
        self.dir = Path(tempfile.mkdtemp(prefix="udptime-nts-keys-e2e-"))
        self.dir.chmod(0o755)  # root's: nobody may read, not write
        make_certificate(self.dir)
        self.keys = self.dir / "keys.json"
        # As an earlier run by root left it: 0644, no lock file, and with a
        # next key, so no rotation is due: only the start-up save finds out.
        now = time.time()
        self.keys.write_bytes(
            encode_keys_file(
                [
                    MasterKey(5, os.urandom(64), now - 1),
                    MasterKey(6, os.urandom(64), now + 3600),
                ]
            )
        )
        self.keys.chmod(0o644)

    def start(self) -> tuple[int, str, str]:
        """Run the server; query its NTP port until it exits: no answer ever."""
        port = free_udp_port()
        out, err = self.dir / "out.log", self.dir / "err.log"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            process = subprocess.Popen(
                [
                    *twistd_command(),
                    "-n",
                    "--pidfile=",
                    *AS_NOBODY,
                    "udptime",
                    "--listen",
                    f"ntp@127.0.0.1:{port}",
                    "--local-stratum",
                    "10",
                    "--nts-ke",
                    f"127.0.0.1:{free_tcp_port()}",
                    "--tls-cert",
                    str(self.dir / "cert.pem"),
                    "--tls-key",
                    str(self.dir / "key.pem"),
                    "--nts-keys",
                    str(self.keys),
                ],
                stdout=stdout,
                stderr=stderr,
                cwd=str(REPO),
            )
        self.addCleanup(stop, process)
        deadline = time.monotonic() + 60
        while process.poll() is None:
            self.assertLess(time.monotonic(), deadline, "the server did not exit")
            self.assertIsNone(
                query("127.0.0.1", port, client_header(), timeout=0.05), "answered"
            )
        return process.returncode, out.read_text(), err.read_text()

    def assertRefused(self, why: str) -> None:
        before = self.keys.read_bytes()
        code, out, err = self.start()
        self.assertEqual(code, 1, out + err)
        output = out + err
        self.assertNotIn("Traceback", output)
        # twistd -n logs what we write to stderr (as [stderr#error]).
        lines = [line for line in output.splitlines() if "NTS keys file" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertRegex(
            lines[0], re.escape(f"udptime: NTS keys file {self.keys}: ") + why
        )
        self.assertIn("set uid/gid 65534/65534", out)  # it was nobody who tried
        self.assertEqual(self.keys.read_bytes(), before)

    def test_no_lock_file_can_be_made(self) -> None:
        self.assertRefused(r"cannot open lock file .*\.lock: Permission denied")

    def test_file_cannot_be_saved(self) -> None:
        lock = self.dir / "keys.json.lock"
        lock.touch()
        give(lock, nobody(), 0o600)  # the lock works; saving does not
        self.assertRefused(r"cannot create .*keys\.json\.tmp\.\d+: Permission denied")


class UnwritableAtRotationTests(unittest.TestCase):
    """The file taken away while serving: cookies stay under the saved key,
    the failure is logged and counted, and after a restart every cookie
    issued meanwhile still opens."""

    ROTATE = 3.0
    #: Seconds until the pre-made next key becomes current: time to start.
    LEAD = 10.0

    def setUp(self) -> None:
        skip_unless_root()
        self.certs = Path(tempfile.mkdtemp(prefix="udptime-nts-keys-e2e-"))
        make_certificate(self.certs)
        self.dir = Path(tempfile.mkdtemp(prefix="udptime-nts-keys-e2e-"))
        self.keys = self.dir / "keys.json"

    def server(self, metrics: int) -> NtsServer:
        return NtsServer(
            self,
            self.certs,
            keys=self.keys,
            twistd_args=AS_NOBODY,
            extra=(
                "--nts-rotate",
                str(self.ROTATE),
                "--metrics",
                f"127.0.0.1:{metrics}",
            ),
        )

    def failures(self, port: int) -> float:
        return scrape(port).get((FAILURES, ()), -1.0)

    def exchange(
        self, server: NtsServer, keys: CookieKeys, cookie: bytes
    ) -> ext.NtsReply:
        unique_id = os.urandom(32)
        request = nts_request(keys, cookie, unique_id, placeholders=1)
        reply = udp_exchange(server.ntp_port, request)
        assert reply is not None, "no reply"
        return ext.open_response(reply, AESSIV(keys.s2c), unique_id)

    def test_save_fails_at_rotation(self) -> None:
        give(self.dir, nobody(), 0o755)
        now = time.time()
        first = MasterKey(0x1111, os.urandom(64), now - 1)
        saved = MasterKey(0x2222, os.urandom(64), now + self.LEAD)
        self.keys.write_bytes(encode_keys_file([first, saved]))
        give(self.keys, nobody(), 0o600)

        metrics = free_tcp_port()
        server = self.server(metrics)
        # It started as nobody and saved the file (unchanged); now take the
        # directory and the file away before the next key becomes current.
        self.assertEqual(self.keys.stat().st_uid, nobody()[0])
        give(self.dir, (0, 0), 0o755)
        give(self.keys, (0, 0), 0o644)
        self.assertLess(time.time(), saved.created, "the server took too long")
        self.assertEqual(key_ids(self.keys), [first.key_id, saved.key_id])
        self.assertEqual(self.failures(metrics), 0)
        start = time.monotonic()

        issued: list[tuple[CookieKeys, bytes]] = []
        # The saved next key becomes current; its successor cannot be saved.
        deadline = time.monotonic() + self.LEAD + 30
        while time.time() < saved.created or self.failures(metrics) < 2:
            self.assertLess(time.monotonic(), deadline, server.twistd.log_text())
            time.sleep(0.2)
        result = ke_session(server.ke_port, server.cert)
        self.assertEqual({cookie_key_id(c) for c in result.cookies}, {saved.key_id})
        issued += [(result.keys, c) for c in result.cookies]
        # Past its period, it still seals: there is no other saved key.
        while time.time() < saved.created + self.ROTATE + 0.5:
            time.sleep(0.2)
        result = ke_session(server.ke_port, server.cert)
        self.assertEqual({cookie_key_id(c) for c in result.cookies}, {saved.key_id})
        issued += [(result.keys, c) for c in result.cookies]
        reply = self.exchange(server, result.keys, result.cookies[0])
        self.assertFalse(reply.nak)
        self.assertEqual(len(reply.cookies), 2)
        self.assertEqual({cookie_key_id(c) for c in reply.cookies}, {saved.key_id})
        issued += [(result.keys, c) for c in reply.cookies]

        self.assertEqual(key_ids(self.keys), [first.key_id, saved.key_id])
        counted = self.failures(metrics)
        self.assertGreaterEqual(counted, 2)  # retried
        server.stop()
        log = server.twistd.log_text()
        errors = [line for line in log.splitlines() if "cannot save keys file" in line]
        self.assertGreaterEqual(len(errors), 1, log)
        # At most one a minute.
        self.assertLessEqual(len(errors), 1 + (time.monotonic() - start) // 60, log)
        self.assertIn(str(self.keys), errors[0])
        self.assertIn("Permission denied", errors[0])
        self.assertIn(f"{saved.key_id:08x}", errors[0])

        # Writable again: a restart opens every cookie issued meanwhile.
        give(self.dir, nobody(), 0o755)
        give(self.keys, nobody(), 0o600)
        restarted = self.server(free_tcp_port())
        for keys, cookie in issued:
            reply = self.exchange(restarted, keys, cookie)
            self.assertFalse(reply.nak, f"cookie under {cookie_key_id(cookie):08x}")
        ids = key_ids(self.keys)
        self.assertIn(saved.key_id, ids)
        self.assertNotIn(ids[-1], (first.key_id, saved.key_id))  # rotated now
