"""``--workers``: several processes answer one port; the dead are replaced."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable

from twisted.trial import unittest

from tests.support import Twistd, free_udp_port, poll_until_answered, query
from tests.test_metrics import free_tcp_port, scrape

STARTED = re.compile(r"worker (\d+) started as pid (\d+)")


def worker_pids(server: Twistd) -> dict[int, list[int]]:
    pids: dict[int, list[int]] = {}
    for index, pid in STARTED.findall(server.log_text()):
        pids.setdefault(int(index), []).append(int(pid))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition: Callable[[], bool], what: str, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class WorkerTests(unittest.TestCase):
    def test_two_workers_answer_one_is_replaced_sigterm_stops_all(self) -> None:
        port, http = free_udp_port(), free_tcp_port()
        server = Twistd(
            self,
            [
                "udptime",
                "--listen",
                f"time@127.0.0.1:{port}",
                "--workers",
                "2",
                "--rate-limit",
                "off",
                "--metrics",
                str(http),
            ],
        )
        poll_until_answered("127.0.0.1", port, process=server.process)
        wait_for(lambda: 1 in worker_pids(server), "worker 1 to start")

        def answered_by_worker() -> dict[str, float]:
            samples = scrape(http)
            return {
                dict(labels)["worker"]: value
                for (name, labels), value in samples.items()
                if name == "udptime_answered_total"
            }

        def both_answer() -> bool:
            # Fresh source ports: the kernel hashes each onto a worker.
            for _ in range(20):
                query("127.0.0.1", port, timeout=1)
            counts = answered_by_worker()
            return counts.get("0", 0) > 0 and counts.get("1", 0) > 0

        wait_for(both_answer, "both workers to answer")

        (first_pid,) = worker_pids(server)[1]
        # The worker gets the parsed Config on stdin, not the command line.
        with open(f"/proc/{first_pid}/cmdline", "rb") as cmdline:
            self.assertEqual(
                cmdline.read().split(b"\0")[1:-1], [b"-m", b"udptime.worker", b"1"]
            )
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(server)[1]) == 2, "worker 1 to be replaced")
        replacement = worker_pids(server)[1][1]
        self.assertNotEqual(replacement, first_pid)
        self.assertTrue(alive(replacement))

        def replacement_answers() -> bool:
            # The dead worker's counters left with it: any count for worker 1
            # now is the replacement's.
            for _ in range(20):
                query("127.0.0.1", port, timeout=1)
            return answered_by_worker().get("1", 0) > 0

        wait_for(replacement_answers, "the new worker 1 to answer")

        self.assertLess(server.terminate(within=10), 10)
        wait_for(lambda: not alive(replacement), "worker 1 to stop with twistd")
        self.assertIsNone(query("127.0.0.1", port, timeout=0.3))
        # nothing is left bound to the port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", port))
