"""The NTS-KE server (RFC 8915 section 4): TLS 1.3, ALPN ``ntske/1``, TCP 4460.

One request, one response, then the server closes: the client sends its
records (next protocol NTPv4, AEAD algorithms) up to End of Message; the
server answers with its choices, the NTP server and port when configured,
and eight cookies sealing the keys both sides export from the TLS session.

Bounded against abuse:

- TLS 1.3 only, and only with ALPN ``ntske/1`` (any other offer gets a fatal
  ``no_application_protocol`` alert, RFC 7301 section 3.2; no offer at all is
  closed after the handshake);
- three deadlines from connect: the first TLS byte within
  *first_byte_timeout*, the end of the handshake within *handshake_timeout*,
  the response within *timeout*;
- a request longer than *max_request* bytes closes the connection;
- at most *max_connections* at once, fewer per address and per IPv6 /64, and
  a full server evicts a connection still waiting for its first byte (or
  handshake) rather than refuse a newcomer (:mod:`udptime.nts.slots`);
- a per-source connection rate limit (a :class:`udptime.policy.Policy` of its
  own) and the server's access lists, checked before any TLS work is done.

Every connection ends in one outcome, counted in :class:`KeCounters`: a
completed exchange, or a failure with one of :data:`FAILURE_REASONS`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from udptime.logthrottle import LogThrottle
from udptime.nts import records as rec
from udptime.nts.certificate import CertificateError, CertificatePair, load_pair
from udptime.nts.cookies import (
    AEAD_KEY_LENGTHS,
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    Random,
)
from udptime.nts.keyset import KeyHolder, KeySet
from udptime.nts.slots import (
    DEFAULT_PER_ADDRESS,
    DEFAULT_PER_NETWORK,
    Slot,
    SlotTable,
    Stage,
)
from udptime.policy import (
    ANSWER,
    DENY,
    DENY_KISS,
    Policy,
    PolicyError,
    RateLimit,
    pack_host,
)

ALPN = b"ntske/1"
EXPORTER_LABEL = b"EXPORTER-network-time-security"
DEFAULT_KE_PORT = 4460
NTP_PORT = 123
DEFAULT_TIMEOUT = 10.0
#: From connect: a client sends its ClientHello at once, so a connection still
#: silent after this holds a slot for nothing.
DEFAULT_FIRST_BYTE_TIMEOUT = 2.0
#: From connect: a TLS 1.3 handshake is one round trip after the ClientHello.
DEFAULT_HANDSHAKE_TIMEOUT = 4.0
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


class AlpnRefused(SSL.Error):
    """The client offered ALPN without ``ntske/1``."""

    def __init__(self) -> None:
        # Shaped like OpenSSL's error queue, as Twisted reads SSL.Error.
        super().__init__([("udptime", "NTS-KE", "no ntske/1 among the ALPN offers")])


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes:
    if ALPN in offered:
        return ALPN
    # Raising makes OpenSSL end the handshake with a fatal no_application_protocol
    # alert (120), as RFC 7301 section 3.2 requires. Returning b"" would send
    # internal_error (80); pyOpenSSL's NO_OVERLAPPING_PROTOCOLS would carry on
    # without ALPN.
    raise AlpnRefused


def context_for(pair: CertificatePair) -> SSL.Context:
    """A TLS 1.3-only server context for NTS-KE serving *pair*."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    try:
        context.use_certificate(pair.chain[0])
        for extra in pair.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(pair.key)
        context.check_privatekey()
    except SSL.Error as exc:
        raise CertificateError(
            f"--tls-cert {pair.cert_path!r} / --tls-key {pair.key_path!r}: "
            f"OpenSSL refuses them ({exc})"
        ) from None
    context.set_alpn_select_callback(_select_alpn)
    # One request per connection: nothing to resume, no ticket key to keep.
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    return context


def tls_context(cert_path: str, key_path: str) -> SSL.Context:
    """:func:`context_for` the pair in these files; :class:`CertificateError`."""
    return context_for(load_pair(cert_path, key_path))


@implementer(IOpenSSLServerConnectionCreator)
class TlsServerCreator:
    """Hands Twisted's TLS protocol a connection on the current TLS context.

    Replacing :attr:`context` (a certificate reload) changes what new
    handshakes present; connections made before keep theirs.
    """

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        return SSL.Connection(self.context, None)


# -- the protocol ---------------------------------------------------------------

