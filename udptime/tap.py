"""The one wiring: command-line ``Options`` and ``makeService`` for twistd and the .tac.

``Options`` gives every option one coerce function (its errors start with the
option's name) and builds one frozen :class:`udptime.config.Config` in
``postOptions``, after the checks between options; ``build_service`` reads
only that config, in the twistd process and in each ``--workers`` process.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.application import service
from twisted.python import usage

from udptime import __version__
from udptime.aclfiles import AclFiles, read_acl
from udptime.clockstate import (
    DEFAULT_REFID,
    DEFAULT_STRATUM,
    ClockStateCache,
    read_kernel_clock,
)
from udptime.config import (
    DEFAULT_FORMAT,
    DEFAULT_PORT,
    DEFAULT_SUMMARY_INTERVAL,
    Config,
    MetricsConfig,
    NtpConfig,
    PolicyConfig,
    coerce,
    parse_count,
    parse_file_name,
    parse_ports,
    parse_positive,
    parse_stratum,
)
from udptime.core import AnsweringCore
from udptime.listener import DEFAULT_RECEIVE_BUFFER, TimeListener
from udptime.listenspec import (
    SYSTEMD,
    ListenSpec,
    parse_host,
    parse_listen,
    parse_port,
)
from udptime.metrics import ListenerStats, UdptimeCollector, parse_metrics_address
from udptime.metrics_site import Health, MetricsService, metrics_site
from udptime.ntp import refid_from_text
from udptime.nts.certificate import CertificateService
from udptime.nts.keyfile import KeyFileService
from udptime.nts.keysecret import KeySecretService
from udptime.nts.options import (
    NTS_OPT_FLAGS,
    NTS_OPT_PARAMETERS,
    KeService,
    nts_config,
    nts_gauges,
    nts_metric_families,
    nts_services,
    parse_ntp_server,
)
from udptime.nts.responder import NtsResponder
from udptime.policy import (
    DEFAULT_LOOP_PORTS,
    DEFAULT_RATE_LIMIT,
    DEFAULT_TABLE_SIZE,
    Policy,
    parse_cidr,
    parse_rate_limit,
)
from udptime.protocol import TimeProtocol, ns_clock
from udptime.registry import Context, Format, format_names, get_format
from udptime.roughtime import options as roughtime
from udptime.signals import SignalService
from udptime.summary import SummaryService
from udptime.tcpservice import host_port
from udptime.workers import WorkerSupervisor


def parse_format(text: str) -> str:
    """The name of a registered reply format."""
    try:
        return get_format(text).name
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def parse_listen_spec(text: str) -> ListenSpec:
    """A ``--listen`` value whose format is registered."""
    fmt, host, port = parse_listen(text)
    try:
        parse_format(fmt)
    except ValueError as exc:
        raise ValueError(f"--listen {text!r}: {exc}") from None
    return ListenSpec(fmt, host, port)


_listen = coerce("--listen", parse_listen_spec)
_allow = coerce("--allow", parse_cidr)
_deny = coerce("--deny", parse_cidr)
_nts_server = coerce("--nts-server", parse_ntp_server)


def make_policy(config: PolicyConfig) -> Policy:
    """One admission policy for all listeners: a source's budget is per server."""
    return Policy(
        rate_limit=config.rate_limit,
        table_size=config.table_size,
        leak=config.leak,
        allow=config.allow,
        deny=config.deny,
        deny_kiss=config.deny_kiss,
        loop_ports=config.loop_ports,
    )


