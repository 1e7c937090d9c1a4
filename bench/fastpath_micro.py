"""Replies a second of the recvmmsg/sendmmsg fast path against its baselines.

Run: ``python bench/fastpath_micro.py [--duration S] [--repeat R] [MODE ...]``.

Each mode is a server process pinned to core 1 (``taskset -c 1``) answering
ctime (cached once a second, as the ``ctime`` format does) on 127.0.0.1, and
``bench/loadgen.c`` (built into a temporary directory) drives it from core 0
with 16 sockets keeping 16 requests each in flight. Modes run round-robin
``--repeat`` times and each reports its best run, which keeps other load on
the machine out of the comparison as far as it can.

Modes:
  ceiling      bench/servers/ceiling.c: C recvmmsg/sendmmsg, the machine's limit
  loop         udptime.mmsg Receiver/Sender in a plain poll() loop, no reactor,
               the text responder's batch call
  fast         the same (kept as a name for older result files)
  fast-shared  the responder called once per batch: a ctime reply depends
               on the second alone, and without kernel stamps a batch has one
  fast-ts      loop, with SO_TIMESTAMPNS kernel receive stamps
  fast-policy  fast-ts, plus udptime.policy admission per datagram
  ntp-ts       fast-ts answering NTP (loadgen --payload ntp), transmit stamped
               once per batch just before sendmmsg
  twisted      Twisted DatagramProtocol (the portable path) baseline
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODES = (
    "ceiling",
    "loop",
    "fast",
    "fast-shared",
    "fast-ts",
    "fast-policy",
    "ntp-ts",
    "twisted",
)
DEFAULT_MODES = ("ceiling", "loop", "fast", "fast-shared", "fast-ts", "twisted")
SERVER_CORE = "1"
LOAD_CORE = "0"


# -- servers (run in the child process) ---------------------------------------


def _bound(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def serve(mode: str, port: int) -> None:
    from udptime.formats import encode_ctime
    from udptime.responders.text import TextResponder

    text = TextResponder(encode_ctime)

    if mode == "twisted":
        from twisted.internet import reactor
        from twisted.internet.protocol import DatagramProtocol

        class Ctime(DatagramProtocol):
            noisy = False

            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                self.transport.write(text.answer(datagram, time.time_ns()), addr)

        reactor.listenUDP(port, Ctime(), interface="127.0.0.1", maxPacketSize=2048)
        reactor.callWhenRunning(_ready)
        reactor.run()
        return

    from udptime.mmsg.receive import Receiver
    from udptime.mmsg.send import Sender

    sock = _bound(port)
    timestamps = mode in ("fast-ts", "fast-policy", "ntp-ts")
    receiver = Receiver(sock, timestamps=timestamps, clock_ns=time.time_ns)
    sender = Sender(receiver)
    calls = [0]

    def report(signum: int, frame: Any) -> None:
        stats = {
            "received": receiver.received_count,
            "sent": sender.sent_count,
            "dropped": sender.dropped_count,
            "batches": calls[0],
        }
        sys.stdout.write(json.dumps(stats) + "\n")
        sys.stdout.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, report)

    handler: Any
    stamp = None
    if mode == "fast-policy":
        from udptime.policy import ANSWER, Policy, RateLimit

        admit = Policy(RateLimit(1e9, 10**9)).admit

        def handler(r: Receiver, n: int) -> list[bytes | None]:
            addrs, ports = r.sources(n)
            now = time.time()
            return [
                text.answer(d, t) if admit(a, p, now, False, True) is ANSWER else None
                for d, a, p, t in zip(r.data(n), addrs, ports, r.received_ns(n))
            ]

    elif mode == "ntp-ts":
        from udptime.ntp import ServerState
        from udptime.responders.ntp import NtpResponder

        state = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", None)
        ntp = NtpResponder(lambda: state, time.time_ns)
        stamp = ntp.stamp

        def handler(r: Receiver, n: int) -> list[bytes | None]:
            return ntp.answer_batch(r.data(n), r.received_ns(n))[0]

    elif mode == "fast-shared":

        def handler(r: Receiver, n: int) -> list[bytes | None]:
            return [text.answer(b"", r.received_ns(1)[0])] * n

    else:

        def handler(r: Receiver, n: int) -> list[bytes | None]:
            return text.answer_batch(r.data(n), r.received_ns(n))[0]

    import select

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    full = receiver.batch
    _ready()
    while True:
        poller.poll()
        while n := receiver.receive():
            calls[0] += 1
            sender.send(handler(receiver, n), stamp)
            if n < full:
                break


# -- driver --------------------------------------------------------------------


def build(tmp: Path) -> tuple[Path, Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        prebuilt = REPO / "bench" / "build"
        return prebuilt / "loadgen", prebuilt / "ceiling"
    out = []
    for name, source in (
        ("loadgen", REPO / "bench" / "loadgen.c"),
        ("ceiling", REPO / "bench" / "servers" / "ceiling.c"),
    ):
        target = tmp / name
        subprocess.run([cc, "-O2", "-o", str(target), str(source), "-lm"], check=True)
        out.append(target)
    return out[0], out[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


#: An NTPv4 client request (mode 3), for servers that ignore anything else.
NTP_REQUEST = b"\x23" + bytes(47)


def wait_until_answering(
    port: int, probe_payload: bytes, deadline: float = 10.0
) -> None:
    end = time.monotonic() + deadline
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.1)
        while time.monotonic() < end:
            probe.sendto(probe_payload, ("127.0.0.1", port))
            try:
                probe.recv(2048)
                return
            except TimeoutError:
                continue
    raise RuntimeError(f"server on port {port} did not answer")


def run_one(
    mode: str, loadgen: Path, ceiling: Path, args: argparse.Namespace
) -> dict[str, Any]:
    port = free_port()
    if mode == "ceiling":
        command = [str(ceiling), str(port)]
    else:
        command = [sys.executable, __file__, "--serve", mode, "--port", str(port)]
    # exec: the pid is the server's own, for its CPU time.
    server = subprocess.Popen(
        ["taskset", "-c", SERVER_CORE, *command],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        wait_until_answering(port, NTP_REQUEST if mode == "ntp-ts" else b"")
        time.sleep(0.2)
        payload = "ntp" if mode == "ntp-ts" else "empty"
        warmup = 1.0
        load = subprocess.Popen(
            [
                "taskset", "-c", LOAD_CORE, str(loadgen),
                "--port", str(port), "--payload", payload,
                "--sockets", str(args.sockets), "--window", str(args.window),
                "--duration", str(args.duration), "--warmup", str(warmup),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(warmup)
        cpu0 = cpu_seconds(server.pid)
        out, _ = load.communicate()
        cpu1 = cpu_seconds(server.pid)
        if load.returncode:
            raise RuntimeError(f"loadgen failed ({load.returncode})")
        report: dict[str, Any] = json.loads(out)
        # Replies per second of server CPU: what one whole core would do,
        # insensitive to other processes taking turns on the server's core.
        cpu = cpu1 - cpu0
        report["server_cpu_s"] = cpu
        report["replies_per_cpu_s"] = report["replies"] / cpu if cpu > 0 else 0.0
        server.terminate()
        lines = server.communicate(timeout=5)[0].splitlines()
        if mode not in ("ceiling", "twisted") and lines and lines[-1].startswith("{"):
            stats = json.loads(lines[-1])
            report["mean_batch"] = stats["received"] / max(stats["batches"], 1)
        return report
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(5)


def busy_fraction(interval: float = 0.5) -> float:
    """Share of all cores busy over *interval* seconds, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split()[1:9]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(limit: float) -> None:
    """Wait up to *limit* seconds for other work to leave the machine quiet."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if busy_fraction() < 0.1:
            return
    print(f"  (machine still busy after {limit:.0f} s; measuring anyway)", flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of *pid* and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modes", nargs="*", help=f"of {', '.join(MODES)}")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sockets", type=int, default=16)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="S",
        help="before each run wait up to S seconds for the machine to be idle",
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    modes = args.modes or list(DEFAULT_MODES)
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        loadgen, ceiling = build(Path(tmp))
        for _ in range(args.repeat):
            for mode in modes:
                if args.wait_quiet > 0:
                    wait_for_quiet(args.wait_quiet)
                report = run_one(mode, loadgen, ceiling, args)
                rate = report["replies_per_s"]
                print(
                    f"  {mode:12} {rate:>10,.0f} replies/s "
                    f"{report['replies_per_cpu_s']:>10,.0f} per CPU-s "
                    f"batch {report.get('mean_batch', float('nan')):4.1f} "
                    f"(lost {report['lost']}, p50 "
                    f"{(report['rtt_us'] or {}).get('p50', float('nan')):.0f} us)",
                    flush=True,
                )
                if mode not in best or rate > best[mode]["replies_per_s"]:
                    best[mode] = report
    print(
        f"\nbest of {args.repeat}, {os.cpu_count()} cores, server on core "
        f"{SERVER_CORE}, load on core {LOAD_CORE}:"
    )
    for mode in modes:
        print(
            f"  {mode:12} {best[mode]['replies_per_s']:>10,.0f} replies/s "
            f"{best[mode]['replies_per_cpu_s']:>10,.0f} per server CPU-s"
        )


if __name__ == "__main__":
    main()
