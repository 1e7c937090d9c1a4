"""Helpers for end-to-end tests: free ports, real twistd subprocesses, UDP queries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from twisted.trial import unittest

REPO = Path(__file__).resolve().parent.parent


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port the kernel just handed out on *host* (free unless raced)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def twistd_command() -> list[str]:
    """The twistd of the interpreter running the tests."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def query(
    host: str,
    port: int,
    payload: bytes = b"",
    timeout: float = 1.0,
    source: tuple[str, int] | None = None,
) -> tuple[bytes, tuple[str, int]] | None:
    """Send one datagram and wait for one reply; ``None`` after *timeout*."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if source is not None:
            sock.bind(source)
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            return None
        return data, (addr[0], addr[1])


def poll_until_answered(
    host: str,
    port: int,
    payload: bytes = b"",
    deadline: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
) -> bytes:
    """Query until the server answers; fail if it does not by the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        answer = query(host, port, payload, timeout=0.2)
        if answer is not None:
            return answer[0]
    raise AssertionError(f"no answer from {host} port {port} within {deadline} s")


class Twistd:
    """A real ``twistd -n`` subprocess, logging to a file, stopped with SIGTERM."""

    def __init__(
        self,
        test: unittest.TestCase,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix="udptime-e2e-")) / "twistd.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*twistd_command(), "-n", "--pidfile=", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd),
            )
        test.addCleanup(self.kill)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def terminate(self, within: float = 5.0) -> float:
        """SIGTERM; returns how long the server took to exit."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(within)
        return time.monotonic() - start

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
