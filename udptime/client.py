"""A client for the formats udptime serves: retries, timeouts, reply matching.

UDP loses datagrams in both directions and lets anyone send one, so a client
that cares must resend after a timeout and accept only replies that belong to
its request:

- NTP: the reply's origin timestamp must equal the transmit timestamp we sent,
  which is 64 random bits rather than our clock, so an off-path sender cannot
  guess it; it must also be in server mode and come from the server's address.
  The real send time is remembered for the offset and delay arithmetic. All
  tries share one socket and a late reply to an earlier try still counts: its
  origin says which send time to use.
- ctime, daytime, time: the reply carries nothing of the request, so each try
  uses a fresh socket (a fresh source port) that is closed when the next try
  starts, and only a reply from the server's address is taken.

Anything else that arrives (wrong source, wrong origin, wrong length, text that
does not parse) is counted and ignored. ``query`` is the library API; ``main``
is the ``udptime query`` command.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from udptime import __version__
from udptime.ntp import MODE_CLIENT, MODE_SERVER, PACKET_SIZE, from_ntp

FORMATS = ("ctime", "daytime", "time", "ntp")
#: ``udptime query -f`` also speaks Roughtime (``udptime.roughtime.query``).
QUERY_FORMATS = (*FORMATS, "roughtime")

#: Well-known ports, except ctime, which has none: 20000 is the recipe's;
#: Roughtime's is where public servers serve (IANA assigned 5319).
DEFAULT_PORTS = {
    "ctime": 20000,
    "daytime": 13,
    "time": 37,
    "ntp": 123,
    "roughtime": 2002,
}

#: What a client request says: no leap warning, version 4, client mode.
NTP_VERSION = 4
_NTP = struct.Struct("!BBbbII4s8s8s8s8s")

LEAP_TEXT = {
    0: "no warning",
    1: "last minute of the day has 61 seconds",
    2: "last minute of the day has 59 seconds",
    3: "unsynchronised",
}

_CTIME = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")


class QueryError(Exception):
    """A query that ended without a usable time."""


class NoReply(QueryError):
    """Every try timed out without a reply that matched its request."""

    def __init__(
        self,
        host: str,
        port: int,
        format: str,
        tries: int,
        timeout: float,
        ignored: dict[str, int] | None = None,
        send_error: OSError | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.format = format
        self.tries = tries
        self.timeout = timeout
        #: Why datagrams were ignored, with how many each.
        self.ignored = dict(ignored or {})
        #: The last error sending a request, if any send failed.
        self.send_error = send_error
        super().__init__(str(self))

    def __str__(self) -> str:
        text = (
            f"no valid {self.format} reply from {_where(self.host, self.port)} "
            f"after {self.tries} {'try' if self.tries == 1 else 'tries'} "
            f"of {self.timeout:g} s"
        )
        if self.ignored:
            reasons = ", ".join(f"{n} {why}" for why, n in self.ignored.items())
            text += f"; ignored: {reasons}"
        if self.send_error is not None:
            text += f"; sending failed: {self.send_error}"
        return text


class KissOfDeath(QueryError):
    """The NTP server answered with stratum 0: a kiss code, not a time.

    RFC 5905 7.4: ``RATE`` asks the client to slow down, ``DENY`` and ``RSTR``
    to stop; none of them is worth retrying at once, so the query ends.
    """

    def __init__(self, host: str, port: int, reply: NtpReply) -> None:
        self.host = host
        self.port = port
        self.reply = reply
        self.code = reply.refid
        super().__init__(
            f"{_where(host, port)} sent kiss-o'-death {self.code!r} instead of a time"
        )


class ResolveError(QueryError):
    """The host name resolved to no usable address."""


@dataclass(frozen=True)
class NtpReply:
    """An NTP server reply, decoded; times are POSIX seconds.

    ``originate`` (t1) and ``destination`` (t4) are our clock at send and
    receive, ``receive`` (t2) and ``transmit`` (t3) the server's stamps.
    ``precision`` is log2 seconds; ``poll`` log2 seconds.
    """

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: float
    root_dispersion: float
    refid: str
    refid_raw: bytes
    reference_time: float | None
    originate: float
    receive: float
    transmit: float
    destination: float
    offset: float
    delay: float


@dataclass(frozen=True)
class Result:
    """A matched reply: the time it carries and where it came from.

    ``time`` is POSIX seconds: the server's transmit stamp for NTP, the decoded
    text or count (whole seconds) otherwise. ``tries`` is how many requests
    were sent, the answered one included.
    """

    format: str
    host: str
    port: int
    time: float
    raw: bytes
    tries: int
    ntp: NtpReply | None = None

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready summary (``--json``)."""
        out: dict[str, object] = {
            "format": self.format,
            "host": self.host,
            "port": self.port,
            "time": self.time,
            "time_utc": iso_utc(self.time),
            "tries": self.tries,
            "raw": self.raw.hex(),
        }
        if self.ntp is None:
            if self.format != "time":
                out["text"] = self.raw.decode("ascii", "replace")
        else:
            ntp = self.ntp
            out.update(
                offset=ntp.offset,
                delay=ntp.delay,
                stratum=ntp.stratum,
                leap=ntp.leap,
                leap_text=LEAP_TEXT[ntp.leap],
                version=ntp.version,
                refid=ntp.refid,
                root_delay=ntp.root_delay,
                root_dispersion=ntp.root_dispersion,
                precision=ntp.precision,
                poll=ntp.poll,
                reference_time=ntp.reference_time,
                originate=ntp.originate,
                receive=ntp.receive,
                transmit=ntp.transmit,
                destination=ntp.destination,
            )
        return out