class Options(usage.Options):
    """udptime's command line; after parsing, :attr:`config` holds the result."""

    synopsis = "[options]"
    longdesc = (
        "Serve the current time over UDP: ctime text (the default, as the "
        "socketserver recipe), RFC 867 daytime, RFC 868 time or NTPv4/SNTP "
        "server mode, with per-source rate limiting on by default. "
        f"This is udptime {__version__}."
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
        *NTS_OPT_FLAGS,
    ]
    # Each parameter: [long, short, default, doc, coerce]. Defaults are written
    # as they would be typed (so --help shows them so) and coerced in __init__.
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", DEFAULT_PORT, "UDP port to serve.", coerce("--port", parse_port)],
        [
            "interface",
            "i",
            None,
            (
                "Address to bind (default: all IPv4 addresses); '::' serves "
                "IPv6 (and IPv4 where the OS maps it)."
            ),
            coerce("--interface", parse_host),
        ],
        [
            "format",
            "f",
            DEFAULT_FORMAT,
            "Reply format: " + ", ".join(format_names()) + ".",
            coerce("--format", parse_format),
        ],
        [
            "stratum",
            None,
            DEFAULT_STRATUM,
            (
                "NTP: stratum advertised while the kernel clock is synchronised "
                "(1-15; 2: we serve a clock disciplined by a stratum-1 upstream)."
            ),
            coerce("--stratum", parse_stratum),
        ],
        [
            "local-stratum",
            None,
            None,
            (
                "NTP: serve an unsynchronised local clock anyway, at this stratum "
                "(1-15) with refid LOCL, like chrony's 'local stratum'. Without it an "
                "unsynchronised kernel clock is advertised as LI=3, stratum 16. "
                "Roughtime too serves an unsynchronised clock only with it."
            ),
            coerce("--local-stratum", parse_stratum),
        ],
        [
            "rate-limit",
            None,
            str(DEFAULT_RATE_LIMIT),
            (
                "Per-source limit RATE/BURST: replies a second and bucket size per "
                "IPv4 address or IPv6 /64, or 'off'."
            ),
            coerce("--rate-limit", parse_rate_limit),
        ],
        [
            "rate-limit-leak",
            None,
            0,
            (
                "Answer every Nth request over the limit anyway (0: off), so a "
                "spoofed victim is not shut out completely."
            ),
            coerce("--rate-limit-leak", parse_count),
        ],
        [
            "rate-limit-table",
            None,
            DEFAULT_TABLE_SIZE,
            (
                "Most sources the rate limiter tracks; the least recently seen is "
                "evicted (memory stays bounded under floods from many sources)."
            ),
            coerce("--rate-limit-table", parse_positive),
        ],
        [
            "allow-file",
            None,
            None,
            (
                "Also serve only the networks in this file (one CIDR a line, # "
                "comments); re-read on SIGHUP."
            ),
            coerce("--allow-file", parse_file_name),
        ],
        [
            "deny-file",
            None,
            None,
            "Also never serve the networks in this file; re-read on SIGHUP.",
            coerce("--deny-file", parse_file_name),
        ],
        [
            "loop-ports",
            None,
            ",".join(str(p) for p in sorted(DEFAULT_LOOP_PORTS)),
            (
                "Source ports the text formats never answer (echo, daytime, qotd, "
                "chargen, time: services that answer anything); port 0 never is."
            ),
            coerce("--loop-ports", parse_ports),
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
            coerce("--receive-buffer", parse_count),
        ],
        [
            "metrics",
            None,
            None,
            (
                "Serve Prometheus metrics on [HOST:]PORT at /metrics (a bare port "
                "binds 127.0.0.1). Off by default."
            ),
            coerce("--metrics", parse_metrics_address),
        ],
        [
            "summary-interval",
            None,
            DEFAULT_SUMMARY_INTERVAL,
            "Seconds between summary log lines (counts per listener); 0: none.",
            coerce("--summary-interval", parse_count),
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
            coerce("--workers", parse_positive),
        ],
        [
            "refid",
            None,
            DEFAULT_REFID.rstrip(b"\0").decode("ascii"),
            (
                "NTP: reference id while synchronised: the upstream's IPv4 address, "
                "or up to 4 ASCII characters."
            ),
            coerce("--refid", refid_from_text),
        ],
        *NTS_OPT_PARAMETERS,
        *roughtime.ROUGHTIME_OPT_PARAMETERS,
    ]

    #: the parsed command line, set by ``postOptions``
    config: Config

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # usage.Options coerces given values only: the defaults written as
        # text go through the same coerce functions here.
        for long, _short, default, _doc, coerce_option in self.optParameters:
            if isinstance(default, str):
                self[long] = coerce_option(default)
        self["listen"] = []
        self["allow"] = []
        self["deny"] = []
        self["nts-server"] = []

    def opt_allow(self, value: str) -> None:
        """Serve only these networks (CIDR, IPv4 or IPv6); repeatable."""
        self["allow"].append(_allow(value))

    def opt_deny(self, value: str) -> None:
        """Never serve these networks (CIDR); repeatable; deny wins over allow."""
        self["deny"].append(_deny(value))

    def opt_nts_server(self, value: str) -> None:
        """NTS-KE: NTP server NAME[:PORT] to hand clients, repeatable (one per
        session, by client address); default: clients use the NTS-KE host."""
        self["nts-server"].append(_nts_server(value))

    def opt_listen(self, value: str) -> None:
        """FORMAT@[HOST:]PORT, FORMAT@[IPV6]:PORT, FORMAT@systemd:N; repeatable."""
        self["listen"].append(_listen(value))

    def _acl_file(self, option: str) -> str | None:
        """The file of ``--allow-file``/``--deny-file``, checked readable now."""
        path: str | None = self[option]
        if path is not None:
            try:
                read_acl(path)
            except ValueError as exc:
                raise usage.UsageError(f"--{option}: {exc}") from None
        return path

    def postOptions(self) -> None:
        listeners = tuple(self["listen"]) or (
            ListenSpec(self["format"], self["interface"] or "", self["port"]),
        )
        if self["workers"] > 1 and any(s.host == SYSTEMD for s in listeners):
            raise usage.UsageError(
                "--workers: cannot share systemd sockets: run one instance per socket"
            )
        seen: set[tuple[str, int]] = set()
        for spec in listeners:
            address = (spec.host, spec.port)
            if (spec.port or spec.host == SYSTEMD) and address in seen:
                raise usage.UsageError(
                    f"--listen {spec.describe()!r}: address given twice"
                )
            seen.add(address)
        metrics = self["metrics"]
        self.config = Config(
            listeners=listeners,
            policy=PolicyConfig(
                rate_limit=self["rate-limit"],
                table_size=self["rate-limit-table"],
                leak=self["rate-limit-leak"],
                allow=tuple(self["allow"]),
                deny=tuple(self["deny"]),
                deny_kiss=bool(self["deny-kiss"]),
                loop_ports=self["loop-ports"],
                allow_file=self._acl_file("allow-file"),
                deny_file=self._acl_file("deny-file"),
            ),
            ntp=NtpConfig(
                stratum=self["stratum"],
                local_stratum=self["local-stratum"],
                refid=self["refid"],
            ),
            nts=nts_config(self, listeners),
            metrics=None if metrics is None else MetricsConfig(*metrics),
            roughtime=roughtime.roughtime_config(self, listeners),
            workers=self["workers"],
            receive_buffer=self["receive-buffer"],
            batch=not self["no-batch"],
            verbose=bool(self["verbose"]),
            summary_interval=self["summary-interval"],
        )


