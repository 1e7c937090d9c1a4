"""Python's share of the batch path per datagram, with the system calls stubbed.

Run: ``python bench/profile_batch.py [--batches B] [--repeat R] [ROW ...]``
(rows: ``ntp``, ``ntp-off``, ``ctime``, ``ctime-off``, ``time``, ``time-off``;
``-off`` is ``--rate-limit off``). ``bench/run.py --profile`` runs it too.

One real ``recvmmsg`` fills a ``Receiver`` with 64 datagrams from 64 loopback
sources (``SO_TIMESTAMPNS`` stamps for NTP, as the server asks for them);
after that ``recvmmsg`` is replaced by a copy of what the kernel wrote (the
source addresses rotated over ``--sources`` addresses, as the load generator
does) and ``sendmmsg`` by a function that accepts everything. What is left is
exactly the Python the server runs per batch, wired as ``udptime.tap`` wires
it: policy, core, responder, ``TimeProtocol.batch_received``, ``Sender``.
The reactor clock advances as if 200,000 datagrams a second arrived, so with
32,768 sources none is rate limited. The copy that stands in for the kernel
is timed on its own and subtracted.

Prints per-datagram nanoseconds (best of ``--repeat``) as JSON lines. With
``--instructions``, each row instead runs twice under ``valgrind
--tool=callgrind`` (*B* and 5*B* batches) and reports the difference per
datagram: instructions, reproducible on a busy machine where time is not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS = ("ntp", "ntp-off", "ctime", "ctime-off", "time", "time-off")
BATCH = 64
#: Arrival rate the reactor clock pretends (datagrams a second).
ARRIVALS = 200_000.0


class FakeClock:
    """``IReactorTime.seconds`` for the core, advanced per batch."""

    def __init__(self) -> None:
        self.now = time.time()

    def seconds(self) -> float:
        return self.now


def ntp_request() -> bytes:
    now = time.time() + 2_208_988_800
    sec = int(now)
    frac = int((now - sec) * 2**32) & 0xFFFFFFFF
    return bytes([0x23]) + bytes(39) + struct.pack("!II", sec, frac)


def build(row: str, sources: int) -> tuple[Any, Any, Any, FakeClock, Any]:
    from udptime.clockstate import ClockStateCache, read_kernel_clock
    from udptime.core import AnsweringCore
    from udptime.mmsg.receive import Receiver
    from udptime.mmsg.send import Sender
    from udptime.policy import DEFAULT_RATE_LIMIT, Policy
    from udptime.protocol import TimeProtocol
    from udptime.registry import Context, get_format

    name, _, off = row.partition("-")
    fmt = get_format(name)
    clock = FakeClock()
    context = Context(
        wall_clock_ns=time.time_ns,
        clock_state=ClockStateCache(
            clock.seconds, read_kernel_clock, local_stratum=10, precision=-20
        ),
    )
    policy = Policy(None if off else DEFAULT_RATE_LIMIT)
    core = AnsweringCore(fmt.make_responder(context), policy)
    proto = TimeProtocol(fmt.name, core, clock)  # type: ignore[arg-type]

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    receiver = Receiver(
        server, BATCH, timestamps=fmt.receive_timestamps, clock_ns=time.time_ns
    )
    sender = Sender(receiver)
    payload = ntp_request() if name == "ntp" else b""
    clients = []
    for i in range(BATCH):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind((f"127.1.0.{i + 1}", 0))
        c.sendto(payload, server.getsockname())
        clients.append(c)
    got = 0
    deadline = time.monotonic() + 5
    while got < BATCH and time.monotonic() < deadline:
        select.select([server], [], [], 0.5)
        got = receiver.receive()
    if got != BATCH:
        raise SystemExit(f"profile: {got} of {BATCH} datagrams arrived in one batch")
    for c in clients:
        c.close()

    # What the kernel wrote: headers and control slots, names per rotation.
    mem = receiver._mem
    base = ctypes.addressof(mem)
    head = bytes(memoryview(mem).cast("B")[: receiver._names])
    names_at = base + receiver._names
    port = struct.unpack_from("!H", mem, receiver._names + 2)[0]
    images = []
    first = int.from_bytes(socket.inet_aton("127.1.0.1"), "big")
    for r in range(max(1, sources // BATCH)):
        images.append(
            b"".join(
                struct.pack("=H", socket.AF_INET)
                + struct.pack("!H", port)
                + (first + r * BATCH + j).to_bytes(4, "big")
                + bytes(8)
                for j in range(BATCH)
            )
        )
    memmove = ctypes.memmove
    state = [0]
    count = len(images)
    size = len(images[0])

    def recvmmsg(fd: int, address: int, vlen: int, flags: int, timeout: Any) -> int:
        memmove(base, head, len(head))
        r = state[0]
        memmove(names_at, images[r], size)
        state[0] = r + 1 if r + 1 < count else 0
        return BATCH

    def sendmmsg(fd: int, address: int, vlen: int, flags: int) -> int:
        return vlen

    receiver._recvmmsg = recvmmsg
    sender._sendmmsg = sendmmsg
    return proto, receiver, sender, clock, (server, recvmmsg)


def run(row: str, batches: int, repeat: int, sources: int) -> dict[str, Any]:
    proto, receiver, sender, clock, (server, recvmmsg) = build(row, sources)
    step = BATCH / ARRIVALS
    receive = receiver.receive
    batch_received = proto.batch_received
    # One round of every source first: what is measured is sources the
    # table already holds, as in a steady load.
    warm = max(1, sources // BATCH)
    for _ in range(warm):
        batch_received(receiver, sender, receive())
        clock.now += step
    best = best_stub = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(batches):
            n = receive()
            batch_received(receiver, sender, n)
            clock.now += step
        t1 = time.perf_counter_ns()
        for _ in range(batches):
            recvmmsg(0, 0, 0, 0, None)
        t2 = time.perf_counter_ns()
        best = min(best, t1 - t0)
        best_stub = min(best_stub, t2 - t1)
    counters = proto.counters
    total = (batches * repeat + warm) * BATCH
    if counters.answered != total:
        raise SystemExit(
            f"profile {row}: {counters.answered} of {total} answered "
            f"({counters.snapshot()})"
        )
    server.close()
    per = (best - best_stub) / (batches * BATCH)
    return {"row": row, "python_ns_per_datagram": round(per, 1), "batch": BATCH}


def instructions(row: str, batches: int, sources: int) -> dict[str, Any]:
    """Instructions per datagram from two callgrind runs (startup cancels out)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("profile: --instructions needs valgrind")
    counts = []
    for b in (batches, 5 * batches):
        result = subprocess.run(
            [
                valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
                sys.executable, __file__, row, "--batches", str(b),
                "--repeat", "1", "--sources", str(sources),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        found = re.search(r"Collected : (\d+)", result.stderr)
        if found is None:
            raise SystemExit(
                f"profile: no count from callgrind: {result.stderr[-300:]}"
            )
        counts.append(int(found.group(1)))
    per = (counts[1] - counts[0]) / (4 * batches * BATCH)
    return {"row": row, "instructions_per_datagram": round(per), "batch": BATCH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", nargs="*", default=list(ROWS))
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--sources", type=int, default=32768)
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under callgrind instead of timing",
    )
    args = parser.parse_args()
    for row in args.rows:
        if row not in ROWS:
            parser.error(f"unknown row {row!r} (rows: {', '.join(ROWS)})")
        if args.instructions:
            result = instructions(row, min(args.batches, 100), args.sources)
        else:
            result = run(row, args.batches, args.repeat, args.sources)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
