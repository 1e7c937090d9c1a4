"""NTS on the command line: options, their checks, and the services they make.

For the tap (``udptime.tap``)::

    class Options(usage.Options):
        optFlags = [..., *NTS_OPT_FLAGS]
        optParameters = [..., *NTS_OPT_PARAMETERS]
        opt_nts_server = ...  # repeatable: self["nts-server"] is a list

        def postOptions(self):
            ...
            self.config = Config(..., nts=nts_config(self, listeners))

    def build_service(config, reactor, ...):
        ke_services, nts_factory = nts_services(config, reactor, ntp_port)
        for each ntp listener:
            responder = (nts_factory or fmt.make_responder)(settings)
        for svc in ke_services:
            svc.setServiceParent(top)

NTS is on when ``--nts-ke`` (key exchange here, and NTS on the ntp
listeners if any) or ``--nts`` (NTS on the ntp listeners, no TLS) is given.
The master keys come from the keys file or, with ``--nts-key-secret``, from
a fleet secret. Worker processes pass ``serve_ke=False``: they answer NTS
from the same keys while the main process alone serves NTS-KE.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from twisted.application import internet
from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from udptime.config import (
    DEFAULT_KEYS_FILE,
    Config,
    NtsConfig,
    coerce,
    parse_file_name,
    parse_positive,
    parse_seconds,
)
from udptime.listenspec import ListenSpec, ListenSpecError, parse_host, parse_port
from udptime.nts.certificate import (
    CertificateError,
    CertificatePair,
    CertificateService,
    load_pair,
)
from udptime.nts.cookies import DEFAULT_ROTATE, KeyFileError, decode_keys_file
from udptime.nts.derivedkeys import SecretError
from udptime.nts.ke import (
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KE_PORT,
    DEFAULT_KE_RATE_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    FAILURE_REASONS,
    KeFactory,
    KeSettings,
    KeTlsFactory,
    NtpServer,
    TlsServerCreator,
    context_for,
)
from udptime.nts.keyfile import KeyFileService
from udptime.nts.keysecret import KeySecretService, read_secret
from udptime.nts.responder import CookieJar
from udptime.nts.slots import DEFAULT_PER_ADDRESS
from udptime.policy import Policy, parse_rate_limit


def parse_ke_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[IPV6]:PORT``; a bare port binds all IPv4."""
    try:
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not rest.startswith(":") or ":" not in host:
                raise ListenSpecError("an IPv6 address is written [ADDRESS]:PORT")
            return parse_host(host), parse_port(rest[1:])
        host, colon, port_text = text.rpartition(":")
        if colon and not host:
            raise ListenSpecError("empty address before the port")
        if ":" in host:
            raise ListenSpecError("put an IPv6 address in brackets, [ADDRESS]:PORT")
        return parse_host(host), parse_port(port_text)
    except ListenSpecError as exc:
        raise ListenSpecError(f"--nts-ke {text!r}: {exc}") from None


def parse_server_name(text: str) -> str:
    """A name or address for NTS-KE's NTPv4 Server Negotiation record."""
    raw = text.encode("ascii", "replace")
    if not 1 <= len(raw) <= 255 or not all(0x21 <= b <= 0x7E for b in raw):
        raise ValueError(
            f"expected a host name or address (printable ASCII, no spaces), "
            f"not {text!r}"
        )
    return text


def parse_ntp_server(text: str) -> NtpServer:
    """``NAME``, ``NAME:PORT``, ``[IPV6]:PORT`` or a bare IPv6 address."""
    name, port = text, None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [IPV6]:PORT, not {text!r}")
        name, port_text = host, rest[1:] if rest else None
    elif text.count(":") == 1:
        name, _, port_text = text.partition(":")
    else:
        port_text = None
    if port_text is not None:
        try:
            port = parse_port(port_text)
        except ListenSpecError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        if port == 0:
            raise ValueError(f"{text!r}: port 0 is no server's")
    return parse_server_name(name), port


NTS_OPT_FLAGS: list[list[Any]] = [
    [
        "nts",
        None,
        (
            "Answer NTS (RFC 8915) on the ntp listeners without serving NTS-KE "
            "here: the cookies come from NTS-KE hosts that share --nts-keys or "
            "--nts-key-secret with this one. --nts-ke implies it."
        ),
    ],
]

