"""Rate limiting reaches NTS clients: chronyd, polling far over the limit, is
told so with a RATE kiss it accepts (authenticated, Unique Identifier echoed)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.test_nts_e2e import CHRONYD, NtsServer


class NtsRateKissTests(unittest.TestCase):
    def test_chronyd_over_the_limit_receives_a_rate_kiss(self) -> None:
        if not Path(CHRONYD).exists():
            raise unittest.SkipTest("chronyd is not installed (.ci/run installs it)")
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-kiss-"))
        self.addCleanup(shutil.rmtree, directory, True)
        server = NtsServer(self, directory, extra=("--rate-limit", "0.1/1"))
        self.addCleanup(server.stop)
        conf = directory / "chrony.conf"
        conf.write_text(
            f"server 127.0.0.1 port {server.ntp_port} nts ntsport {server.ke_port} "
            "iburst minpoll -6 maxpoll -6 maxsamples 8\n"
            f"ntstrustedcerts {server.cert}\n"
            f"ntsdumpdir {directory}\n"
            f"pidfile {directory}/chronyd.pid\n"
            "cmdport 0\n"
        )
        # 64 requests a second against one every 10 s with a burst of 1: the
        # second request is over the limit and draws the kiss.
        done = subprocess.run(
            [CHRONYD, "-Q", "-d", "-f", str(conf), "-t", "10", "-u", "root"],
            capture_output=True,
            check=False,
            timeout=60,
            text=True,
        )
        output = done.stdout + done.stderr
        self.assertIn("Received KoD RATE from 127.0.0.1", output, output)
