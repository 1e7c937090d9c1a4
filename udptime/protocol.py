"""The Twisted glue: a datagram in, the format's reply out to its source."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, LogLevel

from udptime.counters import Counters
from udptime.formats import Responder
from udptime.logthrottle import LogThrottle


class TimeProtocol(DatagramProtocol):
    """Answer each datagram with what the responder makes of it.

    Errors from the network are data: a responder that raises or a send that
    fails costs that one reply, is counted, and is logged through a throttle
    so a flood cannot fill the disk. The listener never stops for them.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        responder: Responder,
        clock: IReactorTime,
        *,
        format_name: str,
        verbose: bool = False,
        counters: Counters | None = None,
    ) -> None:
        self._respond = responder
        self._clock = clock
        self.format_name = format_name
        self.verbose = verbose
        self.counters = counters if counters is not None else Counters()
        self._error_log = LogThrottle(clock)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        counters = self.counters
        counters.received += 1
        moment = self._clock.seconds()
        try:
            reply = self._respond(datagram, moment)
        except Exception as exc:  # noqa: BLE001 - one bad datagram must not stop the listener
            counters.errors += 1
            self._throttled_error("building a reply failed: {error!r}", exc, addr)
            return
        if reply is None:
            counters.ignored += 1
            if self.verbose:
                self.log.info(
                    "ignored {size} bytes from {host} port {port}",
                    size=len(datagram),
                    host=addr[0],
                    port=addr[1],
                )
            return
        transport = self.transport
        assert transport is not None, "datagram before makeConnection"
        try:
            transport.write(reply, addr)
        except OSError as exc:
            # EAGAIN/ENOBUFS on a full send buffer, EMSGSIZE, unreachable
            # networks: this reply is lost, the next datagram is served.
            counters.send_errors += 1
            self._throttled_error("sending a reply failed: {error!r}", exc, addr)
            return
        counters.answered += 1
        if self.verbose:
            self.log.info(
                "{udp_format} request of {size} bytes from {host} port {port} answered",
                udp_format=self.format_name,
                size=len(datagram),
                host=addr[0],
                port=addr[1],
            )

    def _throttled_error(self, message: str, exc: BaseException, addr: Any) -> None:
        allowed, suppressed = self._error_log.allow()
        if allowed:
            self.log.emit(
                LogLevel.warn,
                message + " (from {host} port {port}; {suppressed} similar suppressed)",
                error=exc,
                host=addr[0],
                port=addr[1],
                suppressed=suppressed,
            )
