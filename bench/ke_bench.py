"""NTS-KE handshakes per second: udptime beside chronyd, on loopback.

Run: ``python bench/ke_bench.py [--clients N] [--seconds S]``. Each server
gets a closed loop of N client processes, each from its own loopback
address (udptime caps connections per address), each doing one complete NTS-KE
exchange after another (TCP connect, TLS 1.3 handshake with ALPN
``ntske/1`` and certificate verification, request, eight cookies back,
keys exported), for S seconds after a short warm-up. The same client, the
same P-256 certificate and the same loopback serve both servers; the client
is Python (pyOpenSSL) and shares the machine's cores with the server, so the
"per server CPU second" column, which divides by the CPU time the server
(and chronyd's NTS-KE helper processes) used, says more about the server
than the rate does on a small machine.

chronyd runs with ``-x`` (it never touches the clock) as an NTS server
(``ntsservercert``/``ntsserverkey``), as ``bench/run.py`` starts it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from udptime.nts.testing import ke_session, make_certificate

WARM_UP = 0.5


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what}: nothing listening on TCP {port} after 20 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of *pid* and its children (chronyd's NTS-KE helpers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1] is the ppid
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def client_loop(
    port: int, cafile: str, source: str, start: float, end: float, out: Any
) -> None:
    """One client process: exchanges until *end*, counting those after *start*."""
    done = failed = 0
    while (now := time.monotonic()) < end:
        try:
            result = ke_session(
                port, Path(cafile), timeout=5, strict=True, source=source
            )
            ok = len(result.cookies) == 8
        except Exception:  # noqa: BLE001 - a failure is counted, not fatal
            ok = False
        if now >= start:
            done += ok
            failed += not ok
    out.put((done, failed))


@dataclass
class Result:
    name: str
    exchanges: int
    failed: int
    seconds: float
    server_cpu: float

    def line(self) -> str:
        rate = self.exchanges / self.seconds
        per_cpu = self.exchanges / self.server_cpu if self.server_cpu else float("nan")
        return (
            f"{self.name:<9} {rate:8.0f} handshakes/s  {per_cpu:8.0f} per server "
            f"CPU second  ({self.exchanges} in {self.seconds:.1f} s, "
            f"{self.failed} failed, server CPU {self.server_cpu:.2f} s)"
        )


def measure(
    name: str, port: int, pid: int, cafile: Path, clients: int, seconds: float
) -> Result:
    queue: Any = multiprocessing.Queue()
    start = time.monotonic() + WARM_UP
    end = start + seconds
    procs = [
        multiprocessing.Process(
            target=client_loop,
            args=(port, str(cafile), f"127.0.50.{1 + n}", start, end, queue),
        )
        for n in range(clients)
    ]
    for proc in procs:
        proc.start()
    time.sleep(max(0.0, start - time.monotonic()))
    cpu_before = cpu_seconds(pid)
    results = [queue.get(timeout=seconds + 30) for _ in procs]
    cpu_after = cpu_seconds(pid)
    for proc in procs:
        proc.join(10)
    return Result(
        name,
        sum(done for done, _ in results),
        sum(failed for _, failed in results),
        seconds,
        cpu_after - cpu_before,
    )


def start_udptime(
    work: Path, cert: Path, key: Path
) -> tuple[subprocess.Popen[Any], int]:
    ke_port = free_port(socket.SOCK_STREAM)
    twistd = Path(sys.executable).parent / "twistd"
    command = [
        *([str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted"]),
        "-n",
        "--pidfile=",
        "udptime",
        "--listen",
        f"ntp@127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
        "--local-stratum",
        "10",
        "--nts-ke",
        f"127.0.0.1:{ke_port}",
        "--nts-ke-rate-limit",
        "off",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--nts-keys",
        str(work / "nts-keys.json"),
    ]
    log = open(work / "udptime.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return process, ke_port


def start_chronyd(
    work: Path, cert: Path, key: Path
) -> tuple[subprocess.Popen[Any], int]:
    chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
    ke_port = free_port(socket.SOCK_STREAM)
    conf = work / "chronyd.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {free_port(socket.SOCK_DGRAM)}",
                "bindaddress 127.0.0.1",
                "allow 127.0.0.0/8",
                "local stratum 10",
                "cmdport 0",
                "bindcmdaddress /",
                f"pidfile {work / 'chronyd.pid'}",
                f"driftfile {work / 'chronyd.drift'}",
                f"ntsservercert {cert}",
                f"ntsserverkey {key}",
                f"ntsport {ke_port}",
                f"ntsdumpdir {work}",
                "",
            ]
        )
    )
    command = [chronyd, "-x", "-d", "-f", str(conf)]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "root"]  # keep root: the temp dir's files stay ours
    log = open(work / "chronyd.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return process, ke_port


def run(
    name: str,
    start: Callable[[Path, Path, Path], tuple[subprocess.Popen[Any], int]],
    work: Path,
    cert: Path,
    key: Path,
    clients: int,
    seconds: float,
) -> Result:
    process, port = start(work, cert, key)
    try:
        wait_for_port(port, process, name)
        ke_session(port, cert, timeout=5, strict=True)  # it works at all
        return measure(name, port, process.pid, cert, clients, seconds)
    finally:
        process.terminate()
        process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="udptime-ke-bench-"))
    try:
        cert, key = make_certificate(work)
        print(
            f"NTS-KE exchanges, {args.clients} concurrent clients, "
            f"{args.seconds:g} s each, loopback, P-256 certificate"
        )
        chronyd = shutil.which("chronyd") or "/usr/sbin/chronyd"
        version = subprocess.run(
            [chronyd, "-v"], capture_output=True, text=True, check=False
        ).stdout.strip()
        for name, start in (("udptime", start_udptime), ("chronyd", start_chronyd)):
            if name == "chronyd" and "+NTS" not in version:
                print(f"chronyd   skipped: {version or 'not installed'}")
                continue
            print(run(name, start, work, cert, key, args.clients, args.seconds).line())
        print(f"({version.splitlines()[0] if version else 'no chronyd'})")
    finally:
        shutil.rmtree(work, True)


if __name__ == "__main__":
    main()
