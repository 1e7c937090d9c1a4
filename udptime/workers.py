"""``--workers N``: N processes answering the same UDP ports.

Each listener gets one ``SO_REUSEPORT`` socket per worker, all bound by the
twistd process in ``privilegedStartService`` (so as root, before ``--uid``
drops it). The kernel spreads datagrams over the sockets by a hash of the
source address and port, so one source's requests keep landing on the same
worker and that worker's rate limiter sees all of them. (A single shared
socket adopted by every worker would instead split each source over all
workers and multiply its budget by N, and wake them all for every datagram.)

The twistd process serves socket 0 itself and supervises workers 1..N-1:
each is ``python -m udptime.worker INDEX`` holding its sockets as inherited
descriptors and reading the twistd process's configuration (``Config``, as
one line of JSON) from its stdin, so it never parses a command line. Workers log JSON events to stderr and write counter snapshots
to stdout; the supervisor re-publishes the events with a ``worker`` field
and feeds the snapshots to metrics, so logs and metrics say which worker.
A worker that dies is restarted after a second; stopping the service
(SIGTERM) stops them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from udptime.config import Config
from udptime.counters import Counters, LatencyHistogram
from udptime.listener import TimeListener, bind_socket
from udptime.metrics import ListenerStats

#: Seconds between a worker's death and its replacement.
RESTART_DELAY = 1.0
#: Seconds a worker gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 5.0


class _WorkerProtocol(ProcessProtocol):
    """Relays one worker's logs and counter snapshots into the supervisor."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self._buffers = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD, b"") + data
        *lines, self._buffers[childFD] = buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.supervisor.line_from(self.index, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """Binds the extra sockets, runs the worker processes, restarts the dead."""

    log = Logger()

    def __init__(
        self,
        listeners: Sequence[TimeListener],
        config: Config,
        reactor: Any,
    ) -> None:
        self._listeners = list(listeners)
        self._count = config.workers
        self._config = config.to_json().encode() + b"\n"
        self._reactor = reactor
        self._receive_buffer = config.receive_buffer
        self._sockets: dict[int, list[socket.socket]] = {}
        self._running: dict[int, tuple[Any, _WorkerProtocol]] = {}
        #: the latest counters each worker reported, per listener
        self.stats: dict[int, list[ListenerStats]] = {}

    def privilegedStartService(self) -> None:
        for index in range(1, self._count):
            self._sockets[index] = [
                bind_socket(
                    listener.stats.address if listener.spec.host else "",
                    listener.bound_port,
                    reuse_port=True,
                    receive_buffer=self._receive_buffer,
                )
                for listener in self._listeners
            ]
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if not self._sockets:
            self.privilegedStartService()
        for index in self._sockets:
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if not self.running or index in self._running:
            return
        fds = [s.fileno() for s in self._sockets[index]]
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({3 + n: fd for n, fd in enumerate(fds)})
        protocol = _WorkerProtocol(self, index)
        args = [sys.executable, "-m", "udptime.worker", str(index)]
        process = self._reactor.spawnProcess(
            protocol, sys.executable, args, env=dict(os.environ), childFDs=child_fds
        )
        # The worker's first read: its configuration. Nothing else is ever
        # written to its stdin; closing it tells the worker to stop.
        process.writeToChild(0, self._config)
        self._running[index] = (process, protocol)
        self.log.info(
            "worker {worker} started as pid {pid}", worker=str(index), pid=process.pid
        )

    def worker_ended(self, protocol: _WorkerProtocol, reason: Failure) -> None:
        index = protocol.index
        if self._running.get(index, (None, None))[1] is protocol:
            del self._running[index]
        self.stats.pop(index, None)
        if self.running:
            self.log.emit(
                LogLevel.warn,
                "worker {worker} ended ({reason}); restarting in {delay} s",
                worker=str(index),
                reason=reason.getErrorMessage(),
                delay=RESTART_DELAY,
            )
            self._reactor.callLater(RESTART_DELAY, self._spawn, index)

    def line_from(self, index: int, fd: int, line: bytes) -> None:
        if fd == 1:
            self._snapshot(index, line)
            return
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            event = {"log_format": "{line}", "line": line.decode("utf-8", "replace")}
        event["worker"] = str(index)
        event["log_system"] = f"worker {index}"
        globalLogPublisher(event)

    def _snapshot(self, index: int, line: bytes) -> None:
        try:
            listeners = json.loads(line)
        except ValueError:
            return
        stats = []
        for entry in listeners:
            latency = LatencyHistogram()
            latency.counts = list(entry["latency"])
            latency.total = float(entry["latency_total"])
            stats.append(
                ListenerStats(
                    entry["format"],
                    entry["address"],
                    int(entry["port"]),
                    Counters(**entry["counters"]),
                    latency,
                    worker=str(index),
                )
            )
        self.stats[index] = stats

    def all_stats(self) -> list[ListenerStats]:
        return [s for index in sorted(self.stats) for s in self.stats[index]]

    def signal_workers(self, number: int) -> None:
        """Pass a signal on (SIGHUP: every worker reloads what it can)."""
        for process, _ in list(self._running.values()):
            with contextlib.suppress(ProcessExitedAlready):
                process.signalProcess(number)

    def pids(self) -> dict[int, int]:
        return {index: process.pid for index, (process, _) in self._running.items()}

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        waits = []
        for process, protocol in list(self._running.values()):
            waits.append(protocol.ended)
            try:
                process.signalProcess("TERM")
            except ProcessExitedAlready:
                continue
            killer = self._reactor.callLater(STOP_GRACE, _kill, process)
            protocol.ended.addBoth(_cancel, killer)
        for sockets in self._sockets.values():
            for sock in sockets:
                sock.close()
        self._sockets.clear()
        return DeferredList(waits)


def _cancel(result: object, delayed: Any) -> object:
    if delayed.active():
        delayed.cancel()
    return result


def _kill(process: Any) -> None:
    with contextlib.suppress(ProcessExitedAlready):
        process.signalProcess("KILL")


def snapshot_line(stats: Sequence[ListenerStats]) -> bytes:
    """What a worker writes to stdout for the supervisor: one JSON line."""
    return (
        json.dumps(
            [
                {
                    "format": s.format,
                    "address": s.address,
                    "port": s.port,
                    "counters": s.counters.snapshot(),
                    "latency": s.latency.counts,
                    "latency_total": s.latency.total,
                }
                for s in stats
            ]
        ).encode()
        + b"\n"
    )
