"""The server's configuration: one frozen, typed record, validated once.

``udptime.tap.Options`` turns a command line into a :class:`Config` (its
``postOptions``); everything after that reads typed fields, and worker
processes receive the same record (:meth:`Config.to_json`) instead of
parsing a command line again. The parsers here are the one check of each kind
of value: each option's coerce function in ``udptime.tap`` and
``udptime.nts.options`` is one of them wrapped by :func:`coerce`, which names
the option in the error. The records themselves do not check again.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TypeVar

from twisted.python import usage

from udptime.clockstate import DEFAULT_REFID, DEFAULT_STRATUM
from udptime.listener import DEFAULT_RECEIVE_BUFFER
from udptime.listenspec import ListenSpec
from udptime.nts.cookies import DEFAULT_ROTATE
from udptime.nts.ke import (
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_KE_RATE_LIMIT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT,
)
from udptime.nts.slots import DEFAULT_PER_ADDRESS
from udptime.policy import (
    DEFAULT_LOOP_PORTS,
    DEFAULT_RATE_LIMIT,
    DEFAULT_TABLE_SIZE,
    Network,
    RateLimit,
)

T = TypeVar("T")

DEFAULT_PORT = 20000
DEFAULT_FORMAT = "ctime"
DEFAULT_SUMMARY_INTERVAL = 60
#: Relative paths are to the working directory (twistd's ``--rundir``).
DEFAULT_KEYS_FILE = "udptime-nts-keys.json"


# --------------------------------------------------------------------------
# One parser per kind of value; ``ValueError`` says what was expected.


def coerce(option: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """*option*'s coerce function: *parse*, its ``ValueError`` a ``UsageError``
    that starts with the option's name, as twistd prints it.

    Parsers whose message already names the option and its value
    (``--listen 'x': ...``) keep their message.
    """

    def coerce_option(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            message = str(exc)
            if not message.startswith(f"{option} "):
                message = f"{option}: {message}"
            raise usage.UsageError(message) from None

    return coerce_option


def parse_count(text: str) -> int:
    """A whole number >= 0 (0 usually means "off")."""
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"expected a number >= 0, not {text!r}")
    return value


def parse_positive(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a number >= 1, not {text!r}")
    return value


def parse_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"expected a number of seconds > 0, not {text!r}")
    return value


def parse_stratum(text: str) -> int:
    """An NTP stratum a server may advertise for a clock it serves: 1-15."""
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if not 1 <= value <= 15:
        raise ValueError(f"expected a stratum 1-15, not {text!r}")
    return value


def parse_ports(text: str) -> frozenset[int]:
    """Comma-separated port numbers 0-65535; empty parts are skipped."""
    try:
        ports = frozenset(int(part, 10) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"expected port numbers separated by commas, not {text!r}"
        ) from None
    if any(not 0 <= port <= 65535 for port in ports):
        raise ValueError(f"ports must be 0-65535: {text!r}")
    return ports


def parse_file_name(text: str) -> str:
    """A path; only the empty one is refused here (files are opened later)."""
    if not text:
        raise ValueError("a file name is needed")
    return text


# --------------------------------------------------------------------------
# The records.


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Admission for every UDP listener (``udptime.policy.Policy``'s arguments)."""

    rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT
    table_size: int = DEFAULT_TABLE_SIZE
    leak: int = 0
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    deny_kiss: bool = False
    loop_ports: frozenset[int] = DEFAULT_LOOP_PORTS
    #: access-list files (one CIDR a line), added to the lists above and
    #: re-read on SIGHUP
    allow_file: str | None = None
    deny_file: str | None = None


@dataclass(frozen=True, slots=True)
class NtpConfig:
    """What the ``ntp`` format advertises about the kernel clock."""

    #: while the kernel clock is synchronised
    stratum: int = DEFAULT_STRATUM
    #: serve an unsynchronised clock anyway at this stratum (refid LOCL)
    local_stratum: int | None = None
    #: reference id while synchronised, 4 bytes
    refid: bytes = DEFAULT_REFID


