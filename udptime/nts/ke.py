"""The NTS-KE server (RFC 8915 section 4): TLS 1.3, ALPN ``ntske/1``, TCP 4460.

One request, one response, then the server closes: the client sends its
records (next protocol NTPv4, AEAD algorithms) up to End of Message; the
server answers with its choices, the NTP server and port when configured,
and eight cookies sealing the keys both sides export from the TLS session.

Bounded against abuse:

- TLS 1.3 only, and only with ALPN ``ntske/1`` (any other offer gets a fatal
  ``no_application_protocol`` alert; no offer at all is closed after the
  handshake);
- *timeout* seconds from connect to response, handshake included;
- a request longer than *max_request* bytes closes the connection;
- at most *max_connections* at once;
- a per-source connection rate limit (a :class:`udptime.policy.Policy` of its
  own) and the server's access lists, checked before any TLS work is done.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from udptime.logthrottle import LogThrottle
from udptime.nts import records as rec
from udptime.nts.cookies import (
    AEAD_KEY_LENGTHS,
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    Random,
)
from udptime.nts.keyset import KeyHolder, KeySet
from udptime.policy import ANSWER, Policy, PolicyError, RateLimit, pack_host

ALPN = b"ntske/1"
EXPORTER_LABEL = b"EXPORTER-network-time-security"
DEFAULT_KE_PORT = 4460
NTP_PORT = 123
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_REQUEST = 1024
DEFAULT_MAX_CONNECTIONS = 100
#: Per source (IPv4 address or IPv6 /64): a client needs a session a day or so.
DEFAULT_KE_RATE_LIMIT = RateLimit(0.2, 20)
COOKIES_PER_RESPONSE = 8
#: In order of preference.
SUPPORTED_AEADS = (rec.AEAD_AES_SIV_CMAC_256,)

#: ``(label, length, context) -> bytes``: TLS keying material export (RFC 5705).
Exporter = Callable[[bytes, int, bytes], bytes]


def export_keys(exporter: Exporter, aead: int) -> CookieKeys:
    """C2S and S2C for NTPv4 with *aead*, from the TLS session (RFC 8915 5.1)."""
    length = AEAD_KEY_LENGTHS[aead]
    context = rec.u16(rec.PROTOCOL_NTPV4) + rec.u16(aead)
    return CookieKeys(
        aead,
        exporter(EXPORTER_LABEL, length, context + b"\x00"),
        exporter(EXPORTER_LABEL, length, context + b"\x01"),
    )


@dataclass(frozen=True)
class KeSettings:
    """What the server tells clients besides cookies."""

    #: The NTP port, sent when not 123; ``None`` or 0 sends nothing.
    ntp_port: int | None = None
    #: The NTP server name or address, sent when given.
    ntp_server: str | None = None


#: An NTP server NTS-KE may hand out: name or address, and port (``None``:
#: the settings' port).
NtpServer = tuple[str, int | None]


def server_settings(
    settings: KeSettings, servers: Sequence[NtpServer], client: str
) -> KeSettings:
    """*settings* with the NTP server for *client* (its address as text).

    Rendezvous hashing: each client goes to the server whose hash with the
    client's address is highest, so it gets the same one from every NTS-KE
    host and after every restart, with no state kept, and taking a server
    out of the list moves only that server's clients.
    """
    if not servers:
        return settings

    def weight(server: NtpServer) -> bytes:
        text = f"{server[0]} {server[1]} {client}".encode()
        return hashlib.blake2b(text, digest_size=8).digest()

    name, port = max(servers, key=weight)
    return KeSettings(settings.ntp_port if port is None else port, name)


def respond(
    request: list[rec.Record],
    exporter: Exporter,
    key_set: KeySet,
    settings: KeSettings,
    random: Random = os.urandom,
) -> list[rec.Record]:
    """The response records to a complete request (End of Message last).

    Records are read in order and the first problem decides the error, as
    chrony does: an unknown critical record is error 0, a record a client
    must not send or a malformed one is error 1 (bad request).
    """
    protocol_records = aead_records = 0
    protocols: list[int] = []
    aeads: list[int] = []
    code: int | None = None
    for record in request:
        kind = record.type
        try:
            if kind == rec.NEXT_PROTOCOL:
                if not record.critical:
                    code = rec.ERROR_BAD_REQUEST
                else:
                    protocol_records += 1
                    protocols += rec.u16_list(record.body)
            elif kind == rec.AEAD_ALGORITHM:
                aead_records += 1
                aeads += rec.u16_list(record.body)
            elif kind in (rec.ERROR, rec.WARNING, rec.NEW_COOKIE):
                code = rec.ERROR_BAD_REQUEST
            elif kind in (rec.END_OF_MESSAGE, rec.NTPV4_SERVER, rec.NTPV4_PORT):
                # A client may ask for a server or port; we name our own.
                pass
            elif record.critical:
                code = rec.ERROR_UNRECOGNIZED_CRITICAL
        except rec.RecordError:
            code = rec.ERROR_BAD_REQUEST
        if code is not None:
            break
    if code is None and (
        protocol_records != 1
        or not protocols
        or (rec.PROTOCOL_NTPV4 in protocols and (aead_records != 1 or not aeads))
    ):
        code = rec.ERROR_BAD_REQUEST
    if code is not None:
        return [rec.error(code), rec.end_of_message()]
    if rec.PROTOCOL_NTPV4 not in protocols:
        return [rec.next_protocol([]), rec.end_of_message()]
    chosen = next((a for a in aeads if a in SUPPORTED_AEADS), None)
    if chosen is None:
        return [
            rec.next_protocol([rec.PROTOCOL_NTPV4]),
            rec.aead_algorithm([]),
            rec.end_of_message(),
        ]
    keys = export_keys(exporter, chosen)
    response = [
        rec.next_protocol([rec.PROTOCOL_NTPV4]),
        rec.aead_algorithm([chosen]),
    ]
    if settings.ntp_port and settings.ntp_port != NTP_PORT:
        response.append(rec.ntpv4_port(settings.ntp_port))
    if settings.ntp_server:
        response.append(rec.ntpv4_server(settings.ntp_server))
    response += [
        rec.new_cookie(key_set.seal(keys, random(COOKIE_NONCE_LENGTH)))
        for _ in range(COOKIES_PER_RESPONSE)
    ]
    response.append(rec.end_of_message())
    return response


# -- TLS ----------------------------------------------------------------------


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    # An empty answer makes OpenSSL end the handshake with a fatal
    # no_application_protocol alert (RFC 7301 section 3.2).
    return ALPN if ALPN in offered else b""


def tls_context(cert_path: str, key_path: str) -> SSL.Context:
    """A TLS 1.3-only server context for NTS-KE; ``SSL.Error`` for bad files."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate_chain_file(cert_path)
    context.use_privatekey_file(key_path)
    context.check_privatekey()
    context.set_alpn_select_callback(_select_alpn)
    # One request per connection: nothing to resume, no ticket key to keep.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class TlsServerCreator:
    """Hands Twisted's TLS protocol a connection on our own TLS 1.3 context."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        return SSL.Connection(self.context, None)


# -- the protocol ---------------------------------------------------------------


@dataclass
class KeCounters:
    """NTS-KE activity since start."""

    accepted: int = 0
    refused_busy: int = 0
    refused_policy: int = 0
    sessions: int = 0
    no_agreement: int = 0
    errors_sent: int = 0
    timeouts: int = 0
    oversized: int = 0
    bad_alpn: int = 0


@implementer(IHandshakeListener)
class KeProtocol(Protocol):
    """One NTS-KE session, below TLS: the decrypted request in, response out."""

    def __init__(self, factory: KeFactory, peer: IAddress) -> None:
        self.factory = factory
        self.peer = peer
        self._buffer = b""
        self._done = False
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.factory.active += 1
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        self.factory.counters.timeouts += 1
        self._abort("timed out")

    def _abort(self, why: str) -> None:
        self._done = True
        self.factory.note(self.peer, why)
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _tls(self) -> Any:
        """The transport's ``OpenSSL.SSL.Connection`` (``None`` without TLS)."""
        get_handle = getattr(self.transport, "getHandle", None)
        return get_handle() if get_handle is not None else None

    def handshakeCompleted(self) -> None:
        tls = self._tls()
        if tls is None or tls.get_alpn_proto_negotiated() != ALPN:
            self.factory.counters.bad_alpn += 1
            self._abort("refused: no ntske/1 ALPN")
        elif tls.get_protocol_version_name() != "TLSv1.3":  # pragma: no cover
            self._abort("refused: not TLS 1.3")

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if len(self._buffer) > self.factory.max_request:
            self.factory.counters.oversized += 1
            self._abort(f"request over {self.factory.max_request} bytes")
            return
        try:
            parsed = rec.parse_message(self._buffer)
        except rec.RecordError:
            self._send([rec.error(rec.ERROR_BAD_REQUEST), rec.end_of_message()])
            return
        if parsed is not None:
            self._answer(parsed[0])

    def _answer(self, request: list[rec.Record]) -> None:
        tls = self._tls()
        if tls is None or tls.get_alpn_proto_negotiated() != ALPN:
            self._abort("refused: no ntske/1 ALPN")
            return
        factory = self.factory
        try:
            response = respond(
                request,
                tls.export_keying_material,
                factory.keys.key_set,
                server_settings(
                    factory.settings,
                    factory.servers,
                    str(getattr(self.peer, "host", "")),
                ),
            )
        except Exception as exc:  # noqa: BLE001 - the client gets error 2, we a log line
            factory.log.failure(
                "NTS-KE: answering {peer} failed", Failure(exc), peer=self.peer
            )
            response = [rec.error(rec.ERROR_INTERNAL), rec.end_of_message()]
        self._send(response)

    def _send(self, response: list[rec.Record]) -> None:
        self._done = True
        factory = self.factory
        if response[0].type == rec.ERROR:
            factory.counters.errors_sent += 1
            factory.note(self.peer, f"error {rec.u16_list(response[0].body)[0]} sent")
        elif any(record.type == rec.NEW_COOKIE for record in response):
            factory.counters.sessions += 1
            factory.note(self.peer, f"session: {len(response)} records sent")
        else:
            factory.counters.no_agreement += 1
            factory.note(self.peer, "no protocol or AEAD algorithm in common")
        transport = self.transport
        assert transport is not None
        transport.write(rec.encode_records(response))
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.active -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class KeFactory(Factory):
    """Makes :class:`KeProtocol` sessions and holds what they share."""

    log = Logger()
    noisy = False

    def __init__(
        self,
        keys: KeyHolder,
        clock: IReactorTime,
        settings: KeSettings | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_request: int = DEFAULT_MAX_REQUEST,
        verbose: bool = False,
        servers: Sequence[NtpServer] = (),
    ) -> None:
        self.keys = keys
        self.clock = clock
        self.settings = settings or KeSettings()
        #: NTP servers to hand out, one per session (:func:`server_settings`)
        self.servers = tuple(servers)
        self.timeout = timeout
        self.max_request = max_request
        self.verbose = verbose
        self.active = 0
        self.counters = KeCounters()

    def buildProtocol(self, addr: IAddress | None) -> KeProtocol:
        assert addr is not None
        return KeProtocol(self, addr)

    def note(self, peer: IAddress, what: str) -> None:
        if self.verbose:
            self.log.info("NTS-KE {peer}: {what}", peer=_peer_text(peer), what=what)


