"""``udptime query -f roughtime``: one verified measurement, or a chain over
an RFC 10049 server list that turns contradicting replies into a
malfeasance report.

The exchange is the query client's (``udptime.client``: retries, timeouts,
source matching, every socket closed before the result fires); what is
Roughtime's is the codec. Every try resends the same request, whose nonce
is the only thing a reply can be matched by, and a reply counts only once
the whole chain checks out against the server's long-term key (section 5.4):
one that does not is ignored like a forged datagram, so an unverifiable
reply ends in "no valid reply", never in a time.

A chain (section 8.2) queries the listed servers one after another; the
first nonce is random, each later one ``H(previous reply || rand)``. Servers
that do not answer are skipped, the chain goes on from the last reply. If
two replies break causal order (``MIDP_i - RADI_i > MIDP_j + RADI_j`` for
``i`` received before ``j``), the whole chain is written as a malfeasance
report (section 8.4, ``application/roughtime-malfeasance+json``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer

from udptime.client import (
    NtpReply,
    QueryError,
    Result,
    _Exchange,
    iso_utc,
    resolve,
)
from udptime.roughtime import verify, wire

#: Port public Roughtime servers customarily serve; IANA assigned 5319.
DEFAULT_PORT = 2002
DEFAULT_REPORT = "roughtime-malfeasance.json"


class RoughtimeCodec:
    """One request, resent as it is; replies checked against *public_key*."""

    name = "roughtime"
    fresh_socket = False

    def __init__(
        self,
        public_key: bytes,
        nonce: bytes | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.public_key = public_key
        self.packet = verify.make_request(nonce, public_key=public_key, random=random)
        #: local times (POSIX seconds) of each try
        self.sent: list[float] = []
        self.verified: verify.Verified | None = None
        self.received = 0.0

    def request(self, now: float) -> bytes:
        self.sent.append(now)
        return self.packet

    def decode(self, datagram: bytes, received: float) -> tuple[float, NtpReply | None]:
        try:
            verified = verify.verify_response(self.packet, datagram, self.public_key)
        except verify.VerificationError as exc:
            raise ValueError(f"unverifiable ({exc})") from None
        self.verified = verified
        self.received = received
        return float(verified.midpoint), None


@dataclass(frozen=True)
class RoughtimeResult:
    """A verified reply and the exchange that produced it; local times are
    POSIX seconds, the send time that of the last try before the reply."""

    host: str
    port: int
    public_key: bytes
    verified: verify.Verified
    request: bytes
    response: bytes
    sent: float
    received: float
    tries: int

    @property
    def rtt(self) -> float:
        return self.received - self.sent

    @property
    def offset(self) -> float:
        """Server minus local clock, seconds (rough: MIDP is whole seconds)."""
        return self.verified.midpoint - (self.sent + self.received) / 2

    def as_dict(self) -> dict[str, object]:
        v = self.verified
        r = v.response
        return {
            "format": "roughtime",
            "host": self.host,
            "port": self.port,
            "time": v.midpoint,
            "time_utc": iso_utc(v.midpoint),
            "radius": v.radius,
            "earliest": v.earliest,
            "latest": v.latest,
            "offset": self.offset,
            "rtt": self.rtt,
            "version": v.version,
            "tries": self.tries,
            "public_key": _b64(self.public_key),
            "online_key": _b64(r.public_key),
            "mint": r.mint,
            "maxt": r.maxt,
            "request": _b64(self.request),
            "response": _b64(self.response),
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def query(
    reactor: Any,
    host: str,
    port: int,
    public_key: bytes,
    timeout: float = 1.0,
    retries: int = 3,
    *,
    family: int | None = None,
    nonce: bytes | None = None,
) -> defer.Deferred[RoughtimeResult]:
    """One verified Roughtime measurement; ``NoReply`` (a ``QueryError``)
    when no reply that verifies arrives in ``timeout * retries`` seconds."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, not {port}")
    if len(public_key) != wire.PUBLIC_KEY_SIZE:
        raise ValueError("an Ed25519 public key is 32 bytes")
    codec = RoughtimeCodec(public_key, nonce)

    def start(address: str) -> defer.Deferred[Result]:
        return _Exchange(reactor, (address, port), codec, timeout, retries).start()

    def done(result: Result) -> RoughtimeResult:
        assert codec.verified is not None
        sent = [t for t in codec.sent if t <= codec.received] or codec.sent
        return RoughtimeResult(
            result.host,
            result.port,
            public_key,
            codec.verified,
            codec.packet,
            result.raw,
            sent[-1],
            codec.received,
            result.tries,
        )

    return resolve(reactor, host, family).addCallback(start).addCallback(done)


