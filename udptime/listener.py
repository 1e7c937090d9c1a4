"""UDP listener services: bind before privileges drop, say where we listen.

Sockets are made here rather than by ``reactor.listenUDP`` so that a listener
can set ``SO_REUSEPORT`` (one socket per worker), adopt a socket handed over
by systemd, and serve it with the Linux batch port. Either way one Twisted
port owns the socket's life: adopted (``adoptDatagramPort``, or
``udptime.mmsg.port.adopt``), closed by ``stopListening``.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFDSet
from twisted.logger import Logger

from udptime.listenspec import SYSTEMD, ListenSpec
from udptime.metrics import ListenerStats
from udptime.mmsg import libc as mmsg_libc
from udptime.mmsg import port as mmsg_port
from udptime.protocol import TimeProtocol

#: Largest UDP payload over IPv4; every datagram is read whole.
MAX_DATAGRAM = 65_535


class ListenError(Exception):
    """A listener that cannot get its socket: where, and why, for the operator."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(where, reason)
        self.where = where
        self.reason = reason


#: Receive buffer asked for by default: bursts queue instead of being dropped
#: (the kernel caps it at net.core.rmem_max; its own default is ~208 KiB).
DEFAULT_RECEIVE_BUFFER = 4 << 20


def bind_socket(
    host: str,
    port: int,
    reuse_port: bool = False,
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
) -> socket.socket:
    """A bound, non-blocking UDP socket for *host* (``""``: all IPv4) and *port*."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]" if ":" in host else (host or "0.0.0.0")
        raise ListenError(f"UDP {where}:{port}", exc.strerror or str(exc)) from None
    sock.setblocking(False)
    return sock


def systemd_socket(index: int, environ: dict[str, str] | None = None) -> socket.socket:
    """Socket number *index* passed by systemd socket activation (``LISTEN_FDS``).

    Checks ``LISTEN_PID`` so a descriptor meant for another process (a parent
    that forgot to clear the environment) is never taken by mistake.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        raise ListenError(
            f"systemd:{index}",
            "no sockets were passed to this process (LISTEN_PID unset or not "
            "ours; start it from a .socket unit or systemd-socket-activate)",
        )
    count = int(env.get("LISTEN_FDS", "0") or "0")
    if not 0 <= index < count:
        raise ListenError(f"systemd:{index}", f"systemd passed {count} socket(s)")
    fd = 3 + index
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_DGRAM or sock.family not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        sock.detach()
        raise ListenError(f"systemd:{index}", f"descriptor {fd} is not a UDP socket")
    sock.setblocking(False)
    return sock


class TimeListener(service.Service):
    """One format on one UDP address, bound in ``privilegedStartService``.

    twistd calls ``privilegedStartService`` before ``--uid/--gid`` drop root,
    so ports below 1024 work without running as root afterwards. A bind
    failure ends start-up with one clear line instead of a traceback.
    """

    log = Logger()

    def __init__(
        self,
        protocol: TimeProtocol,
        spec: ListenSpec,
        reactor: Any,
        *,
        reuse_port: bool = False,
        receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
        sock: socket.socket | None = None,
        batch: bool = True,
        receive_timestamps: bool = False,
    ) -> None:
        self.protocol = protocol
        self.spec = spec
        self._reactor = reactor
        self._reuse_port = reuse_port
        self._receive_buffer = receive_buffer
        self._batch = batch
        self._timestamps = receive_timestamps
        #: labels and counters for metrics and summaries; the address is the
        #: bound one once listening
        self.stats = ListenerStats(
            protocol.format_name, spec.host or "0.0.0.0", spec.port, protocol.counters
        )
        self._sock = sock
        self._port: Any = None

    def _socket(self) -> socket.socket:
        if self._sock is not None:
            sock, self._sock = self._sock, None
            return sock
        if self.spec.host == SYSTEMD:
            return systemd_socket(self.spec.port)
        return bind_socket(
            self.spec.host, self.spec.port, self._reuse_port, self._receive_buffer
        )

    def _listen(self) -> None:
        try:
            sock = self._socket()
        except ListenError as exc:
            sys.stderr.write(
                f"udptime: cannot listen on {exc.where} ({self.spec.format}): "
                f"{exc.reason}\n"
            )
            sys.stderr.flush()
            raise SystemExit(1) from None
        try:
            if self._batch and self.batch_available():
                self._port = mmsg_port.adopt(
                    self._reactor,
                    sock,
                    self.protocol,
                    timestamps=self._timestamps,
                    clock_ns=self.protocol.clock_ns,
                    max_packet_size=MAX_DATAGRAM,
                )
            else:
                self._port = self._reactor.adoptDatagramPort(
                    sock.fileno(),
                    sock.family,
                    self.protocol,
                    maxPacketSize=MAX_DATAGRAM,
                )
        finally:
            sock.close()  # the port holds its own duplicate
        address = self._port.getHost()
        self.stats.address, self.stats.port = address.host, address.port
        self.log.info(
            "serving {udp_format} on UDP {host} port {port}",
            udp_format=self.protocol.format_name,
            host=address.host,
            port=address.port,
        )

    def batch_available(self) -> bool:
        """Whether the Linux batch port can serve here (and the reactor has FDs)."""
        return mmsg_libc.available() and IReactorFDSet.providedBy(self._reactor)

    def privilegedStartService(self) -> None:
        self._listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        if self._port is None:
            self._listen()
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        port, self._port = self._port, None
        if port is None:
            return None
        return maybeDeferred(port.stopListening)

    @property
    def port(self) -> Any:
        """The bound ``IListeningPort``; only valid once started."""
        assert self._port is not None, "listener not started"
        return self._port

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful when 0 was asked for)."""
        return int(self.port.getHost().port)