# Pure decoding and arithmetic.


def offset_delay(t1: float, t2: float, t3: float, t4: float) -> tuple[float, float]:
    """RFC 5905 clock offset and round-trip delay from the four timestamps."""
    return ((t2 - t1) + (t3 - t4)) / 2, (t4 - t1) - (t3 - t2)


def ntp_request(transmit: bytes) -> bytes:
    """A 48-byte NTPv4 client request whose transmit timestamp is *transmit*."""
    if len(transmit) != 8:
        raise ValueError("the transmit timestamp is 8 bytes")
    return bytes((NTP_VERSION << 3 | MODE_CLIENT,)) + bytes(39) + transmit


def refid_text(stratum: int, raw: bytes) -> str:
    """The reference id as people read it (as ntpq shows it).

    Dotted IPv4 for stratum 2-15, where it names the upstream server; ASCII
    for stratum 0 (kiss codes), 1 (reference clock names) and 16
    (unsynchronised, e.g. ``INIT``); hex when such text is not printable.
    """
    if 2 <= stratum <= 15:
        return str(ipaddress.IPv4Address(raw))
    text = raw.rstrip(b"\0")
    if all(0x20 <= byte < 0x7F for byte in text):
        return text.decode("ascii")
    return "0x" + raw.hex()


def decode_ntp(datagram: bytes, originate: float, destination: float) -> NtpReply:
    """Decode a server reply, given our send (t1) and receive (t4) times.

    Timestamps are unfolded into the era nearest *originate*. ``ValueError``
    for what no server reply to us can be: short, not server mode, or no
    transmit stamp. The origin is not checked here: the caller matches it.
    """
    if len(datagram) < PACKET_SIZE:
        raise ValueError("shorter than 48 bytes")
    (
        first,
        stratum,
        poll,
        precision,
        root_delay,
        root_dispersion,
        refid,
        reference,
        _origin,
        receive,
        transmit,
    ) = _NTP.unpack_from(datagram)
    mode = first & 0x07
    if mode != MODE_SERVER:
        raise ValueError("not NTP server mode")
    if transmit == bytes(8):
        raise ValueError("NTP transmit timestamp zero")
    t2 = from_ntp(receive, originate)
    t3 = from_ntp(transmit, originate)
    offset, delay = offset_delay(originate, t2, t3, destination)
    return NtpReply(
        leap=first >> 6,
        version=(first >> 3) & 0x07,
        mode=mode,
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay=root_delay / 65536,
        root_dispersion=root_dispersion / 65536,
        refid=refid_text(stratum, refid),
        refid_raw=refid,
        reference_time=None if reference == bytes(8) else from_ntp(reference, t3),
        originate=originate,
        receive=t2,
        transmit=t3,
        destination=destination,
        offset=offset,
        delay=delay,
    )