def describe(result: RoughtimeResult, name: str | None = None) -> str:
    """The lines ``udptime query -f roughtime`` prints for one measurement."""
    server = _where(result.host, result.port)
    if name is not None and name != result.host:
        server = f"{name} ({server})"
    v = result.verified
    tries = f"{result.tries} {'try' if result.tries == 1 else 'tries'}"
    lines = [
        ("server", f"{server}, roughtime, answered after {tries}"),
        ("time", f"{iso_utc(v.midpoint) or '?'} ({v.midpoint})"),
        ("radius", f"{v.radius} s"),
        ("offset", f"{result.offset:+.3f} s (midpoint minus local clock)"),
        ("rtt", f"{result.rtt * 1000:.3f} ms"),
        ("verified", f"public key {_b64(result.public_key)}"),
        (
            "online key",
            f"valid {iso_utc(v.response.mint)} .. {iso_utc(v.response.maxt)}",
        ),
        ("version", f"{v.version:#x}"),
    ]
    return "\n".join(f"{key:<11} {value}" for key, value in lines)


# Chains over a server list.


@dataclass(frozen=True)
class ChainEntry:
    """One server of a chain: its result, or why there is none."""

    server: verify.ServerEntry
    result: RoughtimeResult | None = None
    rand: bytes | None = None
    error: str | None = None


@dataclass(frozen=True)
class Chain:
    entries: tuple[ChainEntry, ...]
    #: (i, j) into :attr:`answered`, i before j, that contradict each other
    contradictions: tuple[tuple[int, int], ...]

    @property
    def answered(self) -> list[ChainEntry]:
        return [e for e in self.entries if e.result is not None]

    def links(self) -> list[verify.ChainLink]:
        return [
            verify.ChainLink(e.server.public_key, r.request, r.response, e.rand)
            for e in self.answered
            if (r := e.result) is not None
        ]

    def report(self) -> dict[str, Any]:
        return verify.malfeasance_report(self.links())


def _udp_address(entry: verify.ServerEntry) -> verify.Address | None:
    return next((a for a in entry.addresses if a.protocol == "udp"), None)