NTS_OPT_PARAMETERS: list[list[Any]] = [
    [
        "nts-ke",
        None,
        None,
        (
            "Serve NTS-KE (RFC 8915: TLS 1.3, ALPN ntske/1) on TCP [HOST:]PORT "
            f"(usually {DEFAULT_KE_PORT}; a bare port binds all IPv4) and answer "
            "NTS on the ntp listeners. Off by default; needs --tls-cert and "
            "--tls-key."
        ),
        coerce("--nts-ke", parse_ke_address),
    ],
    [
        "tls-cert",
        None,
        None,
        "NTS-KE: TLS certificate chain, PEM (leaf first); re-read on SIGHUP.",
        coerce("--tls-cert", parse_file_name),
    ],
    [
        "tls-key",
        None,
        None,
        "NTS-KE: TLS private key, PEM, unencrypted; re-read on SIGHUP.",
        coerce("--tls-key", parse_file_name),
    ],
    [
        "nts-keys",
        None,
        DEFAULT_KEYS_FILE,
        (
            "NTS: file holding the cookie master keys (JSON, mode 0600; created "
            "when missing). Share it so restarts and other servers open the "
            "same cookies."
        ),
        coerce("--nts-keys", parse_file_name),
    ],
    [
        "nts-key-secret",
        None,
        None,
        (
            "NTS: derive the cookie master keys from the fleet secret in this "
            "file (hex, 32+ bytes, mode 0600) instead of --nts-keys: every host "
            "with the same secret and --nts-rotate opens every other's cookies."
        ),
        coerce("--nts-key-secret", parse_file_name),
    ],
    [
        "nts-key-secret-accept",
        None,
        None,
        (
            "NTS: a second fleet secret whose keys open cookies but never seal: "
            "the new one before a rollover, the old one after it."
        ),
        coerce("--nts-key-secret-accept", parse_file_name),
    ],
    [
        "nts-rotate",
        None,
        DEFAULT_ROTATE,
        (
            "NTS: seconds between cookie key rotations; a key still opens "
            "cookies for two more periods."
        ),
        coerce("--nts-rotate", parse_seconds),
    ],
    [
        "nts-ke-rate-limit",
        None,
        str(DEFAULT_KE_RATE_LIMIT),
        "NTS-KE: connections per source RATE/BURST (per second / bucket), or 'off'.",
        coerce("--nts-ke-rate-limit", parse_rate_limit),
    ],
    [
        "nts-ke-connections",
        None,
        DEFAULT_MAX_CONNECTIONS,
        (
            "NTS-KE: most connections at once; when full, the oldest one still "
            "in its TLS handshake is closed for a newcomer."
        ),
        coerce("--nts-ke-connections", parse_positive),
    ],
    [
        "nts-ke-timeout",
        None,
        DEFAULT_TIMEOUT,
        "NTS-KE: seconds a session may take, TLS handshake included.",
        coerce("--nts-ke-timeout", parse_seconds),
    ],
    [
        "nts-ke-first-byte-timeout",
        None,
        DEFAULT_FIRST_BYTE_TIMEOUT,
        "NTS-KE: seconds from connecting to the client's first TLS byte.",
        coerce("--nts-ke-first-byte-timeout", parse_seconds),
    ],
    [
        "nts-ke-handshake-timeout",
        None,
        DEFAULT_HANDSHAKE_TIMEOUT,
        "NTS-KE: seconds from connecting to the end of the TLS handshake.",
        coerce("--nts-ke-handshake-timeout", parse_seconds),
    ],
    [
        "nts-ke-per-source",
        None,
        DEFAULT_PER_ADDRESS,
        (
            "NTS-KE: most connections at once from one address (from one IPv6 "
            "/64: four times as many)."
        ),
        coerce("--nts-ke-per-source", parse_positive),
    ],
]