def decode_ctime(datagram: bytes) -> float:
    """POSIX time of a ``time.ctime()`` reply, read in *our* local time zone.

    ctime text carries no zone, so this is right only when client and server
    share one (the recipe's setting); whole seconds.
    """
    text = datagram.decode("ascii", "replace").strip()
    if not _CTIME.fullmatch(text):
        raise ValueError("not ctime text")
    try:
        return float(time.mktime(time.strptime(text, "%a %b %d %H:%M:%S %Y")))
    except (ValueError, OverflowError):
        raise ValueError("not ctime text") from None


def decode_daytime(datagram: bytes) -> float:
    """POSIX time of an RFC 3339 daytime reply (udptime's; RFC 867 fixes no syntax).

    A time without a zone is refused rather than guessed.
    """
    try:
        moment = datetime.fromisoformat(datagram.decode("ascii").strip())
    except ValueError:
        raise ValueError("not RFC 3339 text") from None
    if moment.tzinfo is None:
        raise ValueError("not RFC 3339 text")
    return moment.timestamp()


def decode_time(datagram: bytes, pivot: float) -> float:
    """POSIX time of an RFC 868 reply, in the 136-year era nearest *pivot*."""
    if len(datagram) != 4:
        raise ValueError("not 4 bytes")
    # The RFC 868 count is the seconds half of an NTP timestamp.
    return from_ntp(datagram + bytes(4), pivot)


# Per-format request and matching.


class _Codec(Protocol):
    name: str
    #: A new socket (source port) per try: the format cannot match otherwise.
    fresh_socket: bool

    def request(self, now: float) -> bytes: ...

    def decode(self, datagram: bytes, received: float) -> tuple[float, NtpReply | None]:
        """The reply's time, or ``ValueError`` naming why it is not ours."""
        ...


class _TextCodec:
    """ctime, daytime and time: any datagram is a request, the empty one will do."""

    fresh_socket = True

    def __init__(self, name: str, decode: Callable[[bytes, float], float]) -> None:
        self.name = name
        self._decode = decode

    def request(self, now: float) -> bytes:
        return b""

    def decode(self, datagram: bytes, received: float) -> tuple[float, NtpReply | None]:
        return self._decode(datagram, received), None


class _NtpCodec:
    """NTP: a random transmit stamp per try, remembered with the real send time."""

    name = "ntp"
    fresh_socket = False

    def __init__(self, random: Callable[[int], bytes] = os.urandom) -> None:
        self._random = random
        self._sent: dict[bytes, float] = {}

    def request(self, now: float) -> bytes:
        transmit = self._random(8)
        self._sent[transmit] = now
        return ntp_request(transmit)

    def decode(self, datagram: bytes, received: float) -> tuple[float, NtpReply | None]:
        if len(datagram) < PACKET_SIZE:
            raise ValueError("shorter than 48 bytes")
        originate = self._sent.get(datagram[24:32])
        if originate is None:
            raise ValueError("origin matching no request")
        reply = decode_ntp(datagram, originate, received)
        if reply.stratum == 0:
            raise _Kiss(reply)
        return reply.transmit, reply


class _Kiss(Exception):
    def __init__(self, reply: NtpReply) -> None:
        self.reply = reply


def _codec(name: str) -> _Codec:
    if name == "ntp":
        return _NtpCodec()
    if name == "ctime":
        return _TextCodec(name, lambda data, now: decode_ctime(data))
    if name == "daytime":
        return _TextCodec(name, lambda data, now: decode_daytime(data))
    if name == "time":
        return _TextCodec(name, decode_time)
    raise ValueError(f"unknown format {name!r} (known: {', '.join(FORMATS)})")


# The exchange: sockets, timers, matching.


class _Port(Protocol):
    def write(self, datagram: bytes, addr: tuple[str, int]) -> object: ...

    def stopListening(self) -> object: ...


