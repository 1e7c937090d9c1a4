"""Rate limiting reaches NTS clients: chronyd, polling far over the limit, is
told so with a RATE kiss it accepts (authenticated, Unique Identifier echoed)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from twisted.trial import unittest

from tests.test_nts_e2e import CHRONYD, NtsServer, chronyd_nts


class NtsRateKissTests(unittest.TestCase):
    def test_chronyd_over_the_limit_receives_a_rate_kiss(self) -> None:
        if not Path(CHRONYD).exists():
            raise unittest.SkipTest("chronyd is not installed (.ci/run installs it)")
        directory = Path(tempfile.mkdtemp(prefix="udptime-nts-kiss-"))
        self.addCleanup(shutil.rmtree, directory, True)
        server = NtsServer(self, directory, extra=("--rate-limit", "0.1/1"))
        self.addCleanup(server.stop)
        # 64 requests a second against one every 10 s with a burst of 1: the
        # second request is over the limit and draws the kiss.
        _, output = chronyd_nts(
            f"127.0.0.1 port {server.ntp_port} ntsport {server.ke_port}",
            server.cert,
            directory,
            timeout=10,
            maxsamples=8,
            debug=True,
        )
        self.assertIn("Received KoD RATE from 127.0.0.1", output, output)
