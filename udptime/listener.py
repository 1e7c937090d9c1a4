"""UDP listener services: bind before privileges drop, say where we listen."""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import internet
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from udptime.protocol import TimeProtocol


class TimeListener(internet.UDPServer):
    """One format on one UDP address, bound in ``privilegedStartService``.

    twistd calls ``privilegedStartService`` before ``--uid/--gid`` drop root,
    so ports below 1024 work without running as root afterwards. A bind
    failure ends start-up with one clear line instead of a traceback.
    """

    log = Logger()

    def __init__(
        self, protocol: TimeProtocol, host: str, port: int, reactor: Any = None
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            port, protocol, interface=host, maxPacketSize=65535, reactor=reactor
        )
        self.protocol = protocol
        self.host = host
        self.requested_port = port

    def _getPort(self) -> Any:
        try:
            return super()._getPort()  # type: ignore[no-untyped-call]
        except CannotListenError as exc:
            where = f"[{self.host}]" if ":" in self.host else (self.host or "0.0.0.0")
            reason = getattr(exc.socketError, "strerror", None) or exc.socketError
            sys.stderr.write(
                f"udptime: cannot listen on UDP {where}:{self.requested_port} "
                f"({self.protocol.format_name}): {reason}\n"
            )
            sys.stderr.flush()
            raise SystemExit(1) from None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._announce()

    def startService(self) -> None:
        bound_before = self._port is not None
        super().startService()  # type: ignore[no-untyped-call]
        if not bound_before:
            self._announce()

    def _announce(self) -> None:
        address = self.port.getHost()
        self.log.info(
            "serving {udp_format} on UDP {host} port {port}",
            udp_format=self.protocol.format_name,
            host=address.host,
            port=address.port,
        )

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful when 0 was asked for)."""
        return int(self.port.getHost().port)

    @property
    def port(self) -> Any:
        """The bound ``IListeningPort``; only valid once started."""
        assert self._port is not None, "listener not started"
        return self._port