class _Reactor(Protocol):
    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = ...
    ) -> _Port: ...

    def callLater(
        self, delay: float, callable: Callable[[], object]
    ) -> IDelayedCall: ...

    def seconds(self) -> float: ...


class _Receiver(DatagramProtocol):
    """One socket's protocol; the exchange outlives each socket it opens."""

    noisy = False

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._exchange.received(datagram, addr)


def _same_address(addr: Any, expected: tuple[str, int]) -> bool:
    """Same IP (any spelling; link-local scope aside) and port."""
    try:
        host = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        wanted = ipaddress.ip_address(expected[0].partition("%")[0])
        return host == wanted and addr[1] == expected[1]
    except (ValueError, IndexError, TypeError):
        return False


class _Exchange:
    """One query: a try, a timer, the next try, until a match or the last timeout.

    The result fires only once every socket opened is closed, so a caller that
    stops the reactor (or a test that ends) leaves nothing open behind.
    """

    def __init__(
        self,
        reactor: _Reactor,
        address: tuple[str, int],
        codec: _Codec,
        timeout: float,
        tries: int,
    ) -> None:
        self.deferred: defer.Deferred[Result] = defer.Deferred(self._cancel)
        self._reactor = reactor
        self._address = address
        self._bind = "::" if ":" in address[0] else "0.0.0.0"
        self._codec = codec
        self._timeout = timeout
        self._tries = tries
        self._sent = 0
        self._port: _Port | None = None
        self._timer: IDelayedCall | None = None
        self._closing: list[defer.Deferred[object]] = []
        self._ignored: Counter[str] = Counter()
        self._send_error: OSError | None = None
        self._done = False

    def start(self) -> defer.Deferred[Result]:
        self._try()
        return self.deferred

    def _try(self) -> None:
        self._sent += 1
        if self._port is None or self._codec.fresh_socket:
            self._close_port()
            try:
                self._port = self._reactor.listenUDP(
                    0, _Receiver(self), interface=self._bind
                )
            except Exception:  # noqa: BLE001 - no socket, no query: report it
                self._finish(Failure())
                return
        # The timer first: a transport may deliver the reply inside write().
        self._timer = self._reactor.callLater(self._timeout, self._expired)
        payload = self._codec.request(self._reactor.seconds())
        try:
            self._port.write(payload, self._address)
        except OSError as exc:
            # Unreachable network, full buffers: this try is lost like a
            # dropped datagram; the timer still runs and the next try follows.
            self._send_error = exc

    def _expired(self) -> None:
        self._timer = None
        if self._sent < self._tries:
            self._try()
            return
        host, port = self._address
        self._finish(
            Failure(
                NoReply(
                    host,
                    port,
                    self._codec.name,
                    self._sent,
                    self._timeout,
                    dict(self._ignored),
                    self._send_error,
                )
            )
        )

    def received(self, datagram: bytes, addr: Any) -> None:
        if self._done:
            return
        received = self._reactor.seconds()
        if not _same_address(addr, self._address):
            self._ignored["from a wrong source address"] += 1
            return
        try:
            moment, ntp = self._codec.decode(datagram, received)
        except _Kiss as kiss:
            self._finish(Failure(KissOfDeath(*self._address, kiss.reply)))
            return
        except ValueError as exc:
            self._ignored[str(exc)] += 1
            return
        host, port = self._address
        self._finish(
            Result(self._codec.name, host, port, moment, datagram, self._sent, ntp)
        )

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            self._closing.append(defer.maybeDeferred(port.stopListening))

    def _stop(self) -> None:
        self._done = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._close_port()

    def _finish(self, outcome: Result | Failure) -> None:
        self._stop()
        closed = defer.DeferredList(self._closing, consumeErrors=True)
        closed.addCallback(lambda _: self._fire(outcome))

    def _fire(self, outcome: Result | Failure) -> None:
        if self.deferred.called:  # cancelled while the sockets were closing
            return
        if isinstance(outcome, Failure):
            self.deferred.errback(outcome)
        else:
            self.deferred.callback(outcome)

    def _cancel(self, _: object) -> None:
        if not self._done:
            self._stop()