def _gauges(
    policy: Policy | None, nts: Sequence[Any] = ()
) -> Callable[[], dict[str, tuple[str, float]]]:
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
        values.update(nts_gauges(nts))
        return values

    return gauges


def _health(top: UdptimeService, workers: int) -> Health:
    """``/healthz``: serving while every listener, worker and NTS-KE port is."""

    def health() -> tuple[bool, str]:
        states = []
        for listener in top.listeners:
            where = host_port(listener.stats.address, listener.stats.port)
            states.append((f"{listener.stats.format}@{where}", bool(listener.running)))
        states += [("NTS-KE", bool(s.running)) for s in top if s.name == "nts-ke"]
        lines = [f"{name}: {'serving' if up else 'stopped'}" for name, up in states]
        ok = all(up for _, up in states)
        if top.supervisor is not None:
            running = len(top.supervisor.pids())
            ok = ok and running == workers - 1
            lines.append(f"worker processes: {running} of {workers - 1} running")
        return ok, "\n".join(lines)

    return health


def _counters(
    services: list[Any], listeners: list[TimeListener]
) -> Callable[[], dict[str, tuple[str, float]]]:
    keys = [s for s in services if isinstance(s, KeyFileService)]
    ke = [s.factory.ke for s in services if isinstance(s, KeService)]

    def counters() -> dict[str, tuple[str, float]]:
        values = _nts_counters(listeners, ke)
        if keys:
            values["nts_key_save_failures"] = (
                "NTS keys file saves that failed (cookies stay under the saved key).",
                float(keys[0].save_failures),
            )
        return values

    return counters