@dataclass(frozen=True, slots=True)
class NtsConfig:
    """NTS (RFC 8915), present when ``--nts-ke`` or ``--nts`` is given.

    Without ``ke_port`` this host serves no NTS-KE (no TLS): it answers NTS
    on its ntp listeners with cookies NTS-KE hosts sealed under the same
    keys (``keys_file``) or the same fleet secret (``key_secret``).
    """

    ke_host: str | None = None
    ke_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keys_file: str = DEFAULT_KEYS_FILE
    #: derive the keys from this secret file instead of the keys file
    key_secret: str | None = None
    #: a second secret whose keys open cookies but never seal (rollover)
    key_secret_accept: str | None = None
    #: NTP servers NTS-KE hands out, (name, port or None), one per session;
    #: none: clients use the KE host
    servers: tuple[tuple[str, int | None], ...] = ()
    rotate: float = DEFAULT_ROTATE
    ke_rate_limit: RateLimit | None = DEFAULT_KE_RATE_LIMIT
    ke_connections: int = DEFAULT_MAX_CONNECTIONS
    ke_timeout: float = DEFAULT_TIMEOUT
    ke_first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    ke_handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    #: concurrent KE connections per address (an IPv6 /64: four times as many)
    ke_per_source: int = DEFAULT_PER_ADDRESS


@dataclass(frozen=True, slots=True)
class RoughtimeConfig:
    """Roughtime (RFC 10049), present exactly when a roughtime listener is:
    the root key file or a delegation file (one of them), and the radius
    claimed for an unsynchronised clock served under ``--local-stratum``."""

    key_file: str | None = None
    delegation_file: str | None = None
    local_radius: int | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where Prometheus ``/metrics`` is served (TCP)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Config:
    """All of one server; the defaults are udptime's defaults."""

    listeners: tuple[ListenSpec, ...] = (ListenSpec(DEFAULT_FORMAT, "", DEFAULT_PORT),)
    policy: PolicyConfig = PolicyConfig()
    ntp: NtpConfig = NtpConfig()
    nts: NtsConfig | None = None
    metrics: MetricsConfig | None = None
    roughtime: RoughtimeConfig | None = None
    #: processes serving the same ports, this one included
    workers: int = 1
    #: SO_RCVBUF to ask for; 0 keeps the kernel's
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER
    #: the recvmmsg/sendmmsg fast path where the platform has it
    batch: bool = True
    verbose: bool = False
    #: seconds between summary log lines; 0: none
    summary_interval: int = DEFAULT_SUMMARY_INTERVAL

    def to_json(self) -> str:
        """One line of JSON that :meth:`from_json` turns back into this config."""
        return json.dumps(_plain(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        """The config :meth:`to_json` wrote (a worker's, from its supervisor)."""
        data = json.loads(text)
        policy, ntp, nts, metrics = (
            data["policy"],
            data["ntp"],
            data["nts"],
            data["metrics"],
        )
        return cls(
            listeners=tuple(
                ListenSpec(s["format"], s["host"], s["port"]) for s in data["listeners"]
            ),
            policy=PolicyConfig(
                rate_limit=_rate_limit(policy["rate_limit"]),
                table_size=policy["table_size"],
                leak=policy["leak"],
                allow=tuple(ipaddress.ip_network(n) for n in policy["allow"]),
                deny=tuple(ipaddress.ip_network(n) for n in policy["deny"]),
                deny_kiss=policy["deny_kiss"],
                loop_ports=frozenset(policy["loop_ports"]),
                allow_file=policy.get("allow_file"),
                deny_file=policy.get("deny_file"),
            ),
            ntp=NtpConfig(
                stratum=ntp["stratum"],
                local_stratum=ntp["local_stratum"],
                refid=bytes.fromhex(ntp["refid"]),
            ),
            nts=None
            if nts is None
            else NtsConfig(
                ke_host=nts["ke_host"],
                ke_port=nts["ke_port"],
                tls_cert=nts["tls_cert"],
                tls_key=nts["tls_key"],
                keys_file=nts["keys_file"],
                key_secret=nts["key_secret"],
                key_secret_accept=nts["key_secret_accept"],
                servers=tuple((name, port) for name, port in nts["servers"]),
                rotate=nts["rotate"],
                ke_rate_limit=_rate_limit(nts["ke_rate_limit"]),
                ke_connections=nts["ke_connections"],
                ke_timeout=nts["ke_timeout"],
                ke_first_byte_timeout=nts["ke_first_byte_timeout"],
                ke_handshake_timeout=nts["ke_handshake_timeout"],
                ke_per_source=nts["ke_per_source"],
            ),
            metrics=None if metrics is None else MetricsConfig(**metrics),
            roughtime=None
            if data.get("roughtime") is None
            else RoughtimeConfig(**data["roughtime"]),
            workers=data["workers"],
            receive_buffer=data["receive_buffer"],
            batch=data["batch"],
            verbose=data["verbose"],
            summary_interval=data["summary_interval"],
        )


def _plain(value: object) -> Any:
    """*value* as JSON types: records as objects, bytes as hex, sets sorted."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _rate_limit(data: dict[str, Any] | None) -> RateLimit | None:
    return None if data is None else RateLimit(data["rate"], data["burst"])