COMPLETED = "completed"
#: Why a key exchange failed, one per connection that did not complete:
#: ``tls`` the handshake failed or the client left during it; ``alpn`` no
#: ``ntske/1`` offered; ``records`` a bad, oversized, incomplete or
#: unanswerable request (an Error record, or nothing in common); ``internal``
#: our fault (error 2 sent); ``timeout`` a deadline passed; ``rate`` and
#: ``denied`` refused by the rate limit or access lists at connect; ``cap``
#: refused at connect or evicted because the connection caps were reached.
FAILURE_REASONS = (
    "tls",
    "alpn",
    "records",
    "internal",
    "timeout",
    "rate",
    "denied",
    "cap",
)


@dataclass
class KeCounters:
    """NTS-KE activity since start."""

    #: connections given a slot (TLS started)
    accepted: int = 0
    #: key exchanges that sent cookies
    completed: int = 0
    #: the others, by reason (connections refused at connect included)
    failed: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(FAILURE_REASONS, 0)
    )
    #: of ``failed["cap"]``: connections pushed out by newcomers
    evicted: int = 0

    def snapshot(self) -> dict[str, int]:
        """Flat counts for summaries: accepted, completed, each reason, evicted."""
        return {
            "accepted": self.accepted,
            "completed": self.completed,
            **self.failed,
            "evicted": self.evicted,
        }


@implementer(IHandshakeListener)
class KeProtocol(Protocol):
    """One NTS-KE session, below TLS: the decrypted request in, response out.

    It also keeps the connection's deadlines and its place in the slot table:
    :class:`KeTlsProtocol` reports the first byte, TLS the handshake.
    """

    #: its place in the admission table (``None`` when built without one)
    slot: Slot[KeProtocol] | None = None

    def __init__(self, factory: KeFactory, peer: IAddress) -> None:
        self.factory = factory
        self.peer = peer
        self._buffer = b""
        self._done = False
        self._outcome: str | None = None
        self._handshake_done = False
        self._started = 0.0
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self._started = self.factory.clock.seconds()
        self._deadline(self.factory.first_byte_timeout, "no TLS byte")

    def _deadline(self, after_connect: float, what: str) -> None:
        """(Re)arm the one timer: *what* happens unless the next stage comes."""
        if self._timer is not None:
            self._timer.cancel()
        clock = self.factory.clock
        seconds = min(after_connect, self.factory.timeout)
        delay = max(0.0, self._started + seconds - clock.seconds())
        self._timer = clock.callLater(delay, self._expired, what, seconds)

    def _expired(self, what: str, seconds: float) -> None:
        self._timer = None
        self._fail("timeout", f"{what} within {seconds:g} s of connecting")

    def first_byte_received(self) -> None:
        """The client spoke: out of the first-byte stage."""
        if self._outcome is not None:
            return
        if self.slot is not None:
            self.slot.advance(Stage.HANDSHAKE)
        self._deadline(self.factory.handshake_timeout, "TLS handshake not finished")

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        tls = self._tls()
        if tls is None or tls.get_alpn_proto_negotiated() != ALPN:
            self._fail("alpn", "refused: no ntske/1 ALPN")
            return
        if tls.get_protocol_version_name() != "TLSv1.3":  # pragma: no cover
            self._fail("tls", "refused: not TLS 1.3")
            return
        if self.slot is not None:
            self.slot.advance(Stage.SESSION)
        self._deadline(self.factory.timeout, "no complete request")

    def evict(self) -> None:
        """Pushed out by a newcomer while the server is full."""
        if self._outcome is None:
            self.factory.counters.evicted += 1
        self._fail("cap", "evicted: the server is full and this one was slowest")

    def _finish(self, outcome: str, why: str) -> None:
        """Count this connection's one outcome (later ones are consequences)."""
        if self._outcome is not None:
            return
        self._outcome = outcome
        counters = self.factory.counters
        if outcome == COMPLETED:
            counters.completed += 1
        else:
            counters.failed[outcome] += 1
        self.factory.note(self.peer, why)

    def _fail(self, reason: str, why: str) -> None:
        self._done = True
        self._finish(reason, why)
        if self.slot is not None:
            self.slot.release()  # now, not when the close is done
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _tls(self) -> Any:
        """The transport's ``OpenSSL.SSL.Connection`` (``None`` without TLS)."""
        get_handle = getattr(self.transport, "getHandle", None)
        return get_handle() if get_handle is not None else None

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if len(self._buffer) > self.factory.max_request:
            self._fail("records", f"request over {self.factory.max_request} bytes")
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
            self._fail("alpn", "refused: no ntske/1 ALPN")
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
        if response[0].type == rec.ERROR:
            code = rec.u16_list(response[0].body)[0]
            reason = "internal" if code == rec.ERROR_INTERNAL else "records"
            self._finish(reason, f"error {code} sent")
        elif any(record.type == rec.NEW_COOKIE for record in response):
            self._finish(COMPLETED, f"session: {len(response)} records sent")
        else:
            self._finish("records", "no protocol or AEAD algorithm in common")
        # The session deadline stays armed: a client that never reads the
        # response must not hold its slot past it.
        transport = self.transport
        assert transport is not None
        transport.write(rec.encode_records(response))
        transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.slot is not None:
            self.slot.release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._outcome is None:
            if reason.check(AlpnRefused):
                self._finish("alpn", "refused: no ntske/1 among its ALPN offers")
            elif not self._handshake_done:
                self._finish("tls", f"TLS failed: {reason.getErrorMessage()}")
            else:
                self._finish("records", "closed before a complete request")


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
        first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
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
        self.first_byte_timeout = first_byte_timeout
        self.handshake_timeout = handshake_timeout
        self.max_request = max_request
        self.verbose = verbose
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