def _peer_text(peer: IAddress | None) -> str:
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    return f"{host} port {port}" if host is not None else repr(peer)


class KeTlsFactory(TLSMemoryBIOFactory):
    """The listening factory: admission first, then TLS around :class:`KeFactory`.

    Refused connections (``buildProtocol`` returns ``None``) are closed by
    the TCP port before a byte of TLS is spent on them.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        creator: TlsServerCreator,
        wrapped: KeFactory,
        *,
        policy: Policy | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        super().__init__(creator, False, wrapped, wrapped.clock)
        self.ke = wrapped
        self.policy = policy
        self.max_connections = max_connections
        self._refusals = LogThrottle(wrapped.clock)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        ke = self.ke
        if ke.active >= self.max_connections:
            ke.counters.refused_busy += 1
            self._refused(addr, "too many connections")
            return None
        policy = self.policy
        if policy is not None:
            host = getattr(addr, "host", None)
            port = getattr(addr, "port", 0)
            try:
                packed = pack_host(host) if isinstance(host, str) else None
            except PolicyError:
                packed = None
            if packed is None or (
                policy.admit(packed, port, ke.clock.seconds(), False, False)
                is not ANSWER
            ):
                ke.counters.refused_policy += 1
                self._refused(addr, "rate limit or access list")
                return None
        ke.counters.accepted += 1
        return super().buildProtocol(addr)

    def _refused(self, addr: IAddress | None, why: str) -> None:
        allowed, suppressed = self._refusals.allow()
        if allowed:
            self.log.emit(
                LogLevel.warn,
                "NTS-KE: refused {peer} ({why}; {suppressed} similar suppressed)",
                peer=_peer_text(addr),
                why=why,
                suppressed=suppressed,
            )
