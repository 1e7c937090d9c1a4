"""The ``ntp`` format's responder with NTS (RFC 8915 section 5).

Plain requests (48 bytes, or extension fields none of which are NTS) go to
the wrapped :class:`udptime.ntp.NtpResponder` untouched. An NTS request is
answered with that same 48-byte header followed by the Unique Identifier and
an Authenticator, sealed with the session's S2C key, carrying one fresh
cookie per cookie spent or asked for; the reply is padded to exactly the
request's length and never exceeds it. A request whose cookie does not open
or whose authenticator does not verify gets an NTS NAK; a malformed NTS
request gets nothing.

The transmit stamp is read when the header is built, after the request has
been verified and the cookies sealed, so only the reply's own encryption
lies between the stamp and the send.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from udptime.formats import Responder, Settings
from udptime.ntp import (
    KISS_NTSN,
    PACKET_SIZE,
    NtpResponder,
    build_kiss,
    make_responder,
    parse_request,
)
from udptime.nts.cookies import KeyStore, cookie_length
from udptime.nts.extensions import (
    MIN_NONCE_LENGTH,
    ExtensionError,
    NtsRequest,
    build_nak,
    build_response,
    cookies_that_fit,
    encrypted_placeholders,
    open_authenticator,
    parse_nts_request,
)

_V4_CLIENT = 4 << 3 | 3


@dataclass
class NtsCounters:
    """What the NTS path did, per responder (plain requests are not counted)."""

    authenticated: int = 0
    naks: int = 0
    malformed: int = 0
    cookies: int = 0


class NtsResponder:
    """An NTP responder that also serves NTS; same call signatures as
    :class:`NtpResponder` (``__call__`` and ``batch``).

    Replies to NTS requests are longer than 48 bytes and authenticated as a
    whole, transmit stamp included: a batch sender must not overwrite their
    last bytes with a late stamp. ``long_replies`` says so to
    :class:`udptime.protocol.TimeProtocol`, which then stamps only 48-byte
    replies; :meth:`batch` leaves plain replies to be stamped that way.
    """

    __slots__ = ("_ntp", "_random", "_store", "counters")

    #: Some replies are longer than 48 bytes and must go out as built.
    long_replies = True

    def __init__(
        self,
        ntp: NtpResponder,
        store: KeyStore,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._ntp = ntp
        self._store = store
        self._random = random
        self.counters = NtsCounters()

    def __call__(self, request: bytes, received: float) -> bytes | None:
        if len(request) <= PACKET_SIZE or request[0] & 0x3F != _V4_CLIENT:
            return self._ntp(request, received)
        nts = self._parse(request)
        if nts is None:
            return self._ntp(request, received)
        return self._answer(request, nts, lambda: self._ntp(request, received))

    def batch(self) -> Responder:
        """A responder for one fast-path batch (see ``NtpResponder.batch``).

        Plain requests get the NTP responder's batch replies, which the batch
        sender stamps late; NTS replies carry their own transmit stamp,
        authenticated with the rest, and are sent as they are.
        """
        ntp = self._ntp
        plain_batch = getattr(ntp, "batch", None)
        plain: Responder = plain_batch() if plain_batch is not None else ntp

        def respond(request: bytes, received: float) -> bytes | None:
            if len(request) <= PACKET_SIZE or request[0] & 0x3F != _V4_CLIENT:
                return plain(request, received)
            nts = self._parse(request)
            if nts is None:
                return plain(request, received)
            return self._answer(request, nts, lambda: ntp(request, received))

        return respond

    def _parse(self, request: bytes) -> NtsRequest | None | bool:
        """The NTS request, ``None`` for plain NTP, ``False`` for malformed."""
        try:
            return parse_nts_request(request)
        except ExtensionError:
            self.counters.malformed += 1
            return False

    def _answer(
        self,
        request: bytes,
        nts: NtsRequest | bool,
        header: Callable[[], bytes | None],
    ) -> bytes | None:
        if not isinstance(nts, NtsRequest):
            return None
        keys = self._store.open(nts.cookie)
        if keys is None:
            return self._nak(request, nts)
        plaintext = open_authenticator(AESSIV(keys.c2s), request, nts.authenticator)
        if plaintext is None:
            return self._nak(request, nts)
        try:
            wanted = 1 + nts.placeholders
            wanted += encrypted_placeholders(plaintext, len(nts.cookie))
        except ExtensionError:
            self.counters.malformed += 1
            return None
        count = cookies_that_fit(
            len(request), len(nts.unique_id), cookie_length(keys.aead), wanted
        )
        store = self._store
        cookies = [store.seal(keys) for _ in range(count)]
        nonce = self._random(MIN_NONCE_LENGTH)
        s2c = AESSIV(keys.s2c)
        head = header()
        if head is None:
            return None
        self.counters.authenticated += 1
        self.counters.cookies += count
        return build_response(
            head, nts.unique_id, s2c, cookies, nonce, length=len(request)
        )

    def _nak(self, request: bytes, nts: NtsRequest) -> bytes | None:
        parsed = parse_request(request)
        if parsed is None:
            return None
        self.counters.naks += 1
        return build_nak(build_kiss(parsed, KISS_NTSN), nts.unique_id)


def nts_responder_factory(store: KeyStore) -> Callable[[Settings], Responder]:
    """A drop-in for ``ntp.make_responder``: the same responder, plus NTS."""

    def make(settings: Settings) -> Responder:
        return NtsResponder(make_responder(settings), store)

    return make