class KeTlsProtocol(BufferingTLSTransport):
    """Twisted's TLS wrapper, telling the session when the first byte arrives."""

    _heard = False

    def dataReceived(self, data: bytes) -> None:
        if not self._heard:
            self._heard = True
            wrapped = self.wrappedProtocol
            if isinstance(wrapped, KeProtocol):
                wrapped.first_byte_received()
        super().dataReceived(data)  # type: ignore[no-untyped-call]


class KeTlsFactory(TLSMemoryBIOFactory):
    """The listening factory: admission first, then TLS around :class:`KeFactory`.

    Refused connections (``buildProtocol`` returns ``None``) are closed by
    the TCP port before a byte of TLS is spent on them.
    """

    log = Logger()
    noisy = False
    protocol = KeTlsProtocol

    def __init__(
        self,
        creator: TlsServerCreator,
        wrapped: KeFactory,
        *,
        policy: Policy | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        per_address: int = DEFAULT_PER_ADDRESS,
        per_network: int = DEFAULT_PER_NETWORK,
    ) -> None:
        super().__init__(creator, False, wrapped, wrapped.clock)
        self.creator = creator
        self.ke = wrapped
        self.policy = policy
        self.slots: SlotTable[KeProtocol] = SlotTable(
            max_connections, per_address, per_network
        )
        self._refusals = LogThrottle(wrapped.clock)
        self._last: dict[str, int] = {}

    @property
    def active(self) -> int:
        """Connections holding a slot now."""
        return len(self.slots)

    def buildProtocol(self, addr: IAddress | None) -> Any:
        ke = self.ke
        host = getattr(addr, "host", None)
        try:
            packed = pack_host(host) if isinstance(host, str) else None
        except PolicyError:
            packed = None
        policy = self.policy
        if policy is not None:
            decision = (
                None
                if packed is None
                else policy.admit(
                    packed, getattr(addr, "port", 0), ke.clock.seconds(), False, False
                )
            )
            if decision is not ANSWER:
                denied = decision in (None, DENY, DENY_KISS)
                self._refuse(
                    addr,
                    "denied" if denied else "rate",
                    "access list" if denied else "rate limit",
                )
                return None
        slot, why, evicted = self.slots.admit(packed or b"")
        if slot is None:
            self._refuse(addr, "cap", why)
            return None
        if evicted is not None and evicted.handle is not None:
            victim = evicted.handle
            self._warn(victim.peer, "evicted (server full, handshake unfinished)")
            victim.evict()
        ke.counters.accepted += 1
        wrapper = super().buildProtocol(addr)
        session: Any = wrapper.wrappedProtocol
        session.slot = slot
        slot.handle = session
        return wrapper

    def _refuse(self, addr: IAddress | None, reason: str, why: str) -> None:
        self.ke.counters.failed[reason] += 1
        self._warn(addr, f"refused ({why})")

    def _warn(self, addr: IAddress | None, what: str) -> None:
        allowed, suppressed = self._refusals.allow()
        if allowed:
            self.log.emit(
                LogLevel.warn,
                "NTS-KE: {peer}: {what}; {suppressed} similar suppressed",
                peer=_peer_text(addr),
                what=what,
                suppressed=suppressed,
            )

    def summarise(self, interval: float) -> None:
        """One log line: key exchanges since the last one (for the summaries)."""
        now = self.ke.counters.snapshot()
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        failed = {r: delta[r] for r in FAILURE_REASONS if delta[r]}
        self.log.info(
            "NTS-KE: {completed} completed, {failed_total} failed{detail}, "
            "{active} open now, in the last {interval} s",
            completed=delta["completed"],
            failed_total=sum(failed.values()),
            detail=(
                " (" + ", ".join(f"{r} {n}" for r, n in failed.items()) + ")"
                if failed
                else ""
            ),
            active=self.active,
            interval=interval,
            summary=True,
            nts_ke=delta,
        )