def nts_config(
    options: Mapping[str, Any], listeners: Sequence[ListenSpec]
) -> NtsConfig | None:
    """The NTS part of the config from coerced options, or ``None`` when off.

    Refuses settings that cannot work together, with the message twistd
    prints: the TLS certificate and key are loaded and the keys file read
    here, while twistd still has the privileges it starts with.
    """
    servers = tuple(options["nts-server"])
    serves_ntp = any(spec.format == "ntp" for spec in listeners)
    ke_given = [
        f"--{key}" for key in ("tls-cert", "tls-key") if options[key] is not None
    ] + (["--nts-server"] if servers else [])
    if options["nts-ke"] is None:
        if ke_given:
            raise usage.UsageError(f"{', '.join(ke_given)}: only used with --nts-ke")
        if not options["nts"]:
            given = [
                f"--{key}"
                for key in ("nts-key-secret", "nts-key-secret-accept")
                if options[key] is not None
            ]
            if given:
                raise usage.UsageError(
                    f"{', '.join(given)}: only used with --nts-ke or --nts"
                )
            return None
        if not serves_ntp:
            raise usage.UsageError("--nts needs an ntp listener (--listen ntp@...)")
        host, port, cert, key = None, None, None, None
    else:
        host, port = options["nts-ke"]
        cert, key = options["tls-cert"], options["tls-key"]
        if cert is None or key is None:
            raise usage.UsageError("--nts-ke needs --tls-cert and --tls-key")
        if not serves_ntp and not servers:
            raise usage.UsageError(
                "--nts-ke needs an ntp listener (--listen ntp@...), or "
                "--nts-server naming the hosts that serve NTP"
            )
        try:
            context_for(load_pair(cert, key))
        except CertificateError as exc:
            raise usage.UsageError(str(exc)) from None
    secret, accept = options["nts-key-secret"], options["nts-key-secret-accept"]
    if accept is not None and secret is None:
        raise usage.UsageError("--nts-key-secret-accept needs --nts-key-secret")
    if secret is not None:
        _check_secret("--nts-key-secret", secret)
        _check_secret("--nts-key-secret-accept", accept)
    else:
        _check_keys_file(options["nts-keys"])
    return NtsConfig(
        ke_host=host,
        ke_port=port,
        tls_cert=cert,
        tls_key=key,
        keys_file=options["nts-keys"],
        key_secret=secret,
        key_secret_accept=accept,
        servers=servers,
        rotate=options["nts-rotate"],
        ke_rate_limit=options["nts-ke-rate-limit"],
        ke_connections=options["nts-ke-connections"],
        ke_timeout=options["nts-ke-timeout"],
        ke_first_byte_timeout=options["nts-ke-first-byte-timeout"],
        ke_handshake_timeout=options["nts-ke-handshake-timeout"],
        ke_per_source=options["nts-ke-per-source"],
    )


def _check_secret(option: str, path: str | None) -> None:
    """Refuses a secret file that is unreadable, readable by others or not a
    secret; it is read again by each process that serves."""
    if path is None:
        return
    try:
        read_secret(path)
    except SecretError as exc:
        raise usage.UsageError(f"{option} {path!r}: {exc}") from None


def _check_keys_file(path: str) -> None:
    try:
        with open(path, "rb") as f:
            decode_keys_file(f.read())
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise usage.UsageError(
                f"--nts-keys {path!r}: no directory {directory!r}"
            ) from None
    except PermissionError:
        pass  # checked again when loaded, as the user the server runs as
    except (OSError, KeyFileError) as exc:
        raise usage.UsageError(f"--nts-keys {path!r}: {exc}") from None


#: Connections the kernel queues for accept (Twisted's default is 50). Under a
#: flood of clients reconnecting as fast as they are refused, a short queue
#: overflows and drops a real client's SYN, which it resends a second later.
KE_BACKLOG = 1024


class KeService(internet.TCPServer):
    """The NTS-KE listener: bound in ``privilegedStartService``, says where."""

    log = Logger()

    def __init__(
        self, host: str, port: int, factory: KeTlsFactory, reactor: Any
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            port, factory, interface=host, backlog=KE_BACKLOG, reactor=reactor
        )
        self.factory = factory

    def _getPort(self) -> Any:
        try:
            port = super()._getPort()  # type: ignore[no-untyped-call]
        except CannotListenError as exc:
            where = f"[{exc.interface}]" if ":" in exc.interface else exc.interface
            sys.stderr.write(
                f"udptime: cannot listen on TCP {where or '0.0.0.0'}:{exc.port} "
                f"(NTS-KE): {exc.socketError}\n"
            )
            sys.stderr.flush()
            raise SystemExit(1) from None
        address = port.getHost()
        self.log.info(
            "serving NTS-KE on TCP {host} port {port}",
            host=address.host,
            port=address.port,
        )
        return port

    @property
    def bound_port(self) -> int:
        port: Any = self._port
        assert port is not None, "NTS-KE service not started"
        return int(port.getHost().port)


