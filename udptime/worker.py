"""Entry point of one ``--workers`` process: ``python -m udptime.worker INDEX COUNT ARGS``.

Started by :class:`udptime.workers.WorkerSupervisor` with its listening
sockets as descriptors 3.. (one per listener, in ``--listen`` order) and the
same udptime options. Logs go to stderr as JSON lines and counter snapshots
to stdout once a second, both read by the supervisor; stdin is a pipe from
the supervisor whose closing means it is gone, so the worker stops too.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import stdio, task
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogBeginner, jsonFileLogObserver
from twisted.python.failure import Failure

from udptime.tap import Options, build_service
from udptime.workers import snapshot_line


class _Supervisor(Protocol):
    """stdin/stdout to the supervisor: snapshots out, end of file means stop."""

    def __init__(self, reactor: object) -> None:
        self._reactor = reactor

    def connectionLost(self, reason: Failure | None = None) -> None:
        if getattr(self._reactor, "running", False):
            self._reactor.stop()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    index, count, rest = args[0], int(args[1]), args[2:]
    options = Options()
    options.parseOptions(rest)
    options["metrics"] = None  # the supervisor serves metrics for all workers
    sockets = [socket.socket(fileno=3 + n) for n in range(count)]
    for sock in sockets:
        sock.setblocking(False)

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo(
        [jsonFileLogObserver(sys.stderr, recordSeparator="")], redirectStandardIO=False
    )
    server = build_service(options, reactor, sockets=sockets, worker=index)
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
