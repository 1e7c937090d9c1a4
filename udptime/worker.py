"""Entry point of one ``--workers`` process: ``python -m udptime.worker INDEX``.

Started by :class:`udptime.workers.WorkerSupervisor` with its listening
sockets as descriptors 3.. (one per listener, in ``Config.listeners`` order).
Its stdin is a pipe from the supervisor: the first line is the twistd
process's :class:`udptime.config.Config` as JSON, and the pipe's closing
means the supervisor is gone, so the worker stops too. Logs go to stderr as
JSON lines and counter snapshots to stdout once a second, both read by the
supervisor.
"""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet import stdio, task
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure

from udptime.config import Config
from udptime.tap import WorkerRole, build_service
from udptime.workers import snapshot_line


class _Supervisor(Protocol):
    """stdin/stdout to the supervisor: snapshots out, end of file means stop."""

    def __init__(self, reactor: object) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure | None = None) -> None:
        if getattr(self._reactor, "running", False):
            self._reactor.stop()  # type: ignore[attr-defined]


def read_config(fd: int = 0) -> Config:
    """The configuration line the supervisor writes first to *fd*.

    Read with ``os.read`` rather than a buffered file: nothing past the line
    may be consumed before ``StandardIO`` takes the descriptor over.
    """
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit("udptime worker: stdin closed before the configuration")
        data += chunk
    return Config.from_json(data.decode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    index = int(args[0])
    config = read_config()
    sockets = tuple(socket.socket(fileno=3 + n) for n in range(len(config.listeners)))
    for sock in sockets:
        sock.setblocking(False)

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stderr, recordSeparator="")], redirectStandardIO=False
    )
    server = build_service(config, reactor, worker=WorkerRole(index, sockets))
    link = _Supervisor(reactor)
    pipe = stdio.StandardIO(link, reactor=reactor)

    def report() -> None:
        pipe.write(snapshot_line(server.stats()))

    server.privilegedStartService()  # type: ignore[no-untyped-call]
    server.startService()  # type: ignore[no-untyped-call]
    reporter = task.LoopingCall(report)
    reporter.clock = reactor
    reporter.start(1.0)
    reactor.addSystemEventTrigger("before", "shutdown", server.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