def _nts_counters(
    listeners: list[TimeListener], ke: list[Any]
) -> dict[str, tuple[str, float]]:
    """This process's NTS counts, 0 without NTS (not its workers')."""
    nts = [
        responder.counters
        for responder in (listener.protocol.core.responder for listener in listeners)
        if isinstance(responder, NtsResponder)
    ]
    return {
        "nts_authenticated": (
            "NTS requests answered with an authenticated reply.",
            float(sum(c.authenticated for c in nts)),
        ),
        "nts_naks": (
            (
                "NTS NAKs sent: the cookie did not open (another host's keys or "
                "secret, or expired) or the request failed authentication."
            ),
            float(sum(c.naks for c in nts)),
        ),
        "nts_cookies": (
            "NTS cookies sent in NTP replies.",
            float(sum(c.cookies for c in nts)),
        ),
        "nts_ke_sessions": (
            "NTS-KE sessions that handed out cookies.",
            float(sum(factory.counters.completed for factory in ke)),
        ),
    }


def _families(*sources: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[Any]]:
    """Whole metric families from each of *sources*, one after another."""

    def families() -> Iterator[Any]:
        for source in sources:
            yield from source()

    return families


def _roles(config: Config, services: list[Any]) -> list[str]:
    """What this host serves: its listeners' formats, ``nts`` when it answers
    NTS on NTP, ``nts-ke`` when it serves key exchange (``udptime_role``)."""
    roles = sorted({spec.format for spec in config.listeners})
    if config.nts is not None and "ntp" in roles:
        roles.append("nts")
    if any(isinstance(s, KeService) for s in services):
        roles.append("nts-ke")
    return roles


class UdptimeService(service.MultiService):
    """All of one udptime process: listeners, workers, metrics, summaries."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.listeners: list[TimeListener] = []
        self.supervisor: WorkerSupervisor | None = None
        #: SIGHUP reloads: services add what they can reload to its reloaders
        self.signals: SignalService | None = None

    def stats(self) -> list[ListenerStats]:
        """Every listener's counters, this process's and its workers'."""
        own = [listener.stats for listener in self.listeners]
        if self.supervisor is None:
            return own
        return own + self.supervisor.all_stats()


@dataclass(frozen=True)
class WorkerRole:
    """What makes a process a ``--workers`` worker rather than the twistd one.

    A worker serves the sockets its supervisor bound for it (one per listener,
    in order) and labels its counters with its index; it serves no NTS-KE and
    no metrics and starts no workers: the twistd process does those.
    """

    index: int
    sockets: tuple[socket.socket, ...]


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
    return build_service(options.config, reactor)