def nts_services(
    config: Config,
    reactor: Any,
    ntp_port: int,
    *,
    serve_ke: bool = True,
) -> tuple[list[IService], CookieJar | None]:
    """The NTS services and the cookie keys NTS responders use, or ``([], None)``.

    Add every returned service to the server's ``MultiService``: the keys
    file's owner (:class:`KeyFileService`) and, with *serve_ke*, the
    NTS-KE listener (:class:`KeService`, bound in ``privilegedStartService``)
    and the certificate it serves (:class:`CertificateService`, whose
    ``reload`` is the SIGHUP reloader).
    The TLS certificate and key are read here, while still privileged.
    *ntp_port* is the NTP listener's port, sent to clients when not 123.
    Worker processes pass ``serve_ke=False``: the main process serves NTS-KE
    and they answer NTS requests from the shared keys file.
    """
    nts = config.nts
    if nts is None:
        return [], None
    keys: KeyFileService | KeySecretService
    if nts.key_secret is not None:
        accepted = [] if nts.key_secret_accept is None else [nts.key_secret_accept]
        keys = KeySecretService(
            nts.key_secret, reactor, accepted=accepted, rotate=nts.rotate
        )
    else:
        keys = KeyFileService(nts.keys_file, reactor, rotate=nts.rotate)
    keys.setName("nts-keys")  # type: ignore[no-untyped-call]
    services: list[IService] = [keys]
    if serve_ke and nts.ke_host is not None and nts.ke_port is not None:
        assert nts.tls_cert is not None and nts.tls_key is not None
        try:
            pair = load_pair(nts.tls_cert, nts.tls_key)
            creator = TlsServerCreator(context_for(pair))
        except CertificateError as exc:
            sys.stderr.write(f"udptime: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

        def install(new: CertificatePair) -> None:
            creator.context = context_for(new)

        certificate = CertificateService(pair, install, reactor)
        certificate.setName("nts-certificate")  # type: ignore[no-untyped-call]
        ke = KeFactory(
            keys.holder,
            reactor,
            KeSettings(ntp_port=ntp_port),
            timeout=nts.ke_timeout,
            first_byte_timeout=nts.ke_first_byte_timeout,
            handshake_timeout=nts.ke_handshake_timeout,
            verbose=config.verbose,
            servers=nts.servers,
        )
        policy = Policy(
            rate_limit=nts.ke_rate_limit,
            allow=config.policy.allow,
            deny=config.policy.deny,
            loop_ports=(),
        )
        tls = KeTlsFactory(
            creator,
            ke,
            policy=policy,
            max_connections=nts.ke_connections,
            per_address=nts.ke_per_source,
            per_network=4 * nts.ke_per_source,
        )
        ke_service = KeService(nts.ke_host, nts.ke_port, tls, reactor)
        ke_service.setName("nts-ke")  # type: ignore[no-untyped-call]
        services += [ke_service, certificate]
    return services, keys.holder


#: A metric's help and value.
Metric = tuple[str, float]


def nts_gauges(services: Sequence[IService]) -> dict[str, Metric]:
    """Gauges of the NTS services (``udptime_`` is prefixed by the collector)."""
    values: dict[str, Metric] = {}
    for svc in services:
        if isinstance(svc, CertificateService):
            values["nts_certificate_expiry_timestamp_seconds"] = (
                "When the NTS-KE certificate being served expires (Unix time).",
                svc.expiry,
            )
        elif isinstance(svc, KeService):
            values["nts_ke_connections"] = (
                "NTS-KE connections open now.",
                float(svc.factory.active),
            )
    return values


def nts_metric_families(services: Sequence[IService]) -> Callable[[], Iterator[Any]]:
    """NTS-KE's labelled counters for ``UdptimeCollector(families=...)``.

    Completed exchanges are ``udptime_nts_ke_sessions_total`` (tap.py); the
    others are counted here by reason.
    """
    factories = [svc.factory.ke for svc in services if isinstance(svc, KeService)]

    def families() -> Iterator[Any]:
        if not factories:
            return
        from prometheus_client.core import CounterMetricFamily

        failed = CounterMetricFamily(
            "udptime_nts_ke_failed",
            (
                "NTS-KE connections that got no cookies, by reason: tls, alpn, "
                "records, internal, timeout, rate, denied, cap."
            ),
            labels=["reason"],
        )
        for reason in FAILURE_REASONS:
            failed.add_metric(
                [reason], float(sum(f.counters.failed[reason] for f in factories))
            )
        yield failed

    return families