async def query_chain(
    reactor: Any,
    servers: Sequence[verify.ServerEntry],
    timeout: float = 1.0,
    retries: int = 3,
    *,
    family: int | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> Chain:
    """Query *servers* in order, each nonce chained to the reply before."""
    entries: list[ChainEntry] = []
    previous: bytes | None = None
    for server in servers:
        address = _udp_address(server)
        if not server.usable or server.version != wire.VERSION_1:
            why = f"version {server.version:#x} with a {server.public_key_type} key"
            entries.append(ChainEntry(server, error=f"not usable: {why}"))
            continue
        if address is None:
            entries.append(ChainEntry(server, error="no UDP address"))
            continue
        rand = None
        if previous is None:
            nonce = random(wire.NONCE_SIZE)
        else:
            rand = random(32)
            nonce = verify.chained_nonce(previous, rand)
        try:
            result = await query(
                reactor,
                address.host,
                address.port,
                server.public_key,
                timeout,
                retries,
                family=family,
                nonce=nonce,
            )
        except (QueryError, OSError, ValueError) as exc:
            entries.append(ChainEntry(server, error=str(exc)))
            continue
        entries.append(ChainEntry(server, result, rand))
        previous = result.response
    answered = [e.result.verified for e in entries if e.result is not None]
    return Chain(tuple(entries), tuple(verify.inconsistencies(answered)))


def describe_chain(chain: Chain, report: str | None) -> str:
    lines = []
    for entry in chain.entries:
        name = entry.server.name
        if entry.result is None:
            lines.append(f"{name}: no time: {entry.error}")
            continue
        r = entry.result
        v = r.verified
        lines.append(
            f"{name} ({_where(r.host, r.port)}): {iso_utc(v.midpoint)} ±{v.radius} s, "
            f"offset {r.offset:+.3f} s, rtt {r.rtt * 1000:.3f} ms"
        )
    answered = len(chain.answered)
    verdict = "consistent" if not chain.contradictions else "CONTRADICTORY"
    lines.append(
        f"chain: {answered} of {len(chain.entries)} servers answered, {verdict}"
        + (f"; malfeasance report: {report}" if report else "")
    )
    return "\n".join(lines)


def chain_dict(chain: Chain, report: str | None) -> dict[str, object]:
    servers: list[dict[str, object]] = []
    for entry in chain.entries:
        item: dict[str, object] = {"name": entry.server.name}
        if entry.result is not None:
            item.update(entry.result.as_dict())
            item["rand"] = None if entry.rand is None else _b64(entry.rand)
        else:
            item["error"] = entry.error
        servers.append(item)
    return {
        "format": "roughtime",
        "chain": servers,
        "consistent": not chain.contradictions,
        "contradictions": [list(pair) for pair in chain.contradictions],
        "report": report,
    }


# The command line (``udptime query -f roughtime``).


def parse_public_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != wire.PUBLIC_KEY_SIZE:
        raise ValueError(f"--public-key: not a base64 Ed25519 public key: {text!r}")
    return key


def read_server_list(path: str) -> verify.ServerList:
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"--servers {path}: {exc.strerror or exc}") from None
    try:
        servers = verify.parse_server_list(text)
    except verify.ServerListError as exc:
        raise ValueError(f"--servers {path}: {exc}") from None
    if not servers.servers:
        raise ValueError(f"--servers {path}: no servers in the list")
    return servers


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with a ``udptime query`` command line as Roughtime
    sees it (a usage error), or ``None``. Parses what Roughtime needs into
    ``args.roughtime_key`` and ``args.roughtime_servers``."""
    roughtime = args.format == "roughtime"
    if not roughtime:
        given = [
            option
            for option, value in (
                ("--public-key", args.public_key),
                ("--servers", args.servers),
                ("--report", args.report),
            )
            if value is not None
        ]
        if given:
            return f"{', '.join(given)}: only with -f roughtime"
        return None
    if (args.public_key is None) == (args.servers is None):
        return "-f roughtime needs --public-key B64 (with HOST) or --servers LIST.json"
    if args.servers is not None:
        if args.host is not None or args.port is not None:
            return "--servers: the list says where the servers are; no HOST or --port"
        try:
            args.roughtime_servers = read_server_list(args.servers)
        except ValueError as exc:
            return str(exc)
        return None
    if args.report is not None:
        return "--report: only with --servers"
    try:
        args.roughtime_key = parse_public_key(args.public_key)
    except ValueError as exc:
        return str(exc)
    return None


async def run(reactor: Any, args: argparse.Namespace) -> tuple[str, str | None]:
    """What to print, and the error that makes the exit status 1 (``None``:
    0). ``QueryError`` when a single query gets no valid reply."""
    if args.servers is None:
        result = await query(
            reactor,
            args.host,
            args.port if args.port is not None else DEFAULT_PORT,
            args.roughtime_key,
            timeout=args.timeout,
            retries=args.retries,
            family=args.family,
        )
        text = (
            json.dumps(result.as_dict()) if args.json else describe(result, args.host)
        )
        return text, None
    servers: verify.ServerList = args.roughtime_servers
    chain = await query_chain(
        reactor,
        servers.servers,
        timeout=args.timeout,
        retries=args.retries,
        family=args.family,
    )
    report = None
    trouble = None
    if chain.contradictions:
        report = args.report or DEFAULT_REPORT
        Path(report).write_text(json.dumps(chain.report(), indent=2) + "\n")
        names = "; ".join(
            f"{chain.answered[i].server.name} vs {chain.answered[j].server.name}"
            for i, j in chain.contradictions
        )
        trouble = (
            f"replies contradict each other ({names}): malfeasance report "
            f"written to {report}"
        )
    elif not chain.answered:
        trouble = "no server of the list gave a valid reply"
    text = (
        json.dumps(chain_dict(chain, report))
        if args.json
        else describe_chain(chain, report)
    )
    return text, trouble
