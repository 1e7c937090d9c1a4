"""Helpers for end-to-end tests: real twistd subprocesses on ports the kernel
chose, UDP queries, and a private network namespace for the fixed ports."""

from __future__ import annotations

import os
import re
import shutil
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

#: The start-up line of each listener (udptime/listener.py).
SERVING = re.compile(r"serving (\w+) on UDP (\S+) port (\d+)")


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
    """A real ``twistd -n`` subprocess, logging to a file, stopped with SIGTERM.

    Serve port 0 and read the port back with :meth:`serving`: the kernel then
    picks a port nobody holds, with no window for another process to take it.
    *prefix* runs twistd through another command (:attr:`NetworkNamespace.prefix`).
    """

    def __init__(
        self,
        test: unittest.TestCase,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        prefix: Sequence[str] = (),
    ) -> None:
        self.log_path = Path(tempfile.mkdtemp(prefix="udptime-e2e-")) / "twistd.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*prefix, *twistd_command(), "-n", "--pidfile=", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=str(cwd),
            )
        test.addCleanup(self.kill)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self, count: int = 1, deadline: float = 15.0) -> list[int]:
        """The ports of the first *count* listeners, in start-up order."""
        end = time.monotonic() + deadline
        while True:
            found = SERVING.findall(self.log_text())
            if len(found) >= count:
                return [int(port) for _, _, port in found[:count]]
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > end:
                raise AssertionError(f"no {count} listeners in:\n{self.log_text()}")
            time.sleep(0.05)

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


_POLL_INSIDE = """
import sys
from tests.support import poll_until_answered
host, port, payload, deadline = sys.argv[1:]
answer = poll_until_answered(host, int(port), bytes.fromhex(payload), float(deadline))
sys.stdout.buffer.write(answer)
"""


class NetworkNamespace:
    """A private network namespace: its own loopback, up, and nothing else.

    For the tests that must use a fixed port (the recipe's unchanged client
    dials port 20000; the privilege drop needs a port below 1024): inside, the
    port is ours whatever the machine runs, and nothing outside can answer.
    Commands join it through :attr:`prefix`. Skips only where the kernel or
    the container allows no network namespace.
    """

    def __init__(self, test: unittest.TestCase) -> None:
        missing = [
            tool for tool in ("unshare", "nsenter", "ip") if not shutil.which(tool)
        ]
        if missing:
            raise unittest.SkipTest(
                f"no private network namespace: {', '.join(missing)} not installed"
            )
        # Without root, a user namespace of our own grants the right to make one.
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        # The holder lives until its stdin closes: the cleanup, or our death.
        self.holder = subprocess.Popen(
            [
                "unshare",
                *user,
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && echo up && exec cat >/dev/null",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline() != b"up\n":
            _, err = self.holder.communicate(timeout=10)
            raise unittest.SkipTest(
                "no private network namespace (unshare --net): "
                + err.decode(errors="replace").strip()
            )
        test.addCleanup(self.close)
        joins = ["-U", "--preserve-credentials"] if user else []
        self.prefix = ["nsenter", "-t", str(self.holder.pid), "-n", *joins, "--"]

    def run(
        self, args: Sequence[str], timeout: float = 30.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run *args* inside; fail unless it exits 0."""
        return subprocess.run(
            [*self.prefix, *args],
            capture_output=True,
            check=True,
            timeout=timeout,
            cwd=str(REPO),
        )

    def poll_until_answered(
        self,
        host: str,
        port: int,
        payload: bytes = b"",
        deadline: float = 15.0,
        process: subprocess.Popen[bytes] | None = None,
    ) -> bytes:
        """:func:`poll_until_answered` from inside the namespace."""
        poller = subprocess.Popen(
            [*self.prefix, sys.executable, "-c", _POLL_INSIDE]
            + [host, str(port), payload.hex(), str(deadline)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(REPO),
        )
        while True:
            try:
                out, err = poller.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if process is not None and process.poll() is not None:
                    poller.kill()
                    poller.communicate()
                    raise AssertionError(
                        f"server exited with {process.returncode}"
                    ) from None
        if poller.returncode != 0:
            raise AssertionError(err.decode(errors="replace"))
        return out

    def close(self) -> None:
        assert self.holder.stdin is not None
        self.holder.stdin.close()
        self.holder.wait(10)
        for pipe in (self.holder.stdout, self.holder.stderr):
            if pipe is not None:
                pipe.close()
