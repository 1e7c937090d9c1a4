"""The one wiring: command-line ``Options`` and ``makeService`` for twistd and the .tac."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.application import internet, service
from twisted.python import usage

from udptime.clockstate import ClockStateCache, read_kernel_clock
from udptime.core import AnsweringCore
from udptime.listener import DEFAULT_RECEIVE_BUFFER, TimeListener
from udptime.listenspec import (
    SYSTEMD,
    ListenSpec,
    parse_host,
    parse_listen,
    parse_port,
)
from udptime.metrics import (
    ListenerStats,
    UdptimeCollector,
    metrics_site,
    parse_metrics_address,
)
from udptime.ntp import refid_from_text
from udptime.nts.keyfile import KeyFileService
from udptime.nts.options import NTS_OPT_PARAMETERS, check_nts_options, nts_services
from udptime.policy import (
    DEFAULT_LOOP_PORTS,
    DEFAULT_TABLE_SIZE,
    Policy,
    parse_cidr,
    parse_rate_limit,
)
from udptime.protocol import TimeProtocol, ns_clock
from udptime.registry import Context, Format, format_names, get_format
from udptime.summary import SummaryService
from udptime.workers import WorkerSupervisor

DEFAULT_PORT = 20000


def _usage(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Report a parser's ``ValueError`` as the one-line ``UsageError`` twistd prints."""

    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from None

    return coerce


def _count(text: str) -> int:
    value = int(text, 10)
    if value < 0:
        raise ValueError(f"expected a count >= 0, not {text!r}")
    return value


def _positive(text: str) -> int:
    value = int(text, 10)
    if value < 1:
        raise ValueError(f"expected a number >= 1, not {text!r}")
    return value


def _ports(text: str) -> frozenset[int]:
    ports = frozenset(int(part, 10) for part in text.split(",") if part.strip())
    if any(not 0 <= port <= 65535 for port in ports):
        raise ValueError(f"ports must be 0-65535: {text!r}")
    return ports


def make_policy(options: Options) -> Policy | None:
    """One admission policy for all listeners: a source's budget is per server."""
    policy = Policy(
        rate_limit=options["rate-limit"],
        table_size=options["rate-limit-table"],
        leak=options["rate-limit-leak"],
        allow=options["allow"],
        deny=options["deny"],
        deny_kiss=bool(options["deny-kiss"]),
        loop_ports=options["loop-ports"],
    )
    return policy