def build_service(
    config: Config,
    reactor: Any,
    *,
    worker: WorkerRole | None = None,
) -> UdptimeService:
    """The server *config* describes: the twistd process's, or *worker*'s."""
    top = UdptimeService()
    sockets: Sequence[socket.socket | None]
    if worker is None:
        label, sockets = "0", [None] * len(config.listeners)
        serve_ke, supervise, metrics = True, config.workers > 1, config.metrics
    else:
        label, sockets = str(worker.index), worker.sockets
        serve_ke, supervise, metrics = False, False, None
    policy = make_policy(config.policy)
    ntp_ports = [spec.port for spec in config.listeners if spec.format == "ntp"]
    nts, nts_cookies = nts_services(
        config, reactor, ntp_ports[0] if ntp_ports else 123, serve_ke=serve_ke
    )
    for service_ in nts:
        service_.setServiceParent(top)
    roughtime_keys, roughtime_settings = roughtime.roughtime_services(config, reactor)
    context = Context(
        wall_clock_ns=ns_clock(reactor),
        clock_state=ClockStateCache(
            reactor.seconds,
            read_kernel_clock,
            stratum=config.ntp.stratum,
            local_stratum=config.ntp.local_stratum,
            refid=config.ntp.refid,
        ),
        nts_cookies=nts_cookies,
        roughtime=roughtime_settings,
    )
    for spec, sock in zip(config.listeners, sockets, strict=True):
        listener = listener_for(
            get_format(spec.format),
            spec,
            context,
            reactor,
            policy=policy,
            verbose=config.verbose,
            batch=config.batch,
            reuse_port=config.workers > 1,
            receive_buffer=config.receive_buffer,
            sock=sock,
        )
        protocol = listener.protocol
        listener.stats.worker = label
        if metrics is not None:
            # Observed per datagram, so kept only where it is served.
            protocol.latency = listener.stats.latency
        listener.setName(spec.describe())  # type: ignore[no-untyped-call]
        listener.setServiceParent(top)  # type: ignore[no-untyped-call]
        top.listeners.append(listener)
    if supervise:
        top.supervisor = WorkerSupervisor(top.listeners, config, reactor)
        top.supervisor.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.signals = SignalService(reactor)
    if top.supervisor is not None:
        top.signals.also.append(top.supervisor.signal_workers)
    policy_config = config.policy
    if policy_config.allow_file or policy_config.deny_file:
        ke_policies = [
            s.factory.policy
            for s in nts
            if isinstance(s, KeService) and s.factory.policy is not None
        ]
        acl = AclFiles(
            [policy, *ke_policies],
            policy_config.allow,
            policy_config.deny,
            policy_config.allow_file,
            policy_config.deny_file,
        )
        acl.apply(*acl.lists())
        top.signals.reloaders["access lists"] = acl.reload
    for service_ in nts:
        if isinstance(service_, KeySecretService):
            top.signals.reloaders["NTS key secrets"] = service_.reload
        if isinstance(service_, CertificateService):
            top.signals.reloaders["NTS certificate"] = service_.reload
    top.signals.setName("signals")  # type: ignore[no-untyped-call]
    top.signals.setServiceParent(top)  # type: ignore[no-untyped-call]
    roughtime.attach(top, roughtime_keys)
    if metrics is not None:
        collector = UdptimeCollector(
            top.stats,
            _gauges(policy, nts),
            _counters(nts, top.listeners),
            _roles(config, nts),
            families=_families(
                roughtime.metric_families(top.listeners, roughtime_keys),
                nts_metric_families(nts),
            ),
        )
        site = metrics_site(collector, reactor, _health(top, config.workers))
        server = MetricsService(metrics.host, metrics.port, site, reactor)
        server.setName("metrics")  # type: ignore[no-untyped-call]
        server.setServiceParent(top)  # type: ignore[no-untyped-call]
    if config.summary_interval:
        # Workers log their own summaries; this process summarises its own.
        summary = SummaryService(
            config.summary_interval,
            lambda: [listener.stats for listener in top.listeners],
            reactor,
            also=[
                *(s.factory.summarise for s in nts if isinstance(s, KeService)),
                *roughtime.summary_lines(top.listeners, roughtime_keys),
            ],
        )
        summary.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
