"""The metrics HTTP endpoint: ``/metrics``, ``/healthz`` and nothing else.

It is reachable by anyone who can reach its port, so it is built to stay
small whatever clients do: exactly two paths (everything else 404), no
request bodies, at most :data:`MAX_CONNECTIONS` connections at once (more
are closed as soon as they are accepted, before a byte is read, so that
descriptors stay for NTS-KE and the keys file), each request's head and body
within :data:`REQUEST_TIMEOUT` of its first byte (one header line every few
seconds no longer holds a connection forever) and keep-alive connections
closed after :data:`IDLE_TIMEOUT` without a request. Deadlines run on an
injected ``IReactorTime``.

``/metrics`` is rendered in the reactor thread (reading the counters is
cheap and needs no lock), with ``prometheus_client``'s encoders imported on
first use; ``prometheus_client.twisted`` is not needed at all (it installs
the global reactor on import and renders in a thread pool).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from udptime.clockstate import STA_DEL, STA_INS, KernelClock, read_kernel_clock
from udptime.logthrottle import LogThrottle
from udptime.metrics import UdptimeCollector
from udptime.tcpservice import NamedTCPServer

#: Most HTTP connections at once; more are closed when accepted.
MAX_CONNECTIONS = 64
#: Seconds from a request's first byte to its last (head and any body).
REQUEST_TIMEOUT = 10.0
#: Seconds a connection may wait for its next request.
IDLE_TIMEOUT = 30.0

#: ``(serving, detail)``: whether every listener is serving, and one
#: ``name: state`` line per listener for the ``/healthz`` body.
Health = Callable[[], tuple[bool, str]]

_TEXT = b"text/plain; charset=utf-8"


def clock_text(kernel: KernelClock | None) -> str:
    """The kernel clock state, as ``/healthz`` reports it: ``key: value`` lines."""
    if kernel is None:
        return "clock_synchronised: unknown (adjtimex unavailable)\n"
    if not kernel.synchronised:
        leap = "alarm"  # what NTP replies advertise: LI 3
    elif kernel.status & STA_INS:
        leap = "insert"
    elif kernel.status & STA_DEL:
        leap = "delete"
    else:
        leap = "none"
    return (
        f"clock_synchronised: {'yes' if kernel.synchronised else 'no'}\n"
        f"leap: {leap}\n"
        f"maxerror_seconds: {max(kernel.maxerror, 0) / 1e6:.6f}\n"
    )


class MetricsResource(resource.Resource):
    """The whole URL space: ``/metrics``, ``/healthz``, 404 for the rest.

    A leaf, so the path is compared whole: ``/metrics/x`` and
    ``/metrics/../metrics`` are not ``/metrics``. A query string is allowed.
    """

    isLeaf = True

    def __init__(
        self,
        collector: UdptimeCollector,
        health: Health,
        clock: Callable[[], KernelClock | None] = read_kernel_clock,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        from prometheus_client import CollectorRegistry

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(collector)
        self._health = health
        self._clock = clock

    def render(self, request: server.Request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        if request.method not in (b"GET", b"HEAD"):  # HEAD: Twisted drops the body
            request.setResponseCode(http.NOT_ALLOWED)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", _TEXT)
            return b"only GET and HEAD\n"
        if request.path == b"/metrics":
            return self._metrics(request)
        if request.path == b"/healthz":
            return self._healthz(request)
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", _TEXT)
        return b"not found: only /metrics and /healthz are served\n"

    def _metrics(self, request: server.Request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(
            accept.decode("latin-1") if accept is not None else ""
        )
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)

    def _healthz(self, request: server.Request) -> bytes:
        serving, detail = self._health()
        if not serving:
            request.setResponseCode(http.SERVICE_UNAVAILABLE)
        request.setHeader(b"content-type", _TEXT)
        if detail and not detail.endswith("\n"):
            detail += "\n"
        status = "serving" if serving else "not serving"
        body = f"status: {status}\n{detail}{clock_text(self._clock())}"
        return body.encode("utf-8")


class _Request(server.Request):
    """Refuses a request body before any of it is stored."""

    def gotLength(self, length: int | None) -> None:
        if length != 0:  # None: chunked
            channel: Any = self.channel
            channel.refuse_body()
            length = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]


class _Channel(http.HTTPChannel):
    """HTTP/1.1 with a deadline per request on top of Twisted's idle timeout.

    Twisted's ``timeOut`` restarts with every byte, so it bounds only
    silence; the request deadline starts with a request's first byte and
    ends when the request is complete, whatever the pace of the bytes.
    """

    factory: MetricsSite
    _deadline: IDelayedCall | None = None
    _in_request = False
    _refused = False

    def connectionMade(self) -> None:
        self.factory.active += 1
        super().connectionMade()  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if data and self._deadline is None and not self._in_request:
            self._deadline = self.factory.reactor.callLater(
                self.factory.request_timeout, self._too_slow
            )
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _too_slow(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._in_request = True
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: http.Request) -> None:
        # Before the base class replays pipelined bytes (a new deadline).
        self._in_request = False
        super().requestDone(request)  # type: ignore[no-untyped-call]

    def refuse_body(self) -> None:
        """413 and close: neither endpoint takes a body, none is buffered."""
        self._refused = True
        self._cancel_deadline()
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self.factory.active -= 1
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class MetricsSite(server.Site):
    """A ``Site`` with a connection cap, deadlines and no access log."""

    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _Request
    noisy = False
    _logger = Logger()

    def __init__(
        self,
        root: resource.Resource,
        reactor: IReactorTime,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        super().__init__(root, timeout=idle_timeout, reactor=reactor)  # type: ignore[no-untyped-call]
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        #: connections open now
        self.active = 0
        #: connections closed at once because *max_connections* were open
        self.refused = 0
        self._refusals = LogThrottle(reactor)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        if self.active >= self.max_connections:
            self.refused += 1
            allowed, suppressed = self._refusals.allow()
            if allowed:
                self._logger.emit(
                    LogLevel.warn,
                    "metrics: refused {peer} ({limit} connections open; "
                    "{suppressed} similar suppressed)",
                    peer=f"{getattr(addr, 'host', addr)} port {getattr(addr, 'port', '')}",
                    limit=self.max_connections,
                    suppressed=suppressed,
                )
            return None  # the TCP port closes the socket
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]

    def log(self, request: object) -> None:
        """No access log line per scrape: a scrape every 15 s is not news."""


def metrics_site(
    collector: UdptimeCollector,
    reactor: IReactorTime,
    health: Health,
    *,
    clock: Callable[[], KernelClock | None] = read_kernel_clock,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> MetricsSite:
    """The site serving ``/metrics`` from *collector* and ``/healthz`` from *health*."""
    return MetricsSite(
        MetricsResource(collector, health, clock),
        reactor,
        max_connections=max_connections,
        request_timeout=request_timeout,
        idle_timeout=idle_timeout,
    )


class MetricsService(NamedTCPServer):
    """The metrics listener: bound in ``privilegedStartService`` (before
    ``--uid`` drops root, as the UDP listeners), a bind failure one line on
    stderr and exit 1 instead of a traceback."""

    def __init__(self, host: str, port: int, site: MetricsSite, reactor: Any) -> None:
        super().__init__("metrics", host, port, site, reactor)