# Name resolution.


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self, host: str) -> None:
        self.host = host
        self.addresses: list[str] = []
        self.deferred: defer.Deferred[str] = defer.Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, IPv4Address | IPv6Address):
            self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if self.addresses:
            self.deferred.callback(self.addresses[0])
        else:
            self.deferred.errback(ResolveError(f"cannot resolve {self.host!r}"))


def resolve(reactor: Any, host: str, family: int | None = None) -> defer.Deferred[str]:
    """The address to query: *host* itself if a literal, else its first address.

    Names go through the reactor's resolver (``getaddrinfo`` in a thread, so
    IPv6 too), in the system's preference order; *family* 4 or 6 keeps only
    that kind of address.
    """
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal.partition("%")[0])
    except ValueError:
        pass
    else:
        if family is not None and address.version != family:
            return defer.fail(ResolveError(f"{host} is not an IPv{family} address"))
        return defer.succeed(literal)
    types: list[type[IAddress]] = [IPv4Address, IPv6Address]
    if family is not None:
        types = [IPv4Address if family == 4 else IPv6Address]
    receiver = _Addresses(host)
    reactor.nameResolver.resolveHostName(
        receiver, host, 0, addressTypes=types, transportSemantics="UDP"
    )
    return receiver.deferred


def query(
    reactor: Any,
    host: str,
    port: int,
    format: str,
    timeout: float = 1.0,
    retries: int = 3,
    *,
    family: int | None = None,
) -> defer.Deferred[Result]:
    """Ask *host* for the time in *format*; a ``Deferred`` firing a ``Result``.

    *reactor* provides ``IReactorUDP`` and ``IReactorTime`` (and
    ``IReactorPluggableNameResolver`` when *host* is a name, not a literal).
    *retries* is how many requests are sent in all, each waited on for
    *timeout* seconds, so ``NoReply`` comes after ``timeout * retries``.
    ``KissOfDeath`` ends an NTP query at once; ``ResolveError`` a bad name.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, not {port}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    if retries < 1:
        raise ValueError(f"retries must be at least 1, not {retries}")
    codec = _codec(format)

    def start(address: str) -> defer.Deferred[Result]:
        return _Exchange(reactor, (address, port), codec, timeout, retries).start()

    return resolve(reactor, host, family).addCallback(start)


# The command line.


def iso_utc(moment: float) -> str | None:
    """RFC 3339 UTC text for a POSIX time (microseconds unless whole)."""
    try:
        stamp = datetime.fromtimestamp(moment, UTC)
    except (OverflowError, ValueError, OSError):
        return None
    spec = "seconds" if stamp.microsecond == 0 else "microseconds"
    return stamp.isoformat(timespec=spec).replace("+00:00", "Z")


def describe(result: Result, name: str | None = None) -> str:
    """The human-readable lines ``udptime query`` prints."""
    server = _where(result.host, result.port)
    if name is not None and name != result.host:
        server = f"{name} ({server})"
    tries = f"{result.tries} {'try' if result.tries == 1 else 'tries'}"
    lines = [
        ("server", f"{server}, {result.format}, answered after {tries}"),
        ("time", f"{iso_utc(result.time) or '?'} ({result.time:.6f})"),
    ]
    ntp = result.ntp
    if ntp is None:
        if result.format == "time" and len(result.raw) == 4:
            count = int.from_bytes(result.raw, "big")
            lines.append(("reply", f"0x{result.raw.hex()} ({count} s since 1900)"))
        else:
            lines.append(("reply", repr(result.raw)))
    else:
        lines += [
            ("offset", f"{ntp.offset:+.6f} s"),
            ("delay", f"{ntp.delay:.6f} s"),
            ("stratum", str(ntp.stratum)),
            ("leap", f"{ntp.leap} ({LEAP_TEXT[ntp.leap]})"),
            ("refid", ntp.refid),
            ("version", str(ntp.version)),
            ("root delay", f"{ntp.root_delay:.6f} s"),
            ("root disp.", f"{ntp.root_dispersion:.6f} s"),
            ("precision", f"2^{ntp.precision} s"),
        ]
    return "\n".join(f"{key:<11} {value}" for key, value in lines)


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"out of range 1-65535: {text!r}")
    return value


#: ``udptime query`` exit statuses besides 0 (answered) and 2 (argparse's).
EXIT_NO_REPLY = 1
EXIT_OUTPUT = 3

EXIT_STATUSES = (
    "Exit status: 0 answered, 1 no valid reply, 2 usage error, "
    "3 answered but the result could not be written (closed pipe, full disk)."
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="udptime", description="Query a UDP time server.", epilog=EXIT_STATUSES
    )
    top.add_argument("--version", action="version", version=f"udptime {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = commands.add_parser(
        "query",
        help="ask a server for the time",
        description="Ask HOST for the time, resending after each timeout. "
        + EXIT_STATUSES,
    )
    ask.add_argument(
        "host",
        metavar="HOST",
        nargs="?",
        help="IPv4/IPv6 address or host name (not with --servers)",
    )
    ask.add_argument(
        "--port",
        "-p",
        type=_port,
        help=(
            "UDP port (default: 20000 ctime, 13 daytime, 37 time, 123 ntp, "
            "2002 roughtime)"
        ),
    )
    ask.add_argument(
        "--format", "-f", choices=QUERY_FORMATS, default="ctime", help="default: ctime"
    )
    ask.add_argument(
        "--public-key",
        metavar="B64",
        help="roughtime: the server's long-term public key (base64); replies "
        "are verified against it",
    )
    ask.add_argument(
        "--servers",
        metavar="LIST.json",
        help="roughtime: query the servers of an RFC 10049 server list in a chain",
    )
    ask.add_argument(
        "--report",
        metavar="FILE",
        help="roughtime --servers: where a malfeasance report goes if replies "
        "contradict each other (default: roughtime-malfeasance.json)",
    )
    ask.add_argument(
        "--timeout",
        "-t",
        type=_positive,
        default=1.0,
        help="seconds to wait for each reply (default: 1)",
    )
    ask.add_argument(
        "--retries",
        "-r",
        type=_count,
        default=3,
        help="requests to send in all before giving up (default: 3)",
    )
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    family = ask.add_mutually_exclusive_group()
    family.add_argument(
        "-4", dest="family", action="store_const", const=4, help="IPv4 only"
    )
    family.add_argument(
        "-6", dest="family", action="store_const", const=6, help="IPv6 only"
    )
    # Checks between options (udptime.roughtime.query.check_args) report
    # through the query command's own usage line.
    ask.set_defaults(usage_error=ask.error)
    commands.add_parser(
        "roughtime",
        help="Roughtime keys, delegations and this server's list entry",
        add_help=False,
    ).add_argument("arguments", nargs=argparse.REMAINDER)
    return top


async def run(reactor: Any, args: argparse.Namespace) -> None:
    """``udptime query`` for the NTP and text formats, from parsed arguments."""
    port = args.port if args.port is not None else DEFAULT_PORTS[args.format]
    try:
        result = await query(
            reactor,
            args.host,
            port,
            args.format,
            timeout=args.timeout,
            retries=args.retries,
            family=args.family,
        )
    except (QueryError, CannotListenError) as exc:
        sys.stderr.write(f"udptime: {exc}\n")
        raise SystemExit(EXIT_NO_REPLY) from None
    emit(json.dumps(result.as_dict()) if args.json else describe(result, args.host))


def emit(text: str) -> None:
    """Print the result; a reader that went away or a full disk is exit 3.

    The query succeeded, so "no valid reply" (1) would be a lie, and a
    traceback says nothing the one line does not.
    """
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except OSError as exc:
        # What could not be written is still buffered: point standard output
        # at /dev/null so the interpreter's last flush does not fail again.
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        except (OSError, ValueError):
            pass  # not a file descriptor: nothing will flush it at exit
        finally:
            os.close(null)
        reason = exc.strerror or str(exc)
        try:
            sys.stderr.write(f"udptime: cannot write the result: {reason}\n")
            sys.stderr.flush()
        except OSError:
            pass
        raise SystemExit(EXIT_OUTPUT) from None