def _stratum(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise usage.UsageError(f"stratum must be a number 1-15, not {text!r}") from None
    if not 1 <= value <= 15:
        raise usage.UsageError(f"stratum {value} is out of range 1-15")
    return value


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the current time over UDP: ctime text (the default, as the "
        "socketserver recipe), RFC 867 daytime, RFC 868 time or NTPv4/SNTP "
        "server mode, with per-source rate limiting on by default."
    )

    optFlags: ClassVar[list[list[Any]]] = [
        [
            "no-batch",
            None,
            (
                "Serve with Twisted's one-datagram-at-a-time UDP port even where the "
                "Linux recvmmsg/sendmmsg fast path is available."
            ),
        ],
        [
            "deny-kiss",
            None,
            "NTP: answer denied sources with a DENY Kiss-o'-Death instead of silence.",
        ],
        [
            "verbose",
            "v",
            "Log every request (off by default: floods stay out of the log).",
        ],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", DEFAULT_PORT, "UDP port to serve.", _usage(parse_port)],
        [
            "interface",
            "i",
            "",
            (
                "Address to bind: default all IPv4; '::' serves IPv6 (and IPv4 "
                "where the OS maps it)."
            ),
            _usage(parse_host),
        ],
        ["format", "f", "ctime", "Reply format: " + ", ".join(format_names()) + "."],
        [
            "stratum",
            None,
            2,
            (
                "NTP: stratum advertised while the kernel clock is synchronised "
                "(1-15; 2: we serve a clock disciplined by a stratum-1 upstream)."
            ),
            _stratum,
        ],
        [
            "local-stratum",
            None,
            None,
            (
                "NTP: serve an unsynchronised local clock anyway, at this stratum "
                "(1-15) with refid LOCL, like chrony's 'local stratum'. Without it an "
                "unsynchronised kernel clock is advertised as LI=3, stratum 16."
            ),
            _stratum,
        ],
        [
            "rate-limit",
            None,
            "10/50",
            (
                "Per-source limit RATE/BURST: replies a second and bucket size per "
                "IPv4 address or IPv6 /64, or 'off'."
            ),
            _usage(parse_rate_limit),
        ],
        [
            "rate-limit-leak",
            None,
            0,
            (
                "Answer every Nth request over the limit anyway (0: off), so a "
                "spoofed victim is not shut out completely."
            ),
            _usage(_count),
        ],
        [
            "rate-limit-table",
            None,
            DEFAULT_TABLE_SIZE,
            (
                "Most sources the rate limiter tracks; the least recently seen is "
                "evicted (memory stays bounded under floods from many sources)."
            ),
            _usage(_positive),
        ],
        [
            "loop-ports",
            None,
            ",".join(str(p) for p in sorted(DEFAULT_LOOP_PORTS)),
            (
                "Source ports the text formats never answer (echo, daytime, qotd, "
                "chargen, time: services that answer anything); port 0 never is."
            ),
            _usage(_ports),
        ],
        [
            "receive-buffer",
            None,
            DEFAULT_RECEIVE_BUFFER,
            (
                "Socket receive buffer to ask for, in bytes (capped by "
                "net.core.rmem_max; 0 keeps the kernel default): bursts wait "
                "instead of being dropped."
            ),
            _usage(_count),
        ],
        [
            "metrics",
            None,
            None,
            (
                "Serve Prometheus metrics on [HOST:]PORT at /metrics (a bare port "
                "binds 127.0.0.1). Off by default."
            ),
            _usage(parse_metrics_address),
        ],
        [
            "summary-interval",
            None,
            60,
            "Seconds between summary log lines (counts per listener); 0: none.",
            _usage(_count),
        ],
        [
            "workers",
            None,
            1,
            (
                "Processes serving the same ports (SO_REUSEPORT; the kernel keeps a "
                "source on one worker). This process serves too and restarts dead "
                "workers."
            ),
            _usage(_positive),
        ],
        [
            "refid",
            None,
            "KERN",
            (
                "NTP: reference id while synchronised: the upstream's IPv4 address, "
                "or up to 4 ASCII characters."
            ),
        ],
        *NTS_OPT_PARAMETERS,
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["allow"] = []
        self["deny"] = []

    def opt_allow(self, value: str) -> None:
        """Serve only these networks (CIDR, IPv4 or IPv6); repeatable."""
        self["allow"].append(_usage(parse_cidr)(value))

    def opt_deny(self, value: str) -> None:
        """Never serve these networks (CIDR); repeatable; deny wins over allow."""
        self["deny"].append(_usage(parse_cidr)(value))

    def opt_listen(self, value: str) -> None:
        """FORMAT@[HOST:]PORT, FORMAT@[IPV6]:PORT, FORMAT@systemd:N; repeatable."""
        fmt, host, port = _usage(parse_listen)(value)
        self["listen"].append(ListenSpec(fmt, host, port))

    def parseOptions(self, options: list[str] | None = None) -> None:
        # Kept so --workers can start each worker with the same command line.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)  # type: ignore[no-untyped-call]

    def postOptions(self) -> None:
        if self["workers"] > 1 and any(s.host == SYSTEMD for s in self["listen"]):
            raise usage.UsageError(
                "--workers cannot share systemd sockets: run one instance per socket"
            )
        # usage.Options coerces given values only; defaults arrive as text.
        for key, parse in (("rate-limit", parse_rate_limit), ("loop-ports", _ports)):
            if isinstance(self[key], str):
                self[key] = _usage(parse)(self[key])
        if not self["listen"]:
            self["listen"] = [
                ListenSpec(self["format"], self["interface"], self["port"])
            ]
        for spec in self["listen"]:
            try:
                get_format(spec.format)
            except KeyError as exc:
                raise usage.UsageError(exc.args[0]) from None
        try:
            refid_from_text(self["refid"])
        except ValueError as exc:
            raise usage.UsageError(f"--refid: {exc}") from None
        check_nts_options(self)
        seen: set[tuple[str, int]] = set()
        for spec in self["listen"]:
            address = (spec.host, spec.port)
            if (spec.port or spec.host == SYSTEMD) and address in seen:
                raise usage.UsageError(f"{spec.describe()}: address given twice")
            seen.add(address)

    @property
    def listeners(self) -> list[ListenSpec]:
        return list(self["listen"])


def _gauges(policy: Policy | None) -> Callable[[], dict[str, tuple[str, float]]]:
    def gauges() -> dict[str, tuple[str, float]]:
        kernel = read_kernel_clock()
        values = {
            "clock_synchronised": (
                "1 if the kernel clock is synchronised (adjtimex), else 0.",
                float(kernel is not None and kernel.synchronised),
            ),
            "kernel_maxerror_seconds": (
                "The kernel's maximum error estimate (adjtimex maxerror).",
                kernel.maxerror / 1e6 if kernel is not None else float("nan"),
            ),
        }
        if policy is not None:
            values["rate_limit_table_entries"] = (
                "Sources in the rate limiter's table.",
                float(len(policy)),
            )
        return values

    return gauges


def _counters(services: list[Any]) -> Callable[[], dict[str, tuple[str, float]]]:
    keys = [s for s in services if isinstance(s, KeyFileService)]

    def counters() -> dict[str, tuple[str, float]]:
        if not keys:
            return {}
        return {
            "nts_key_save_failures": (
                "NTS keys file saves that failed (cookies stay under the saved key).",
                float(keys[0].save_failures),
            )
        }

    return counters


class UdptimeService(service.MultiService):
    """All of one udptime process: listeners, workers, metrics, summaries."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.listeners: list[TimeListener] = []
        self.supervisor: WorkerSupervisor | None = None

    def stats(self) -> list[ListenerStats]:
        """Every listener's counters, this process's and its workers'."""
        own = [listener.stats for listener in self.listeners]
        if self.supervisor is None:
            return own
        return own + self.supervisor.all_stats()


def listener_for(
    fmt: Format,
    spec: ListenSpec,
    context: Context,
    reactor: Any,
    *,
    policy: Policy | None = None,
    verbose: bool = False,
    batch: bool = True,
    reuse_port: bool = False,
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER,
    sock: socket.socket | None = None,
) -> TimeListener:
    """One format on one address: its responder, the core, the shell around it."""
    core = AnsweringCore(fmt.make_responder(context), policy, verbose=verbose)
    return TimeListener(
        TimeProtocol(fmt.name, core, reactor),
        spec,
        reactor,
        reuse_port=reuse_port,
        receive_buffer=receive_buffer,
        sock=sock,
        batch=batch,
        receive_timestamps=fmt.receive_timestamps,
    )


def makeService(options: Options, reactor: Any = None) -> UdptimeService:
    """The whole server for twistd and the .tac: listeners, workers, metrics.

    *reactor* defaults to the global one, imported here rather than at module
    level so that loading the plugin never installs a reactor.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return build_service(options, reactor)


def build_service(
    options: Options,
    reactor: Any,
    *,
    sockets: list[socket.socket] | None = None,
    worker: str = "0",
) -> UdptimeService:
    """``makeService`` for a worker too: *sockets* are its inherited ones."""
    top = UdptimeService()
    policy = make_policy(options)
    workers = options["workers"] if sockets is None else 1
    ntp_ports = [spec.port for spec in options.listeners if spec.format == "ntp"]
    nts, nts_cookies = nts_services(
        options, reactor, ntp_ports[0] if ntp_ports else 123, serve_ke=sockets is None
    )
    for service_ in nts:
        service_.setServiceParent(top)
    context = Context(
        wall_clock_ns=ns_clock(reactor),
        clock_state=ClockStateCache(
            reactor.seconds,
            read_kernel_clock,
            stratum=options["stratum"],
            local_stratum=options["local-stratum"],
            refid=refid_from_text(options["refid"]),
        ),
        nts_cookies=nts_cookies,
    )
    for n, spec in enumerate(options.listeners):
        listener = listener_for(
            get_format(spec.format),
            spec,
            context,
            reactor,
            policy=policy,
            verbose=bool(options["verbose"]),
            batch=not options["no-batch"],
            reuse_port=workers > 1 or sockets is not None,
            receive_buffer=options["receive-buffer"],
            sock=None if sockets is None else sockets[n],
        )
        listener.stats.worker = worker
        listener.setName(spec.describe())  # type: ignore[no-untyped-call]
        listener.setServiceParent(top)  # type: ignore[no-untyped-call]
        top.listeners.append(listener)
    if workers > 1:
        top.supervisor = WorkerSupervisor(
            top.listeners, workers, options.argv, reactor, options["receive-buffer"]
        )
        top.supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
    if options["metrics"] is not None and sockets is None:
        for listener in top.listeners:
            listener.protocol.latency = listener.stats.latency
        host, port = options["metrics"]
        site = metrics_site(
            UdptimeCollector(top.stats, _gauges(policy), _counters(nts))
        )
        metrics = internet.TCPServer(port, site, interface=host, reactor=reactor)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    if options["summary-interval"]:
        # Workers log their own summaries; this process summarises its own.
        summary = SummaryService(
            options["summary-interval"],
            lambda: [listener.stats for listener in top.listeners],
            reactor,
        )
        summary.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
