"""NTS on the command line: options, their checks, and the services they make.

For the tap (``udptime.tap``)::

    class Options(usage.Options):
        optParameters = [..., *NTS_OPT_PARAMETERS]

        def postOptions(self):
            ...
            check_nts_options(self)

    def build_service(options, reactor, ...):
        ke_services, nts_factory = nts_services(options, reactor, ntp_port)
        for each ntp listener:
            responder = (nts_factory or fmt.make_responder)(settings)
        for svc in ke_services:
            svc.setServiceParent(top)

NTS is on exactly when ``--nts-ke`` is given. Worker processes pass
``serve_ke=False``: they answer NTS from the shared keys file while the main
process alone serves NTS-KE.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from OpenSSL import SSL
from twisted.application import internet
from twisted.application.service import IService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from udptime.listenspec import ListenSpecError, parse_host, parse_port
from udptime.nts.cookies import DEFAULT_ROTATE, KeyFileError, decode_keys_file
from udptime.nts.ke import (
    DEFAULT_KE_PORT,
    DEFAULT_KE_RATE_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
    KeFactory,
    KeSettings,
    KeTlsFactory,
    TlsServerCreator,
    tls_context,
)
from udptime.nts.keyfile import KeyFileService
from udptime.nts.responder import CookieJar
from udptime.policy import Policy, PolicyError, RateLimit, parse_rate_limit

#: Relative paths are to the working directory (twistd's ``--rundir``).
DEFAULT_KEYS_FILE = "udptime-nts-keys.json"


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
        raise usage.UsageError(f"--nts-ke {text!r}: {exc}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"expected seconds, not {text!r}") from None
    if not 0 < value < float("inf"):
        raise usage.UsageError(f"expected a positive number of seconds, not {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise usage.UsageError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise usage.UsageError(f"expected a number >= 1, not {text!r}")
    return value


def _ke_rate(text: str) -> RateLimit | None:
    try:
        return parse_rate_limit(text)
    except PolicyError as exc:
        raise usage.UsageError(f"--nts-ke-rate-limit: {exc}") from None


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
        parse_ke_address,
    ],
    ["tls-cert", None, None, "NTS-KE: TLS certificate chain, PEM (leaf first)."],
    ["tls-key", None, None, "NTS-KE: TLS private key, PEM."],
    [
        "nts-keys",
        None,
        DEFAULT_KEYS_FILE,
        (
            "NTS: file holding the cookie master keys (JSON, mode 0600; created "
            "when missing). Share it so restarts and other servers open the "
            "same cookies."
        ),
    ],
    [
        "nts-server",
        None,
        None,
        (
            "NTS-KE: NTP server name or address to send clients (NTPv4 Server "
            "Negotiation); default: none, clients use the NTS-KE server's address."
        ),
    ],
    [
        "nts-rotate",
        None,
        DEFAULT_ROTATE,
        (
            "NTS: seconds between cookie key rotations; a key still opens "
            "cookies for two more periods."
        ),
        _seconds,
    ],
    [
        "nts-ke-rate-limit",
        None,
        DEFAULT_KE_RATE_LIMIT,
        "NTS-KE: connections per source RATE/BURST (per second / bucket), or 'off'.",
        _ke_rate,
    ],
    [
        "nts-ke-connections",
        None,
        DEFAULT_MAX_CONNECTIONS,
        "NTS-KE: most sessions at once; more are refused.",
        _positive,
    ],
    [
        "nts-ke-timeout",
        None,
        DEFAULT_TIMEOUT,
        "NTS-KE: seconds a session may take, TLS handshake included.",
        _seconds,
    ],
]


def _text_defaults(options: Any) -> None:
    """Coerce values that arrived as text (defaults written as text, say)."""
    for key, parse in (
        ("nts-rotate", _seconds),
        ("nts-ke-timeout", _seconds),
        ("nts-ke-connections", _positive),
        ("nts-ke-rate-limit", _ke_rate),
    ):
        if isinstance(options[key], str):
            options[key] = parse(options[key])
    if isinstance(options["nts-ke"], str):
        options["nts-ke"] = parse_ke_address(options["nts-ke"])


def _check_server_name(name: str) -> None:
    raw = name.encode("ascii", "replace")
    if not 1 <= len(raw) <= 255 or not all(0x21 <= b <= 0x7E for b in raw):
        raise usage.UsageError(
            f"--nts-server {name!r}: expected a host name or address "
            "(printable ASCII, no spaces)"
        )


def check_nts_options(options: Any) -> None:
    """Refuse NTS settings that cannot work, with the message twistd prints."""
    _text_defaults(options)
    if options["nts-ke"] is None:
        given = [
            f"--{key}" for key in ("tls-cert", "tls-key", "nts-server") if options[key]
        ]
        if given:
            raise usage.UsageError(f"{', '.join(given)}: only used with --nts-ke")
        return
    cert, key = options["tls-cert"], options["tls-key"]
    if not cert or not key:
        raise usage.UsageError("--nts-ke needs --tls-cert and --tls-key")
    unreadable = [
        p for p in (cert, key) if os.path.exists(p) and not os.access(p, os.R_OK)
    ]
    try:
        # A worker started after --uid may not read the key: the main process
        # (privileged when it reads them) has checked them already.
        if not unreadable:
            tls_context(cert, key)
    except (SSL.Error, OSError) as exc:
        raise usage.UsageError(
            f"--tls-cert {cert!r} / --tls-key {key!r}: cannot use them ({exc})"
        ) from None
    if options["nts-server"] is not None:
        _check_server_name(options["nts-server"])
    path = options["nts-keys"]
    if not path:
        raise usage.UsageError("--nts-keys: a file name is needed")
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
    listeners = getattr(options, "listeners", None)
    if listeners is not None and not any(s.format == "ntp" for s in listeners):
        raise usage.UsageError("--nts-ke needs an ntp listener (--listen ntp@...)")


class KeService(internet.TCPServer):
    """The NTS-KE listener: bound in ``privilegedStartService``, says where."""

    log = Logger()

    def __init__(
        self, host: str, port: int, factory: KeTlsFactory, reactor: Any
    ) -> None:
        super().__init__(port, factory, interface=host, reactor=reactor)  # type: ignore[no-untyped-call]
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
    options: Any,
    reactor: Any,
    ntp_port: int,
    *,
    serve_ke: bool = True,
) -> tuple[list[IService], CookieJar | None]:
    """The NTS services and the cookie keys NTS responders use, or ``([], None)``.

    Add every returned service to the server's ``MultiService``: the keys
    file's owner (:class:`KeyFileService`) and, with *serve_ke*, the
    NTS-KE listener (:class:`KeService`, bound in ``privilegedStartService``).
    The TLS certificate and key are read here, while still privileged.
    *ntp_port* is the NTP listener's port, sent to clients when not 123.
    Worker processes pass ``serve_ke=False``: the main process serves NTS-KE
    and they answer NTS requests from the shared keys file.
    """
    if options["nts-ke"] is None:
        return [], None
    _text_defaults(options)
    keys = KeyFileService(options["nts-keys"], reactor, rotate=options["nts-rotate"])
    keys.setName("nts-keys")  # type: ignore[no-untyped-call]
    services: list[IService] = [keys]
    if serve_ke:
        host, port = options["nts-ke"]
        try:
            context = tls_context(options["tls-cert"], options["tls-key"])
        except (SSL.Error, OSError) as exc:
            sys.stderr.write(f"udptime: NTS-KE TLS certificate or key: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        ke = KeFactory(
            keys.holder,
            reactor,
            KeSettings(ntp_port=ntp_port, ntp_server=options["nts-server"]),
            timeout=options["nts-ke-timeout"],
            verbose=bool(options.get("verbose")),
        )
        policy = Policy(
            rate_limit=options["nts-ke-rate-limit"],
            allow=options.get("allow") or (),
            deny=options.get("deny") or (),
            loop_ports=(),
        )
        tls = KeTlsFactory(
            TlsServerCreator(context),
            ke,
            policy=policy,
            max_connections=options["nts-ke-connections"],
        )
        ke_service = KeService(host, port, tls, reactor)
        ke_service.setName("nts-ke")  # type: ignore[no-untyped-call]
        services.append(ke_service)
    return services, keys.holder
