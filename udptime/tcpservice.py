"""A TCP listener service that binds before privileges drop and fails in one line.

twistd calls ``privilegedStartService`` before ``--uid``/``--gid``, and
``TCPServer`` binds there, so privileged ports work. What Twisted would
print for a bind failure is a traceback; an operator gets one line naming
what could not listen where, and exit status 1, before anything is served.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import internet
from twisted.internet.error import CannotListenError
from twisted.logger import Logger


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, brackets around an IPv6 address, ``0.0.0.0`` for all."""
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NamedTCPServer(internet.TCPServer):
    """``TCPServer`` serving *what* (``"metrics"``, ``"NTS-KE"``) on *host*:*port*."""

    log = Logger()

    def __init__(
        self,
        what: str,
        host: str,
        port: int,
        factory: Any,
        reactor: Any,
        *,
        backlog: int = 50,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            port, factory, interface=host, backlog=backlog, reactor=reactor
        )
        self.what = what
        self.host = host
        self.port = port
        self.factory = factory

    def _getPort(self) -> Any:
        try:
            port = super()._getPort()  # type: ignore[no-untyped-call]
        except CannotListenError as exc:
            error: Any = exc.socketError
            why = getattr(error, "strerror", None) or str(error)
            sys.stderr.write(
                f"udptime: cannot listen on TCP {host_port(self.host, self.port)} "
                f"({self.what}): {why}\n"
            )
            sys.stderr.flush()
            raise SystemExit(1) from None
        address = port.getHost()
        self.log.info(
            "serving {what} on TCP {host} port {port}",
            what=self.what,
            host=address.host,
            port=address.port,
        )
        return port

    @property
    def bound_port(self) -> int:
        port: Any = self._port
        assert port is not None, f"{self.what} service not started"
        return int(port.getHost().port)
